"""The held-out split a saved model was trained beside, so that fitting knobs never sees its training images.

``dyntok train`` records in every checkpoint what decides its held-out split (``holdout_size`` and ``seed``)
and a fingerprint of the training set it carved it from (:meth:`ImageTensorDataset.fingerprint`). Every
command that fits knobs on held-out images (``dyntok eval --calibrate-gmacs``, ``dyntok show
--calibrate-gmacs``, ``dyntok show --images holdout``) rebuilds exactly that split with
:func:`calibration_split`, refuses another size, and refuses a training set whose fingerprint differs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_HOLDOUT", "recorded_holdout_split", "calibration_split", "check_training_set"]

log = logging.getLogger(__name__)

#: Training images held out for a model whose checkpoint does not record its split (and by ``dyntok train``).
DEFAULT_HOLDOUT = 5000


def recorded_holdout_split(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The held-out split a checkpoint's model was trained beside, if the checkpoint says."""
    from .config import DataConfig

    if "holdout_split" in meta:
        return meta["holdout_split"]
    train_config = meta.get("train_config")  # training checkpoints of older dyntok
    data = train_config.get("data") if isinstance(train_config, dict) else None
    return DataConfig(**data).holdout_split() if isinstance(data, dict) else None


def calibration_split(checkpoint: str | Path, requested: int | float | None) -> dict[str, Any]:
    """``holdout_size``, ``seed`` and, when recorded, the training set's ``fingerprint`` of the split to fit
    knobs on: the one the model was trained beside.

    Any other split could hold images the model was trained on, so asking for one (``requested``, from
    ``--holdout-size``) is an error; a checkpoint that records no split gets ``requested`` (default
    :data:`DEFAULT_HOLDOUT`) with a warning.
    """
    from ..fileio import CheckpointError, load_meta
    from .config import DataConfig

    try:
        recorded = recorded_holdout_split(load_meta(checkpoint))
        if recorded is not None:
            DataConfig(holdout_size=recorded["holdout_size"], seed=recorded["seed"])  # the checks of a training run
    except (TypeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{checkpoint} records a damaged held-out split ({type(error).__name__}: {error}); "
                              f"use another copy of the checkpoint") from None
    if recorded is None:
        size = DEFAULT_HOLDOUT if requested is None else requested
        log.warning("%s does not record the held-out split it was trained beside; calibrating on %s images held "
                    "out with seed 0, which may include images it was trained on", checkpoint, size)
        return {"holdout_size": size, "seed": 0, "fingerprint": None}
    size, seed = recorded["holdout_size"], recorded["seed"]
    if requested is not None and requested != size:
        raise ValueError(f"{checkpoint} was trained beside a held-out split of {size} images (seed {seed}); "
                         f"calibrating on --holdout-size {requested} would fit on images it was trained on. "
                         f"Leave --holdout-size out to use its own split")
    if not size:
        raise ValueError(f"{checkpoint} was trained on the whole training set (no held-out split): there are no "
                         f"unseen training images to calibrate on; train with --holdout-size N")
    return {"holdout_size": size, "seed": seed, "fingerprint": recorded.get("fingerprint")}


def check_training_set(recorded: str | None, fingerprint: str, checkpoint: str | Path, dataset: str) -> None:
    """A ``ValueError`` when ``dataset``'s training set (``fingerprint``) is not the one ``checkpoint``'s model
    was trained on (``recorded``, None when unknown): the same split of another set is no held-out split of
    the model's."""
    if recorded is not None and recorded != fingerprint:
        raise ValueError(f"--dataset {dataset} is not the training set {checkpoint} was trained on (its labels "
                         f"fingerprint {fingerprint}, recorded {recorded}): its held-out images could be ones the "
                         f"model was trained on. Pass the dataset the model was trained on with --dataset and "
                         f"--data-root")
