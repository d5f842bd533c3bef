"""Bounds on the backbones dyntok builds, checked before anything is allocated.

A model's shape comes from places a user does not always control: a checkpoint's metadata, a benchmark
spec's ``model_kwargs``, ``--model-arg``. Each backbone setting is checked for its type and range, the
settings that must divide each other are checked together, and the model's size is computed on PyTorch's
``meta`` device (shapes only, no memory) and compared with a bound before timm builds it for real. The
bound lets every published plain ViT through (ViT-H/14 has 0.63 B parameters, ViT-g/14 1.0 B) and stops a
typo or a hostile file from asking for terabytes; ``--allow-large-model`` (``DYNTOK_ALLOW_LARGE_MODEL=1``)
lifts it for a deliberate giant.
"""
from __future__ import annotations

import os
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..ranges import Choice, Interval

__all__ = ["ALLOW_LARGE_ENV", "ALLOW_LARGE_OPTION", "MAX_PARAMETERS", "MAX_BLOCK_ACTIVATIONS", "check_backbone"]

#: Environment variable and CLI option that lift the size bound.
ALLOW_LARGE_ENV = "DYNTOK_ALLOW_LARGE_MODEL"
ALLOW_LARGE_OPTION = "--allow-large-model"

#: Parameters of the largest backbone built without the option (ViT-G/14, 1.8 B, still fits).
MAX_PARAMETERS = 2_000_000_000
#: Activation elements of one image in one block (attention scores of every head plus the token features
#: and MLP hidden units): 2**31 is 8 GB in float32 for a single image, far beyond any published ViT.
MAX_BLOCK_ACTIVATIONS = 2 ** 31

_FRACTION = Interval(0.0, 1.0, high_open=True)
_SWITCH = Choice((True, False))
#: Each backbone setting and the values it may take. The ranges are wide (a deliberate giant stays inside
#: them); the size bound below is what stops an absurd combination.
SETTINGS: dict[str, Interval | Choice] = {
    "img_size": Interval(1, 16384, integer=True),
    "patch_size": Interval(1, 1024, integer=True),
    "embed_dim": Interval(1, 65536, integer=True),
    "depth": Interval(1, 1024, integer=True),
    "num_heads": Interval(1, 1024, integer=True),
    "mlp_ratio": Interval(0.0, 256.0, low_open=True),
    "num_classes": Interval(1, 10_000_000, integer=True),
    "drop_path_rate": _FRACTION,
    "drop_rate": _FRACTION,
    "class_token": Choice((True, False)),
    "qkv_bias": Choice((True, False)),
    "global_pool": Choice(("token", "avg", "avgmax", "max", "map", "")),
    "in_chans": Interval(1, 1024, integer=True),
    "reg_tokens": Interval(0, 1024, integer=True),
    "init_values": Interval(0.0, 1e6),
    "pos_embed": Choice(("learn", "none")),
    **{name: _SWITCH for name in ("qk_norm", "proj_bias", "no_embed_class", "pre_norm", "final_norm", "fc_norm",
                                  "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad")},
    **{name: _FRACTION for name in ("pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate")},
}
#: Settings for which None is a value too (``init_values=None``: no LayerScale).
_NONE_ALLOWED = frozenset({"init_values"})


def large_models_allowed() -> bool:
    return os.environ.get(ALLOW_LARGE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_backbone(arch: str, kwargs: dict[str, Any], label: str | None = None) -> None:
    """A ``ValueError`` naming the setting when ``timm.create_model(arch, **kwargs)`` would be malformed or
    larger than the bound; nothing is allocated. ``label`` names the model in messages (default ``arch``)."""
    for name, accepted in SETTINGS.items():
        if name in kwargs and not (kwargs[name] is None and name in _NONE_ALLOWED):
            _check_setting(name, accepted, kwargs[name])
    _check_divisible(kwargs)
    described = _describe(label or arch, kwargs)
    params, activations = _measure_on_meta(arch, kwargs, described)
    if large_models_allowed():
        return
    if params > MAX_PARAMETERS:
        raise ValueError(f"{described} would have {params:,} parameters, more than dyntok builds "
                         f"unasked ({MAX_PARAMETERS / 1e9:g} billion, beyond ViT-G); check the settings, or pass "
                         f"{ALLOW_LARGE_OPTION} (or set {ALLOW_LARGE_ENV}=1) to build it anyway")
    if activations > MAX_BLOCK_ACTIVATIONS:
        raise ValueError(f"{described} would need {activations * 4 / 2 ** 30:.3g} GiB of activations for one image "
                         f"in one block (more than the {MAX_BLOCK_ACTIVATIONS * 4 / 2 ** 30:g} GiB dyntok allows "
                         f"unasked: too many tokens for attention); use a larger patch_size or a smaller img_size, "
                         f"or pass {ALLOW_LARGE_OPTION} (or set {ALLOW_LARGE_ENV}=1) to build it anyway")


def _check_setting(name: str, accepted: Interval | Choice, value: Any) -> None:
    if name == "img_size" and isinstance(value, (list, tuple)) and len(value) == 2:
        for side in value:
            accepted.check(name, side)
        return
    accepted.check(name, value)


def _check_divisible(kwargs: dict[str, Any]) -> None:
    embed_dim, num_heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if embed_dim is not None and num_heads is not None and embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: every head gets "
                         f"embed_dim / num_heads channels")
    img_size, patch_size = kwargs.get("img_size"), kwargs.get("patch_size")
    if img_size is not None and patch_size is not None:
        sides = img_size if isinstance(img_size, (list, tuple)) else (img_size,)
        if any(side % patch_size for side in sides):
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}: the patches "
                             f"must tile the image")


def _measure_on_meta(arch: str, kwargs: dict[str, Any], described: str) -> tuple[int, int]:
    """(parameters, activation elements of one image in one block), from a build on the meta device.

    With ``depth`` given, one block is built and the rest counted, so a deep model costs no build time.
    """
    depth = kwargs.get("depth")
    probe = {**kwargs, "depth": 1} if depth is not None else kwargs
    try:
        with torch.device("meta"):
            vit = timm.create_model(arch, pretrained=False, **probe)
    except (AssertionError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"timm cannot build {described} ({type(error).__name__}: {error})") from None
    if not isinstance(vit, VisionTransformer):  # the methods rewrite its token flow and need its block structure
        raise ValueError(f"{described!r} builds a {type(vit).__name__}; dyntok methods need a plain timm "
                         f"VisionTransformer (vit_*, deit_*)")
    block = vit.blocks[0] if len(vit.blocks) else nn.Identity()
    block_params = _count(block)
    params = _count(vit) + (depth - 1) * block_params if depth is not None else _count(vit)
    tokens = vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 0)
    heads = getattr(getattr(block, "attn", None), "num_heads", 1)
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    hidden = fc1.out_features if isinstance(fc1, nn.Linear) else 4 * vit.embed_dim
    return params, heads * tokens * tokens + tokens * (hidden + 4 * vit.embed_dim)


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _describe(arch: str, kwargs: dict[str, Any]) -> str:
    shown = {key: kwargs[key] for key in SETTINGS if key in kwargs}
    return f"{arch} ({', '.join(f'{key}={value!r}' for key, value in shown.items())})" if shown else arch
