"""Arguments shared by several sub-commands: data options and ``key=value`` budget knobs."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ..data import DataConfig
from ..data.recorded_split import DEFAULT_HOLDOUT

#: ``--holdout-size`` of the commands that fit knobs on a saved model's held-out split.
RECORDED_HOLDOUT_HELP = (f"training images held out for calibration. Default: the split the model was trained "
                         f"beside, as its checkpoint records it (another one is refused, and so is another "
                         f"training set); {DEFAULT_HOLDOUT} for a checkpoint that does not say")


def add_data_arguments(parser: argparse.ArgumentParser, holdout_help: str | None = None) -> None:
    """Data options; ``holdout_help`` replaces the held-out split's help (its default is then None)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="cifar10",
                       help="cifar10, cifar100, or an image-folder tree (its name in a data root, or its path) "
                            "laid out as root/{train,test|val}/<class>/* (default: cifar10)")
    group.add_argument("--data-root", default=None,
                       help="where to look first; then $DYNTOK_DATA, ./data, ../shared/data")
    group.add_argument("--download", action="store_true", help="download CIFAR-10/100 with torchvision if missing")
    group.add_argument("--batch-size", type=int, default=128, help="global batch size (default: 128)")
    group.add_argument("--holdout-size", type=holdout_size, default=None if holdout_help else DEFAULT_HOLDOUT,
                       help=holdout_help or f"training images held out for calibration: a count, or a fraction "
                                            f"if < 1 (default: {DEFAULT_HOLDOUT})")


def holdout_size(text: str) -> int | float:
    """``--holdout-size``: a count (``5000``) or a fraction below 1 (``0.1``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if 0 < value < 1:
        return value
    if not (value >= 0 and value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a count of images (a whole number >= 0) or a share in (0, 1), "
                                         f"got {text!r}")
    return int(value)


def data_config(args: argparse.Namespace, **extra: Any) -> DataConfig:
    extra.setdefault("holdout_size", args.holdout_size)
    return DataConfig(dataset=args.dataset, data_root=args.data_root, download=args.download,
                      batch_size=args.batch_size, **extra)


def parse_knobs(pairs: list[str]) -> dict[str, Any]:
    """``["keep_ratio=0.7", "thresholds=[0.9,0.8]"]`` -> ``{"keep_ratio": 0.7, "thresholds": [0.9, 0.8]}``."""
    knobs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            knobs[key] = json.loads(value)
        except json.JSONDecodeError:
            knobs[key] = value
        except RecursionError:
            raise ValueError(f"the value of {key} is nested too deeply to be a setting: {pair[:40]}...") from None
    return knobs
