"""Bring your own ViT: any dyntok method on a timm ``VisionTransformer`` you already have.

::

    vit = timm.create_model("deit_small_patch16_224", pretrained=True)   # or your own fine-tuned ViT
    model = dyntok.adapt(vit, "tome", r=13)                 # training-free: ready to predict
    model = dyntok.adapt(vit, "dynamicvit", keep_ratio=0.7) # learned: ready to train

How it works, in three steps that reuse the seams every method already has:

1. :func:`backbone_spec_of` reads the instance's timm settings (image and patch size, width, depth, heads,
   class token or average pooling, registers, LayerScale...) into a :class:`~dyntok.models.BackboneSpec`:
   the instance's timm architecture name plus the settings where it differs from that architecture. The
   spec is checked by rebuilding it (on the meta device, no memory) and comparing every module, so a ViT
   with layers timm's settings cannot describe is refused with the difference named.
2. The method is built on that spec exactly as ``create_model`` builds it, and started from the instance's
   weights with its own ``init_from_dense`` (which already knows how to fit them: DVT resamples the patch
   kernels and position embeddings of its coarser stages).
3. :func:`share_backbone_weights` then puts the instance's own ``Parameter`` objects into the method's
   backbone at the instance's token grid. Nothing is copied: training the adapted model trains your ViT,
   and ``model.config`` rebuilds it (``dyntok.save_model`` / ``dyntok.load_model`` round-trip).

The method's modules stay its own: the hooks and rewritten blocks of a method never touch the instance,
which keeps working as before. Where a method changes a layer's shape the weights cannot be shared and are
copied into the larger layer instead: DVT's feature reuse widens every block's MLP input in its finest
stage (the backbone's own grid), and its coarser stages have weights of their own, started from the
instance's.
"""
from __future__ import annotations

import math
from typing import Any

import timm
import torch
from timm.layers import PatchDropout
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .methods import AdaptiveViT
from .methods.registry import get_method
from .models.vit import BackboneSpec

__all__ = ["adapt", "backbone_spec_of", "share_backbone_weights"]

#: The architecture a ``VisionTransformer`` built by hand is described against: its defaults are the class's.
_PLAIN_ARCH = "vit_base_patch16_224"

#: Module attributes that do not change what a module computes, left out of the structure comparison.
_RUNTIME_ATTRIBUTES = frozenset({"training", "fused_attn", "weight_init_mode", "fix_init", "grad_checkpointing"})


def adapt(model: nn.Module, method: str, **options: Any) -> AdaptiveViT:
    """``method`` (a registered name: ``"tome"``, ``"dynamicvit"``...) on ``model``, sharing its weights.

    ``options`` are the method's keyword arguments (``r=13``, ``keep_ratio=0.7``, ``grids=[7, 10, 14]``), as
    for ``create_model``. The result is in eval mode, on the instance's device and dtype: training-free
    methods (dense, ToMe, EViT) predict right away, learned ones (DynamicViT, AdaViT, DVT, ReViT) are ready
    to train. Methods that distil from a teacher (DynamicViT) need a frozen copy of the original, since the
    instance itself trains: ``adapted.attach_teacher(copy.deepcopy(model))``.

    Raises ``ValueError`` naming what is missing when the instance is not a timm ``VisionTransformer`` that
    timm's settings describe, or when the method cannot drive it (EViT and AdaViT need a class token...).
    """
    spec = backbone_spec_of(model)
    reference = next(model.parameters())
    adapted = get_method(method)(spec, **options).to(device=reference.device, dtype=reference.dtype)
    adapted.init_from_dense({f"vit.{name}": value for name, value in model.state_dict().items()})
    share_backbone_weights(adapted, model)
    return adapted.eval()


# --------------------------------------------------------------------------------------------- describing
def backbone_spec_of(model: nn.Module) -> BackboneSpec:
    """The :class:`BackboneSpec` that rebuilds ``model``'s structure: its timm architecture plus overrides.

    Raises ``ValueError`` when ``model`` is not a plain timm ``VisionTransformer`` or holds layers that timm's
    ``VisionTransformer`` arguments cannot describe (a custom norm or activation, a swapped block class).
    """
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"dyntok.adapt takes a timm VisionTransformer (vit_*, deit_*...), got "
                         f"{type(model).__name__}")
    arch = _architecture(model)
    with torch.device("meta"):
        defaults = timm_settings(timm.create_model(arch, weight_init="skip"))
    settings = timm_settings(model)
    overrides = {key: value for key, value in settings.items() if not _same_setting(key, value, defaults[key])}
    spec = BackboneSpec(arch, overrides)
    with torch.device("meta"):
        rebuilt = timm.create_model(arch, weight_init="skip", **overrides)
    differences = structure_differences(model, rebuilt)
    if differences:
        raise ValueError(f"dyntok.adapt rebuilds backbones from timm's VisionTransformer settings, and {arch} with "
                         f"{overrides} differs from this model: {'; '.join(differences[:4])}"
                         f"{' ...' if len(differences) > 4 else ''}. Layers of your own are not supported")
    return spec


def timm_settings(vit: VisionTransformer) -> dict[str, Any]:
    """The ``VisionTransformer`` keyword arguments that built ``vit``, read off its modules (JSON values)."""
    block, embed = vit.blocks[0], vit.patch_embed
    attn = block.attn
    return {
        "img_size": _side(embed.img_size), "patch_size": _side(embed.patch_size),
        "in_chans": embed.proj.in_channels, "num_classes": vit.num_classes, "global_pool": vit.global_pool,
        "embed_dim": vit.embed_dim, "depth": len(vit.blocks), "num_heads": attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": attn.qkv.bias is not None, "qk_norm": not isinstance(attn.q_norm, nn.Identity),
        "proj_bias": attn.proj.bias is not None,
        # LayerScale's starting value only matters for a fresh init; its presence is what the spec needs.
        "init_values": _layer_scale_start(block.ls1),
        "class_token": vit.cls_token is not None, "no_embed_class": vit.no_embed_class,
        "reg_tokens": vit.num_reg_tokens, "pos_embed": "learn" if vit.pos_embed is not None else "none",
        "pre_norm": not isinstance(vit.norm_pre, nn.Identity),
        "final_norm": not (isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.Identity)),
        "fc_norm": not isinstance(vit.fc_norm, nn.Identity), "pool_include_prefix": vit.pool_include_prefix,
        "dynamic_img_size": vit.dynamic_img_size, "dynamic_img_pad": embed.dynamic_img_pad,
        "drop_rate": vit.head_drop.p, "pos_drop_rate": vit.pos_drop.p,
        "patch_drop_rate": vit.patch_drop.prob if isinstance(vit.patch_drop, PatchDropout) else 0.0,
        "proj_drop_rate": attn.proj_drop.p, "attn_drop_rate": attn.attn_drop.p,
        # timm spreads stochastic depth linearly over the blocks: the last one has the full rate.
        "drop_path_rate": float(getattr(vit.blocks[-1].drop_path1, "drop_prob", 0.0)),
    }


def structure_differences(model: nn.Module, rebuilt: nn.Module) -> list[str]:
    """Where two modules differ in structure: submodule names and types, their settings, parameter shapes."""
    ours, theirs = _structure(model), _structure(rebuilt)
    differences = [f"{name or 'the model'}: {ours.get(name, 'absent')} in yours, {theirs.get(name, 'absent')} rebuilt"
                   for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]
    return differences


def _structure(module: nn.Module) -> dict[str, str]:
    """Each submodule and parameter by name: type, ``extra_repr`` and plain settings; or the shape."""
    described = {}
    for name, sub in module.named_modules():
        settings = {key: value for key, value in vars(sub).items()
                    if not key.startswith("_") and key not in _RUNTIME_ATTRIBUTES
                    and isinstance(value, (bool, int, float, str, tuple, type(None)))}
        described[name] = f"{type(sub).__name__}({sub.extra_repr()}) {settings}"
    for name, param in module.named_parameters():
        described[name] = f"shape {tuple(param.shape)}"
    return described


def _architecture(model: VisionTransformer) -> str:
    """The timm architecture ``model`` was created as, or the plain one for a hand-built ``VisionTransformer``."""
    config = getattr(model, "pretrained_cfg", None) or {}
    arch = config.get("architecture")
    if arch and timm.is_model(arch):
        with torch.device("meta"):
            if type(timm.create_model(arch, weight_init="skip")) is type(model):
                return arch
    return _PLAIN_ARCH


def _layer_scale_start(scale: nn.Module) -> float | None:
    """timm's ``init_values`` of a LayerScale, None without one."""
    return getattr(scale, "init_values", None) if hasattr(scale, "gamma") else None


def _side(size: tuple[int, int]) -> int | list[int]:
    return size[0] if size[0] == size[1] else list(size)


def _same_setting(key: str, value: Any, default: Any) -> bool:
    if key == "init_values":  # LayerScale present or not; its starting value is not structure
        return (value is None) == (default is None)
    if isinstance(value, float) and isinstance(default, float):
        return math.isclose(value, default)
    return value == default


# --------------------------------------------------------------------------------------------- sharing
def share_backbone_weights(adapted: nn.Module, model: VisionTransformer) -> int:
    """Put ``model``'s parameters into the ViT(s) of ``adapted`` that run at ``model``'s token grid.

    Every parameter with the same name and shape becomes the same ``Parameter`` object; one of another shape
    (a layer the method widened) keeps the values ``init_from_dense`` gave it. Returns how many were shared.
    """
    targets = [vit for vit in adapted.modules()
               if isinstance(vit, VisionTransformer) and vit is not model and _same_grid(vit, model)]
    if not targets:
        raise ValueError(f"{type(adapted).__name__} runs no ViT at the backbone's own token grid "
                         f"{tuple(model.patch_embed.grid_size)}: nothing to share")
    shared = 0
    for vit in targets:
        for name, param in model.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = vit.get_submodule(owner_name)
            current = getattr(owner, leaf, None)
            if isinstance(current, Tensor) and current.shape == param.shape:
                setattr(owner, leaf, param)
                shared += 1
    return shared


def _same_grid(vit: VisionTransformer, model: VisionTransformer) -> bool:
    return (tuple(vit.patch_embed.grid_size) == tuple(model.patch_embed.grid_size)
            and vit.patch_embed.proj.weight.shape == model.patch_embed.proj.weight.shape)
