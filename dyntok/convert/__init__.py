"""Officially released checkpoints of the methods' papers, as dyntok checkpoints.

``dyntok.convert("dynamicvit", "official.pth", "dynamicvit_deit_s.safetensors")`` (or ``dyntok convert --from
dynamicvit official.pth out.safetensors``) reads the file without running code (``weights_only=True``),
takes the weights the official evaluation takes, renames them, and writes a dyntok checkpoint whose
configuration (budget, prune locations, fusion) is the one the official model was evaluated with, so that
``dyntok eval out.safetensors --dataset imagenet`` measures the published model with dyntok's accounting.
One module per official repository; docs/byo.md lists the releases and what each paper reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..methods import AdaptiveViT
from . import adavit, dvt, dynamicvit, evit
from ._official import ConversionError

__all__ = ["convert", "CONVERTERS", "ConversionError"]

#: Official source -> its converter ``(path, out, **options) -> model``.
CONVERTERS: dict[str, Callable[..., AdaptiveViT]] = {
    "dynamicvit": dynamicvit.convert,
    "evit": evit.convert,
    "adavit": adavit.convert,
    "dvt": dvt.convert,
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
