"""DynamicViT's released DeiT checkpoints (Rao et al., NeurIPS 2021; github.com/raoyongming/DynamicViT).

The official model is a DeiT whose ``score_predictor.{s}`` modules (``in_conv``: LayerNorm, Linear, GELU;
``out_conv``: Linear, GELU, Linear, GELU, Linear, LogSoftmax) are dyntok's ``predictors.{s}`` (``embed`` and
``classify``, the same layers in the same order); the backbone keys are timm's. The official evaluation
(``infer.py``) loads ``checkpoint["model"]`` and prunes before blocks 3, 6 and 9 to ``rho, rho^2, rho^3`` of
the 196 patch tokens (``int(196 * rho^s)``, the count dyntok keeps too), keeping the top-scored tokens.
Nothing is lost in the conversion.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..methods import AdaptiveViT
from ._official import (backbone_dyntok_name, backbone_official_name, read_checkpoint, timm_vit_backbone,
                        write_converted)

__all__ = ["convert", "dyntok_name", "official_name"]

SOURCE = "DynamicViT"
#: Where infer.py reads the weights from.
WEIGHT_KEYS = ("model",)
#: The blocks the official DeiT models prune before.
PRUNE_LOCATIONS = [3, 6, 9]
#: The released DeiT-S model's keep ratio (the paper's headline, DynamicViT-DeiT-S/0.7).
PAPER_KEEP_RATIO = 0.7

_PREDICTOR = re.compile(r"score_predictor\.(\d+)\.(in_conv|out_conv)\.(\d+)\.(weight|bias)")
_DYNTOK_PREDICTOR = re.compile(r"predictors\.(\d+)\.(embed|classify)\.(\d+)\.(weight|bias)")


def convert(path: str | Path, out: str | Path, keep_ratio: float | None = None,
            num_heads: int | None = None) -> AdaptiveViT:
    """Write the official checkpoint ``path`` as a dyntok DynamicViT at ``out``; returns the model.

    ``keep_ratio``: the ``--base_rate`` the model was trained with; default: the file's saved training
    arguments, else 0.7. ``num_heads``: default the DeiT rule, width / 64.
    """
    official = read_checkpoint(path, WEIGHT_KEYS)
    keep_ratio = keep_ratio or official.args.get("base_rate") or PAPER_KEEP_RATIO
    options = {"keep_ratio": keep_ratio, "prune_locations": PRUNE_LOCATIONS}
    return write_converted(official, out, "dynamicvit", timm_vit_backbone(official, num_heads), options,
                           {"keep_ratio": keep_ratio}, dyntok_name, SOURCE)


def dyntok_name(key: str) -> str | None:
    """The dyntok weight an official key maps to."""
    match = _PREDICTOR.fullmatch(key)
    if match:
        stage, part, layer, kind = match.groups()
        return f"predictors.{stage}.{'embed' if part == 'in_conv' else 'classify'}.{layer}.{kind}"
    return None if key.startswith("score_predictor.") else backbone_dyntok_name(key)


def official_name(key: str) -> str | None:
    """The official key of a dyntok weight (the inverse of :func:`dyntok_name`)."""
    match = _DYNTOK_PREDICTOR.fullmatch(key)
    if match:
        stage, part, layer, kind = match.groups()
        return f"score_predictor.{stage}.{'in_conv' if part == 'embed' else 'out_conv'}.{layer}.{kind}"
    return backbone_official_name(key)
