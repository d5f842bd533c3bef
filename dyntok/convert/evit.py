"""EViT's released DeiT-S checkpoints (Liang et al., ICLR 2022; github.com/youweiliang/evit).

The official model is timm's DeiT-S with the same keys; the reorganisation has no weights. The official
evaluation (``main.py --eval --resume``) loads ``checkpoint["model"]`` and reorganises in blocks 3, 6 and 9
(``--drop_loc``) at ``--base_keep_rate``, keeping ``ceil(rate * n)`` tokens ranked by the class token's
attention, with (``--fuse_token``) or without the fused token: dyntok's EViT with ``fuse_inattentive`` set
to match. The released files do not say which keep rate and fusion they were trained with unless they kept
the training arguments; pass them as in the model zoo's table otherwise. Nothing is lost in the conversion.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Sequence

from ..methods import AdaptiveViT
from ._official import (ConversionError, backbone_dyntok_name, backbone_official_name, read_checkpoint,
                        timm_vit_backbone, write_converted)

__all__ = ["convert", "dyntok_name", "official_name"]

#: The official model's keys are timm's DeiT keys, and the reorganisation has no weights: both directions are
#: the backbone's renaming.
dyntok_name = backbone_dyntok_name
official_name = backbone_official_name

SOURCE = "EViT"
#: Where main.py --resume reads the weights from.
WEIGHT_KEYS = ("model",)
#: The official defaults (``--drop_loc '(3, 6, 9)'``, the paper's headline EViT/0.7-DeiT-S with fusion).
DROP_LOCATIONS = [3, 6, 9]
PAPER_KEEP_RATE = 0.7


def convert(path: str | Path, out: str | Path, keep_rate: float | None = None, fuse: bool | None = None,
            prune_locations: Sequence[int] | None = None, num_heads: int | None = None) -> AdaptiveViT:
    """Write the official checkpoint ``path`` as a dyntok EViT at ``out``; returns the model.

    ``keep_rate``, ``fuse`` (the inattentive tokens fused into one, or dropped) and ``prune_locations``
    default to the file's saved training arguments, else 0.7, fused, blocks 3, 6 and 9.
    """
    official = read_checkpoint(path, WEIGHT_KEYS)
    args = official.args
    keep_rate = keep_rate or args.get("base_keep_rate") or PAPER_KEEP_RATE
    fuse = fuse if fuse is not None else args.get("fuse_token", True)
    locations = list(prune_locations or _drop_locations(args.get("drop_loc")) or DROP_LOCATIONS)
    options = {"keep_rate": keep_rate, "prune_locations": locations}
    if not fuse:  # fusing is EViT's default: the option is only written where it changes the model
        options["fuse_inattentive"] = False
    return write_converted(official, out, "evit", timm_vit_backbone(official, num_heads), options,
                           {"keep_rate": keep_rate}, dyntok_name, SOURCE)


def _drop_locations(text: str | None) -> list[int] | None:
    """The official ``drop_loc`` training argument as main.py saved it, the text of a tuple: ``'(3, 6, 9)'``."""
    if text is None:
        return None
    try:
        return [int(location) for location in ast.literal_eval(str(text))]
    except (ValueError, SyntaxError, TypeError):
        raise ConversionError(f"the file's saved training argument drop_loc={text!r} is not a tuple of block "
                              f"indices") from None
