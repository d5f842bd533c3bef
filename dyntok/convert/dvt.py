"""DVT's released DeiT-S checkpoint (Wang et al., NeurIPS 2021; blackfeather-wang/Dynamic-Vision-Transformer).

The official ``DVT_Deit_small`` holds three DeiT-S stages, ``less_less_token`` (patch 32: 7 x 7 tokens),
``less_token`` (a 23 x 23 kernel, stride 23, padding 3: 10 x 10 tokens on the 224px image) and
``normal_token`` (patch 16: 14 x 14), the later two reusing the previous stage's features (per block,
``feature_resuse_mlp``: LayerNorm, MLP 384 -> 128 -> 48, appended to the MLP input, zeros at the class
position) and attention logits (``relation_reuse_conv``: 1 x 1 convolutions over the depth x heads maps);
both are brought to the finer grid by nearest upsampling to twice the grid then adaptive average pooling.
dyntok's DVT builds exactly this with ``padded_patches=True``, ``reuse_resampling="nearest-avgpool"`` and
``reuse_class_fill="zeros"``; the weights map one to one. The official ``inference.py`` loads
``checkpoint["model_state_dict"]`` and exits at the first stage whose softmax confidence reaches that
stage's threshold, from ``dynamic_threshold`` (59 rows: the exit proportions q^k for q = p / 20).

The T2T-ViT checkpoints of the same release cannot be converted: their Tokens-to-Token stem is not a timm
plain ViT, and dyntok's backbones are.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..methods import AdaptiveViT
from ..methods.dvt import NEVER_EXIT
from ._official import ConversionError, Official, read_checkpoint, timm_vit_backbone, write_converted

__all__ = ["convert", "dyntok_name", "official_name"]

SOURCE = "DVT"
#: Where inference.py reads the weights from.
WEIGHT_KEYS = ("model_state_dict",)
#: The official stages, coarse to fine.
STAGES = ("less_less_token", "less_token", "normal_token")
#: The row of ``dynamic_threshold`` used by default: p = 10, exit proportions q^k with q = 0.5, the rule
#: dyntok's DVT calls its paper budget.
PAPER_POINT = 10

_FEATURE_REUSE = re.compile(r"blocks\.(\d+)\.feature_resuse_mlp\.(0|1\.fc1|1\.fc2)\.(weight|bias)")
_RELATION_REUSE = re.compile(r"relation_reuse_conv\.([02])\.(weight|bias)")
_FEATURE_PARTS = {"0": "norm", "1.fc1": "mlp.fc1", "1.fc2": "mlp.fc2"}
_DYNTOK_STAGE = re.compile(r"stages\.(\d+)\.(.+)")
_DYNTOK_FEATURE_REUSE = re.compile(r"feature_reuse\.(\d+)\.(norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_DYNTOK_RELATION_REUSE = re.compile(r"relation_reuse\.mlp\.([02])\.(weight|bias)")
_OFFICIAL_FEATURE_PARTS = {part: official for official, part in _FEATURE_PARTS.items()}


def convert(path: str | Path, out: str | Path, point: int = PAPER_POINT, num_heads: int | None = None) -> AdaptiveViT:
    """Write the official DVT DeiT-S checkpoint ``path`` as a dyntok DVT at ``out``; returns the model.

    ``point``: which of the file's 59 threshold settings becomes the budget (p = 1..59, exit proportions
    q^k with q = p / 20; default 10). Without thresholds in the file every image runs to the last stage:
    fit them with ``dyntok eval --calibrate``.
    """
    official = read_checkpoint(path, WEIGHT_KEYS)
    if any("tokens_to_token" in key for key in official.weights):
        raise ConversionError(f"{official.path} is a T2T-ViT DVT: its Tokens-to-Token stem is not a timm plain ViT, "
                              f"so dyntok cannot run it; only the DeiT-S release converts")
    grids = [_grid(official, stage) for stage in STAGES]
    reuse = official.weights.get(f"{STAGES[-1]}.blocks.0.feature_resuse_mlp.1.fc1.weight")
    if reuse is None:
        raise ConversionError(f"{official.path} has no {STAGES[-1]}.blocks.0.feature_resuse_mlp: not the DVT DeiT-S "
                              f"release with feature and relation reuse")
    options = {"grids": grids, "reuse_hidden": reuse.shape[0],
               "reuse_dim": official.weights[f"{STAGES[-1]}.blocks.0.feature_resuse_mlp.1.fc2.weight"].shape[0],
               "padded_patches": True, "reuse_resampling": "nearest-avgpool", "reuse_class_fill": "zeros"}
    backbone = timm_vit_backbone(official, num_heads, prefix=f"{STAGES[-1]}.")
    return write_converted(official, out, "dvt", backbone, options, {"thresholds": _thresholds(official, point)},
                           dyntok_name, SOURCE, _reported_results(official))


def dyntok_name(key: str) -> str | None:
    """The dyntok weight an official key maps to."""
    stage, _, rest = key.partition(".")
    if stage not in STAGES:
        return None
    prefix = f"stages.{STAGES.index(stage)}"
    if match := _FEATURE_REUSE.fullmatch(rest):
        block, part, kind = match.groups()
        return f"{prefix}.feature_reuse.{block}.{_FEATURE_PARTS[part]}.{kind}"
    if match := _RELATION_REUSE.fullmatch(rest):
        return f"{prefix}.relation_reuse.mlp.{match[1]}.{match[2]}"
    return f"{prefix}.vit.{rest}"


def official_name(key: str) -> str | None:
    """The official key of a dyntok weight (the inverse of :func:`dyntok_name`); None outside the three stages."""
    match = _DYNTOK_STAGE.fullmatch(key)
    if not match or int(match[1]) >= len(STAGES):
        return None
    stage, rest = STAGES[int(match[1])], match[2]
    if found := _DYNTOK_FEATURE_REUSE.fullmatch(rest):
        block, part, kind = found.groups()
        return f"{stage}.blocks.{block}.feature_resuse_mlp.{_OFFICIAL_FEATURE_PARTS[part]}.{kind}"
    if found := _DYNTOK_RELATION_REUSE.fullmatch(rest):
        return f"{stage}.relation_reuse_conv.{found[1]}.{found[2]}"
    return f"{stage}.{rest.removeprefix('vit.')}" if rest.startswith("vit.") else None


def _grid(official: Official, stage: str) -> int:
    pos_embed = official.weights.get(f"{stage}.pos_embed")
    if pos_embed is None:
        raise ConversionError(f"{official.path} has no {stage}.pos_embed: not a DVT DeiT checkpoint "
                              f"(found {sorted(official.weights)[:5]} ...)")
    return math.isqrt(pos_embed.shape[1] - 1)


def _reported_results(official: Official) -> dict[str, list]:
    """What the file says about itself: GFLOPs and top-1 of each exit, and the budgeted accuracy curve."""
    names = ("flops", "anytime_classification", "budgeted_batch_classification")
    return {name: _plain(official.entries[name]) for name in names if name in official.entries}


def _plain(value):
    """Tensors and numbers in nested lists as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def _thresholds(official: Official, point: int) -> list[float]:
    """The exit thresholds of the stages but the last; a threshold no confidence reaches never exits."""
    table = official.entries.get("dynamic_threshold")
    if table is None:
        return [NEVER_EXIT] * (len(STAGES) - 1)
    if not 1 <= point <= len(table):
        raise ConversionError(f"point must be in 1..{len(table)} (a row of the file's dynamic_threshold), got {point}")
    return [float(value) if value <= 1.0 else NEVER_EXIT for value in table[point - 1][:len(STAGES) - 1].tolist()]
