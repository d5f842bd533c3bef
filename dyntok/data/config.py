"""``DataConfig`` and ``build_loaders``: everything a training run needs from the data layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..ranges import Choice, Interval, check_ranges
from .datasets import ImageTensorDataset, holdout_indices, holdout_split, load_dataset, locate_dataset
from .folder import scan_tree
from .loader import BatchLoader
from .sizing import DATA_PATHS, choose_data_path
from .transforms import EvalTransform, TrainTransform, default_normalization

__all__ = ["DataConfig", "build_loaders", "resolve_data_path", "DATA_RANGES", "OPTIONAL_DATA"]

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
    "crop_pct": Interval(0.0, 1.0, low_open=True),
    "random_erasing": Interval(0.0, 1.0),
    "rrc_scale": Interval(0.0, 1.0, low_open=True, length=2),
    "data_path": Choice(DATA_PATHS),
    "memory_budget_gb": Interval(0.0),
    "num_workers": Interval(0, integer=True),
}
OPTIONAL_DATA = frozenset({"eval_batch_size", "image_size", "memory_budget_gb"})
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
    Where the pixels live (docs/data.md, "Two data paths"):
        data_path: ``"memory"`` decodes every split once into RAM (fast; CIFAR always); ``"stream"`` decodes
            each batch from disk in ``num_workers`` processes; ``"auto"`` streams when the decoded splits
            would not fit in ``memory_budget_gb``.
        memory_budget_gb: RAM one process may fill with decoded images; None: half of the available memory,
            shared by the processes of this machine.
        num_workers: decoding processes of the streaming path.
    Splits and batching:
        holdout_size: images (int) or fraction (float) of the training set held out for
            calibration, stratified by class; 0 disables it.
        seed: seeds the holdout split, the shuffles and the augmentation.
        batch_size / eval_batch_size: per-rank batch sizes (eval defaults to batch_size).
        drop_last: drop the incomplete last training batch (always kept for evaluation).
    Augmentation (training only):
        crop_padding, padding_mode: in memory, a random crop with this padding (``"reflect"``/``"zero"``/``"edge"``).
        rrc_scale: streaming, timm's ``RandomResizedCrop`` with this range of areas (it replaces the padded crop).
        hflip: random horizontal flip.
        random_erasing: probability of timm's random erasing (per-pixel noise), after normalisation.
        randaugment: ``[num_ops, magnitude]`` for torchvision's RandAugment, e.g. ``[2, 9]``; None = off.
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: ``timm.data.Mixup`` options. With
            mixup or cutmix on, training targets are soft ``(B, num_classes)`` floats with the label
            smoothing :func:`build_loaders` is given already applied.
        mean, std: normalisation; None = the dataset's defaults (CIFAR-100's for cifar100,
            CIFAR-10's otherwise). Pass a pretrained model's values when fine-tuning one.
    Evaluation:
        crop_pct: the centre share of the image kept (timm's ``crop_pct``; 0.875 for DeiT's weights): streaming
            resizes the shorter side to ``image_size / crop_pct`` and crops the centre; in memory the centre
            ``crop_pct`` of the stored image is cropped and resized. 1.0: the whole image.
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
    data_path: str = "auto"
    memory_budget_gb: float | None = None
    num_workers: int = 4
    crop_padding: int = 4
    padding_mode: str = "reflect"
    hflip: bool = True
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    random_erasing: float = 0.0
    randaugment: tuple[int, int] | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        # JSON/YAML give lists; keep tuples so configs compare and hash predictably.
        for name in ("randaugment", "mean", "std", "rrc_scale"):
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

    def eval_transform(self) -> dict[str, Any]:
        """What the model's inputs looked like at evaluation (normalisation and crop), recorded with trained
        models so that ``dyntok eval`` feeds them the same."""
        mean, std = self.normalization()
        return {"mean": list(mean), "std": list(std), "crop_pct": self.crop_pct}

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
    location = locate_dataset(config.dataset, config.data_root, config.download)
    splits = scan_tree(location.path) if location.kind == "folder" else None
    if _data_path(config, splits) == "stream":
        return _stream_loaders(config, splits, rank, world_size, shard_eval, device, label_smoothing)
    load = dict(data_root=config.data_root, download=config.download, image_size=config.image_size,
                cache_dir=config.cache_dir)
    train_set = load_dataset(config.dataset, "train", **load)
    test_set = load_dataset(config.dataset, "test", **load)
    train_part, held_part = holdout_split(train_set, config.holdout_size, config.seed)
    mean, std = config.normalization()
    evaluation = EvalTransform(mean, std, config.image_size, crop_pct=config.crop_pct)
    eval_shard = dict(rank=rank, world_size=world_size) if shard_eval else {}

    def eval_loader(dataset: ImageTensorDataset) -> BatchLoader:
        return BatchLoader(dataset, config.eval_batch_size or config.batch_size, evaluation,
                           even_shards=False, device=device, **eval_shard)

    train = BatchLoader(train_part, config.batch_size,
                        _train_transform(config, train_set.num_classes, label_smoothing),
                        shuffle=True, drop_last=config.drop_last, seed=config.seed, rank=rank,
                        world_size=world_size, device=device)
    return _loaders(train, eval_loader(held_part) if len(held_part) else None, eval_loader(test_set), train_set)


def resolve_data_path(config: DataConfig) -> str:
    """``"memory"`` or ``"stream"``: ``config.data_path``, or for ``"auto"`` what the dataset's size allows."""
    location = locate_dataset(config.dataset, config.data_root, config.download)
    return _data_path(config, scan_tree(location.path) if location.kind == "folder" else None)


def _data_path(config: DataConfig, splits: dict | None) -> str:
    """The path for a scanned image-folder tree's ``splits``, or for torchvision's CIFAR files (None)."""
    if splits is None:  # CIFAR's pickled files: 180 MB, always in memory
        if config.data_path == "stream":
            raise ValueError(f"{config.dataset} is read from torchvision's files, which are held in memory; "
                             f"streaming reads image-folder trees (use --data-path memory or auto)")
        return "memory"
    files = splits["train"].files + splits["test"].files
    return choose_data_path(config.data_path, files, config.image_size, config.memory_budget_gb)


def _stream_loaders(config: DataConfig, splits: dict, rank: int, world_size: int, shard_eval: bool,
                    device, label_smoothing: float) -> dict[str, Any]:
    """The streaming path's loaders: same splits and held-out images as in memory, decoded by workers."""
    from .stream import StreamLoader, files_of, stream_eval_transform, stream_train_transform

    if config.image_size is None:
        raise ValueError("the streaming path crops every image to the model's input size: set image_size "
                         "(--image-size)")
    train_set, test_set = files_of(splits["train"]), files_of(splits["test"])
    kept, held = holdout_indices(train_set.labels, config.holdout_size, config.seed)
    evaluation = stream_eval_transform(config, config.image_size)
    eval_shard = dict(rank=rank, world_size=world_size) if shard_eval else {}

    def eval_loader(files) -> StreamLoader:
        return StreamLoader(files, config.eval_batch_size or config.batch_size, evaluation, even_shards=False,
                            num_workers=config.num_workers, device=device, **eval_shard)

    train = StreamLoader(train_set.subset(kept), config.batch_size, stream_train_transform(config, config.image_size),
                         shuffle=True, drop_last=config.drop_last, seed=config.seed, rank=rank,
                         world_size=world_size, num_workers=config.num_workers,
                         mixup=_mixup(config, train_set.num_classes, label_smoothing), device=device)
    holdout = eval_loader(train_set.subset(held)) if len(held) else None
    return _loaders(train, holdout, eval_loader(test_set), train_set)


def _loaders(train, holdout, test, train_set) -> dict[str, Any]:
    return {"train": train, "holdout": holdout, "test": test, "num_classes": train_set.num_classes,
            "class_names": list(train_set.classes), "source": train_set.source,
            "fingerprint": train_set.fingerprint()}


def _train_transform(config: DataConfig, num_classes: int, label_smoothing: float) -> TrainTransform:
    mean, std = config.normalization()
    return TrainTransform(
        mean, std, config.image_size,
        crop_padding=config.crop_padding, padding_mode=config.padding_mode, hflip=config.hflip,
        randaugment=config.randaugment, random_erasing=config.random_erasing,
        mixup=_mixup(config, num_classes, label_smoothing),
    )


def _mixup(config: DataConfig, num_classes: int, label_smoothing: float):
    if not config.mixup:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, prob=config.mixup_prob,
                 switch_prob=config.mixup_switch_prob, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)
