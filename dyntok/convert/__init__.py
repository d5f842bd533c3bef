"""Officially released checkpoints of the methods' papers, as dyntok checkpoints.

``dyntok.convert("dynamicvit", "official.pth", "dynamicvit_deit_s.safetensors")`` (or ``dyntok convert --from
dynamicvit official.pth out.safetensors``) reads the file without running code (``weights_only=True``),
takes the weights the official evaluation takes, renames them, and writes a dyntok checkpoint whose
configuration (budget, prune locations, fusion) is the one the official model was evaluated with, so that
``dyntok eval out.safetensors --dataset imagenet`` measures the published model with dyntok's accounting.
One module per official repository; docs/byo.md lists the releases and what each paper reports.

The other direction, ``to_official("evit", model.state_dict())``, gives a dyntok model's weights under the
official key names (and, where it differs, the official layout: AdaViT's separate query, key and value), so the
official code can run the same weights (``benchmarks/official_speed.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from ..methods import AdaptiveViT
from . import adavit, dvt, dynamicvit, evit
from ._official import ConversionError, backbone_official_name

__all__ = ["convert", "CONVERTERS", "ConversionError", "OFFICIAL_LAYOUTS", "OFFICIAL_NAMES", "to_official"]

#: Official source -> its converter ``(path, out, **options) -> model``.
CONVERTERS: dict[str, Callable[..., AdaptiveViT]] = {
    "dynamicvit": dynamicvit.convert,
    "evit": evit.convert,
    "adavit": adavit.convert,
    "dvt": dvt.convert,
}

#: Official code -> the official key of a dyntok weight (None: the official model has no such weight).
#: ToMe's official code patches a timm ViT in place, so its keys are timm's.
OFFICIAL_NAMES: dict[str, Callable[[str], str | None]] = {
    "dynamicvit": dynamicvit.official_name,
    "evit": evit.official_name,
    "tome": backbone_official_name,
    "dvt": dvt.official_name,
    "adavit": adavit.official_name,
}
#: Official code whose weights are laid out differently, not only named differently: the renamed state dict -> the
#: official one. AdaViT's attention keeps query, key and value as three linear layers.
OFFICIAL_LAYOUTS: dict[str, Callable[[dict[str, Tensor]], dict[str, Tensor]]] = {
    "adavit": adavit.separate_qkv,
}


def convert(source: str, path: str | Path, out: str | Path, **options: Any) -> AdaptiveViT:
    """Convert the official ``source`` checkpoint at ``path`` into the dyntok checkpoint ``out``.

    ``options`` are the converter's: the budget the release was trained at where the file does not say
    (``keep_ratio=``, ``keep_rate=``, ``fuse=``...). Returns the converted model, in eval mode.
    """
    try:
        converter = CONVERTERS[source]
    except KeyError:
        raise ValueError(f"no converter for {source!r}; official checkpoints dyntok converts: "
                         f"{', '.join(CONVERTERS)}") from None
    return converter(path, out, **options)


def to_official(source: str, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A dyntok ``state_dict`` under the key names of the ``source`` official code, ready for its
    ``load_state_dict``; a ``ConversionError`` names any weight the official model does not have."""
    try:
        official_name = OFFICIAL_NAMES[source]
    except KeyError:
        raise ValueError(f"no official naming for {source!r}; known: {', '.join(OFFICIAL_NAMES)}") from None
    renamed = {key: official_name(key) for key in state_dict}
    unmapped = sorted(key for key, name in renamed.items() if name is None)
    if unmapped:
        raise ConversionError(f"the official {source} model has no weight for {', '.join(unmapped[:4])}"
                              f"{' ...' if len(unmapped) > 4 else ''}")
    official = {renamed[key]: value for key, value in state_dict.items()}
    return OFFICIAL_LAYOUTS[source](official) if source in OFFICIAL_LAYOUTS else official
