"""``DataConfig`` and ``build_loaders``: everything a training run needs from the data layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..ranges import Interval, check_ranges
from .datasets import ImageTensorDataset, holdout_split, load_dataset
from .loader import BatchLoader
from .transforms import EvalTransform, TrainTransform, default_normalization

__all__ = ["DataConfig", "build_loaders", "DATA_RANGES", "OPTIONAL_DATA"]

#: Numeric options and the values they accept (``None`` too for the ``OPTIONAL_DATA`` ones); checked on creation
#: and, for the benchmark spec's ``data:`` section, by the spec with these same declarations.
DATA_RANGES = {
    "batch_size": Interval(1, integer=True),
    "eval_batch_size": Interval(1, integer=True),
    "image_size": Interval(1, integer=True),
    "crop_padding": Interval(0, integer=True),
    "mixup_alpha": Interval(0.0),
    "cutmix_alpha": Interval(0.0),
    "mixup_prob": Interval(0.0, 1.0),
    "mixup_switch_prob": Interval(0.0, 1.0),
    "seed": Interval(0, integer=True),
}
OPTIONAL_DATA = frozenset({"eval_batch_size", "image_size"})
_CLI_NAMES = {"mixup_alpha": "--mixup", "cutmix_alpha": "--cutmix"}
#: ``randaugment = (num_ops, magnitude)``: torchvision's RandAugment has 31 magnitude bins (0 to 30).
_RANDAUGMENT = (Interval(0, 16, integer=True), Interval(0, 30, integer=True))
#: Options that moved elsewhere but that run records written before still carry: ignored when read back.
#: ``label_smoothing`` is the loss's (``TrainConfig``), handed to :func:`build_loaders` for mixup's targets.
_RETIRED = frozenset({"label_smoothing"})


def _option_name(name: str) -> str:
    """``'mixup_alpha'`` -> ``'mixup_alpha (--mixup)'``: readable from Python and from the shell."""
    return f"{name} ({_CLI_NAMES.get(name, '--' + name.replace('_', '-'))})"


@dataclass
class DataConfig:
    """What to load and how to batch and augment it. Plain values, so it round-trips via JSON/YAML.

    Dataset:
        dataset: ``"cifar10"``, ``"cifar100"``, an image-folder tree's name in a data root, or its path.
        data_root: searched before ``$DYNTOK_DATA``, ``./data`` and ``../shared/data``.
        download: let torchvision fetch CIFAR-10/100 when it is found nowhere.
        image_size: model input size; batches are resized to it when the stored size differs
            (and a tree whose images differ in size is stored at this size). None: stored size.
        cache_dir: decode cache (default ``$DYNTOK_CACHE`` or ``~/.cache/dyntok``).
    Splits and batching:
        holdout_size: images (int) or fraction (float) of the training set held out for
            calibration, stratified by class; 0 disables it.
        seed: seeds the holdout split, the shuffles and the augmentation.
        batch_size / eval_batch_size: per-rank batch sizes (eval defaults to batch_size).
        drop_last: drop the incomplete last training batch (always kept for evaluation).
    Augmentation (training only):
        crop_padding, padding_mode: random crop with this padding (``"reflect"``/``"zero"``/``"edge"``).
        hflip: random horizontal flip.
        randaugment: ``[num_ops, magnitude]`` for torchvision's RandAugment, e.g. ``[2, 9]``; None = off.
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: ``timm.data.Mixup`` options. With
            mixup or cutmix on, training targets are soft ``(B, num_classes)`` floats with the label
            smoothing :func:`build_loaders` is given already applied.
        mean, std: normalisation; None = the dataset's defaults (CIFAR-100's for cifar100,
            CIFAR-10's otherwise). Pass a pretrained model's values when fine-tuning one.
    """

    dataset: str = "cifar10"
    data_root: str | None = None
    download: bool = False
    image_size: int | None = None
    cache_dir: str | None = None
    holdout_size: int | float = 0.1
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int | None = None
    drop_last: bool = True
    crop_padding: int = 4
    padding_mode: str = "reflect"
    hflip: bool = True
    randaugment: tuple[int, int] | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        # JSON/YAML give lists; keep tuples so configs compare and hash predictably.
        for name in ("randaugment", "mean", "std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        check_ranges(self, DATA_RANGES, OPTIONAL_DATA, _option_name)
        _check_holdout_size(self.holdout_size)
        if self.randaugment is not None:
            if len(self.randaugment) != 2:
                raise ValueError(f"randaugment (--randaugment) must be two whole numbers, OPS and MAGNITUDE; "
                                 f"got {list(self.randaugment)}")
            for part, accepted, value in zip(("OPS", "MAGNITUDE"), _RANDAUGMENT, self.randaugment):
                accepted.check(f"randaugment (--randaugment) {part}", value)

    @property
    def mixup(self) -> bool:
        """True when mixup or cutmix is on, i.e. training targets are soft."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        default_mean, default_std = default_normalization(self.dataset)
        return self.mean or default_mean, self.std or default_std

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        """Build from a dict (e.g. a YAML section or a run record), naming any unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in values.items() if key not in _RETIRED}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data options {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def holdout_split(self) -> dict[str, Any]:
        """What decides which training images are held out (with the dataset's contents).

        Trained models record it, so that calibration rebuilds exactly this split and never fits a knob on
        images the model was trained on.
        """
        return {"dataset": self.dataset, "holdout_size": self.holdout_size, "seed": self.seed}


def _check_holdout_size(value: Any) -> None:
    """An image count (a whole number >= 0) or a share of the training set in (0, 1)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return
    Interval(0.0, 1.0, high_open=True).check(f"{_option_name('holdout_size')} as a share (a count is a whole number)",
                                             value)


def build_loaders(
    config: DataConfig,
    rank: int = 0,
    world_size: int = 1,
    shard_eval: bool = False,
    device: torch.device | str | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, Any]:
    """Load ``config.dataset`` and build its loaders.

    ``label_smoothing`` is the loss's; with mixup or cutmix on it is folded into the soft training targets.

    Returns a dict with:
        ``"train"``: shuffled, augmented, sharded over ``world_size`` ranks (call ``set_epoch``);
        ``"holdout"``: the held-out part of the training set, eval transform (None if
        ``holdout_size`` is 0);
        ``"test"``: the test (or val) split, eval transform;
        ``"num_classes"``, ``"class_names"``, ``"source"`` (where the pixels came from), ``"fingerprint"``
        (of the training set, :meth:`ImageTensorDataset.fingerprint`).

    Evaluation loaders are not sharded unless ``shard_eval`` (then every image is seen exactly
    once across ranks, and per-rank results must be gathered): by default each rank scores the
    whole split, so a rank-0-only evaluation reports the full split's metrics.
    """
    load = dict(data_root=config.data_root, download=config.download, image_size=config.image_size,
                cache_dir=config.cache_dir)
    train_set = load_dataset(config.dataset, "train", **load)
    test_set = load_dataset(config.dataset, "test", **load)
    train_part, held_part = holdout_split(train_set, config.holdout_size, config.seed)
    mean, std = config.normalization()
    evaluation = EvalTransform(mean, std, config.image_size)
    eval_shard = dict(rank=rank, world_size=world_size) if shard_eval else {}

    def eval_loader(dataset: ImageTensorDataset) -> BatchLoader:
        return BatchLoader(dataset, config.eval_batch_size or config.batch_size, evaluation,
                           even_shards=False, device=device, **eval_shard)

    train = BatchLoader(train_part, config.batch_size,
                        _train_transform(config, train_set.num_classes, label_smoothing),
                        shuffle=True, drop_last=config.drop_last, seed=config.seed, rank=rank,
                        world_size=world_size, device=device)
    return {
        "train": train,
        "holdout": eval_loader(held_part) if len(held_part) else None,
        "test": eval_loader(test_set),
        "num_classes": train_set.num_classes,
        "class_names": list(train_set.classes),
        "source": train_set.source,
        "fingerprint": train_set.fingerprint(),
    }


def _train_transform(config: DataConfig, num_classes: int, label_smoothing: float) -> TrainTransform:
    mean, std = config.normalization()
    return TrainTransform(
        mean, std, config.image_size,
        crop_padding=config.crop_padding, padding_mode=config.padding_mode, hflip=config.hflip,
        randaugment=config.randaugment, mixup=_mixup(config, num_classes, label_smoothing),
    )


def _mixup(config: DataConfig, num_classes: int, label_smoothing: float):
    if not config.mixup:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, prob=config.mixup_prob,
                 switch_prob=config.mixup_switch_prob, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)
