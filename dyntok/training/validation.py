"""Training settings are checked when a :class:`TrainConfig` is made: a typo fails before any data is loaded,
with the option's name and the values it accepts."""
from __future__ import annotations

from typing import Any

from ..methods.registry import check_model
from ..ranges import Interval, check_ranges

__all__ = ["TRAIN_RANGES", "OPTIONAL_SETTINGS", "check_train_settings", "check_model_settings", "option_name"]

_POSITIVE = Interval(0.0, low_open=True)
_NON_NEGATIVE = Interval(0.0)

#: Setting -> accepted values; ``None`` is also accepted for the ones in ``OPTIONAL_SETTINGS``. The benchmark
#: spec checks its ``train:`` fields with these same declarations.
TRAIN_RANGES: dict[str, Interval] = {
    "epochs": _NON_NEGATIVE,  # 0: save and evaluate the model as built or as init gave it (ToMe)
    "lr": _POSITIVE,
    "min_lr": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "warmup_epochs": _NON_NEGATIVE,
    "label_smoothing": Interval(0.0, 1.0, high_open=True),
    "save_every": Interval(0, integer=True),
    "seed": Interval(0, integer=True),
    "clip_grad": _POSITIVE,
    "ema_decay": Interval(0.0, 1.0, low_open=True, high_open=True),
}
OPTIONAL_SETTINGS = frozenset({"clip_grad", "ema_decay"})


def option_name(setting: str) -> str:
    """``'warmup_epochs'`` -> ``'warmup_epochs (--warmup-epochs)'``: readable from Python and from the shell."""
    return f"{setting} (--{setting.replace('_', '-')})"


def check_train_settings(config: Any) -> None:
    """``ValueError`` for the first setting of ``config`` (a ``TrainConfig``) outside its range."""
    check_ranges(config, TRAIN_RANGES, OPTIONAL_SETTINGS, option_name)


def check_model_settings(model: str, model_kwargs: Any) -> None:
    """``ValueError`` naming ``--model``/``--model-arg`` when the model cannot be built or is too large.

    The model is built on the meta device (shapes only), so this costs no memory and runs before any data
    is read; the class count the data will give is not known yet, so the model's own default stands in.
    """
    if not isinstance(model_kwargs, dict):
        raise ValueError(f"model_kwargs (--model-arg) must be a mapping of option names to values; "
                         f"got {model_kwargs!r}")
    try:
        check_model(model, model_kwargs)
    except ValueError as error:
        raise ValueError(f"model {model!r} (--model, --method, --model-arg): {error}") from None
