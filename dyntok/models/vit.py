"""Plain Vision Transformer backbones, built by timm by name.

Every method in dyntok starts from a timm ``VisionTransformer``: the dense model is one, DynamicViT prunes
the tokens flowing through one, DVT stacks several. This module is the single place where backbones are
made, so that presets, overrides and pretrained weights behave the same for every method.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from .hub import hub_access
from .limits import check_backbone

__all__ = ["BackboneSpec", "PRESETS", "BACKBONE_OVERRIDES", "create_backbone", "embed_tokens", "list_backbones"]

#: Keyword arguments of ``create_model`` that shape the backbone rather than the method.
BACKBONE_OVERRIDES = (
    "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes",
    "drop_path_rate", "drop_rate", "class_token", "global_pool", "qkv_bias",
    # the rest of timm's VisionTransformer settings with JSON values, which describe any ViT dyntok.adapt takes
    "in_chans", "qk_norm", "proj_bias", "init_values", "no_embed_class", "reg_tokens", "pos_embed", "pre_norm",
    "final_norm", "fc_norm", "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "pos_drop_rate",
    "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
)

#: Presets sized for 32x32 CIFAR that train from scratch on 2 CPU cores in minutes.
#: Each is a timm architecture plus overrides; MACs are per 32x32 image (see docs/models.md).
PRESETS: dict[str, dict[str, Any]] = {
    # 64 patch tokens of 4x4 pixels; the default for tests and the CPU benchmark.
    "vit_cifar_tiny": dict(
        arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4,
        mlp_ratio=2.0, num_classes=10,
    ),
    # Same width and depth as tiny with a wider MLP: the "small ViT" most experiments start from.
    "vit_cifar_small": dict(
        arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3,
        mlp_ratio=4.0, num_classes=10,
    ),
    # A deeper model for the thorough (hours-long) CPU profile and for GPUs.
    "vit_cifar_base": dict(
        arch="vit_small_patch16_224", img_size=32, patch_size=4, embed_dim=384, depth=9, num_heads=6,
        mlp_ratio=4.0, num_classes=10,
    ),
    # A deliberately small ViT: the default benchmark's reference, with weights shipped in dyntok.
    "vit_cifar_micro": dict(
        arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
        mlp_ratio=2.0, num_classes=10,
    ),
    # Static baselines of the micro reference, trained with the same recipe (weights shipped too):
    # the same ViT on 16 tokens of 8x8 pixels...
    "vit_cifar_micro_patch8": dict(
        arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3,
        mlp_ratio=2.0, num_classes=10,
    ),
    # ...and a smaller ViT on the same 64 tokens, at about a quarter of the MACs.
    "vit_cifar_nano": dict(
        arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
        mlp_ratio=2.0, num_classes=10,
    ),
}


@dataclass(frozen=True)
class BackboneSpec:
    """What a method needs to build its backbone(s): a name plus overrides.

    ``name`` is a dyntok preset or any timm plain-ViT name (``vit_*``, ``deit_*``). ``overrides`` follow
    timm's keyword names (``img_size``, ``patch_size``, ``embed_dim``...). ``pretrained`` loads timm's weights
    (from the hub, or from ``pretrained_file`` when given).
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    pretrained_file: str | None = None

    def resolved_kwargs(self, **extra: Any) -> tuple[str, dict[str, Any]]:
        """The timm architecture name and the keyword arguments it is built with."""
        if self.name in PRESETS:
            kwargs = dict(PRESETS[self.name])
            arch = kwargs.pop("arch")
        else:
            arch, kwargs = self.name, {}
        kwargs.update(self.overrides)
        kwargs.update(extra)
        return arch, kwargs

    def build(self, **extra: Any) -> VisionTransformer:
        """A fresh backbone; ``extra`` overrides win over the spec's (DVT changes ``patch_size`` per stage)."""
        return create_backbone(self.name, pretrained=self.pretrained, pretrained_file=self.pretrained_file,
                               **{**self.overrides, **extra})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "overrides": dict(self.overrides)}


def create_backbone(name: str, pretrained: bool = False, pretrained_file: str | None = None,
                    **overrides: Any) -> VisionTransformer:
    """Build a timm plain ViT by preset or timm name.

    Raises ``ValueError`` for names that are neither, or that timm builds as something other than a plain
    ``VisionTransformer`` (the methods rewrite its token flow and need its block structure), and for
    settings out of range or too large to build (:mod:`dyntok.models.limits`), before allocating anything.
    """
    spec = BackboneSpec(name, overrides)
    arch, kwargs = spec.resolved_kwargs()
    if name not in PRESETS and not timm.is_model(arch):
        raise ValueError(f"unknown backbone {name!r}: use a dyntok preset ({', '.join(PRESETS)}) "
                         f"or a timm plain-ViT name such as 'vit_tiny_patch16_224' or 'deit_small_patch16_224'")
    if pretrained_file is not None:
        _refuse_pickled_code(pretrained_file)
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
    if pretrained and name in PRESETS and pretrained_file is None:
        # dyntok's own references are dyntok checkpoints of a whole model, loaded one floor up (dyntok.pretrained).
        raise ValueError(f"preset {name!r} has no timm weights: load dyntok's reference with "
                         f"dyntok.create_model({name!r}, pretrained=True), or pass pretrained_file=")
    check_backbone(arch, kwargs, label=name)
    if pretrained and pretrained_file is None:
        with hub_access(f"timm's weights for {name}", "pretrained_file=PATH (--model-arg pretrained_file=PATH)"):
            model = timm.create_model(arch, pretrained=True, **kwargs)
    else:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    return model


def _refuse_pickled_code(path: str | Path) -> None:
    """A ``ValueError`` for a pickle-based weight file that needs code to load, before timm opens it.

    Pickles are only ever read with ``weights_only=True`` (tensors and plain containers), whatever timm's
    version does; mapping to the meta device makes this check cost no memory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return
    try:
        torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"refusing to load {path}: it holds pickled objects other than tensors, which would run "
                         f"code while loading. Convert weights you trust to safetensors first") from None
    except Exception as error:  # any other failure means a damaged or foreign file
        raise ValueError(f"{path} is not a readable weight file ({type(error).__name__}); pass a .safetensors "
                         f"file or a torch file of plain tensors") from None


def embed_tokens(vit: VisionTransformer, images: Tensor) -> Tensor:
    """Tokens entering a timm ViT's first block: the prologue of its ``forward_features``."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))


def list_backbones(include_timm: bool = False) -> list[str]:
    """Preset names, plus timm's plain-ViT names when ``include_timm``."""
    names = list(PRESETS)
    if include_timm:
        names += timm.list_models(["vit_*", "deit_*"])
    return names
