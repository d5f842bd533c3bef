"""The streaming path: images decoded from disk in DataLoader worker processes, for data that does not fit in RAM.

ImageNet-1k decoded at 224 px is ~190 GB, so each batch is read and augmented from the JPEGs by worker
processes with timm's transforms (``RandomResizedCrop``, RandAugment, random erasing; the eval transform's
resize and centre crop by ``crop_pct``) and ``timm.data.Mixup`` on the collated batch. The loader keeps the
in-memory ``BatchLoader``'s contract:

* the epoch's order is the in-memory loader's permutation seeded by ``(seed, epoch)``, sharded as
  ``DistributedSampler`` shards: rank ``r`` of ``W`` takes every W-th image of it, so the ``W`` ranks'
  batch ``k`` together hold the global batch ``k`` of a single process;
* every image's augmentation is seeded by ``(seed, epoch, position in the epoch's order)``, so it does not
  depend on the rank, the number of ranks or workers, or which batches ran before;
* ``iterate(start_batch=k)`` yields batches ``k, k+1, ...`` exactly as an uninterrupted epoch would.

The image list, class order and held-out split are those of the in-memory path (``scan_tree``,
``holdout_indices``), so the two paths evaluate on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import label_fingerprint
from .errors import ImageDecodeError
from .folder import open_rgb
from .loader import BatchLoader
from .seeding import all_seeded, numpy_seeded

__all__ = ["FileDataset", "StreamLoader", "stream_eval_transform", "stream_train_transform"]

_AUGMENT_STREAM, _MIXUP_STREAM = 0xA06, 3


@dataclass(frozen=True)
class FileDataset:
    """Image files and their labels (a split, or the part of one kept after the held-out split)."""

    files: list[str]
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """The in-memory dataset's fingerprint of the same split (classes and labels): one split, one hash."""
        return label_fingerprint(self.classes, self.labels)

    def subset(self, indices: torch.Tensor) -> "FileDataset":
        return FileDataset([self.files[i] for i in indices.tolist()], self.labels[indices], self.classes,
                           self.source)


def stream_train_transform(config, image_size: int) -> Callable:
    """timm's ImageNet training transform for ``config`` (a ``DataConfig``): PIL image -> normalised tensor."""
    from timm.data import create_transform

    mean, std = config.normalization()
    auto_augment = None
    if config.randaugment is not None:  # DeiT's policy, with the count and magnitude asked for
        num_ops, magnitude = config.randaugment
        auto_augment = f"rand-m{magnitude}-n{num_ops}-mstd0.5-inc1"
    transform = create_transform(image_size, is_training=True, scale=tuple(config.rrc_scale),
                                 hflip=0.5 if config.hflip else 0.0, color_jitter=None, auto_augment=auto_augment,
                                 interpolation="bicubic", mean=mean, std=std, re_prob=config.random_erasing,
                                 re_mode="pixel", re_count=1)
    return keep_a_bit_when_posterizing(transform)


def keep_a_bit_when_posterizing(transform):
    """Make the RandAugment in timm's ``transform`` keep at least 1 bit when it posterizes.

    timm clips RandAugment's noisy magnitude to [0, 10], and at 10 its increasing posterize keeps 0 bits (a
    black image), which Pillow >= 10 refuses (``ValueError: bits must be between or equal to 1 and 8``):
    about one image in 300 at m9/mstd0.5 would stop training. Only this transform's op is changed.
    """
    from timm.data.auto_augment import RandAugment

    for step in getattr(transform, "transforms", ()):
        for op in step.ops if isinstance(step, RandAugment) else ():
            if op.name == "PosterizeIncreasing":
                op.level_fn = _posterize_bits
    return transform


def _posterize_bits(level: float, hparams) -> tuple[int]:
    return (max(1, 4 - int(level / 10 * 4)),)  # timm's mapping (4 bits at level 0, down to 0 at 10), floored at 1


def stream_eval_transform(config, image_size: int) -> Callable:
    """Resize the shorter side to ``image_size / crop_pct`` (bicubic), centre-crop, normalise: timm's eval."""
    from timm.data import create_transform

    mean, std = config.normalization()
    return create_transform(image_size, is_training=False, crop_pct=config.crop_pct, interpolation="bicubic",
                            mean=mean, std=std)


@dataclass(frozen=True)
class _DecodeFailure:
    """A bad file met in a worker; carried to the main process so it raises ``ImageDecodeError`` itself
    (DataLoader would re-raise it as a RuntimeError wrapping a formatted traceback)."""

    path: str
    cause: BaseException


class _Samples(Dataset):
    """``dataset[(index, key)]`` -> the image at ``index``, transformed under RNGs seeded from ``key``."""

    def __init__(self, files: FileDataset, transform: Callable):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, tuple[int, ...]]):
        index, key = item
        try:
            image = open_rgb(self.files.files[index])
        except ImageDecodeError as error:
            return _DecodeFailure(error.path, error.__cause__ or error)
        with all_seeded(*key, _AUGMENT_STREAM):
            return self.transform(image), self.files.labels[index]


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor] | _DecodeFailure:
    failure = next((sample for sample in samples if isinstance(sample, _DecodeFailure)), None)
    if failure is not None:
        return failure
    images, labels = zip(*samples)
    return torch.stack(images), torch.stack(labels)


class StreamLoader(BatchLoader):
    """Batches of ``files`` decoded and transformed by ``num_workers`` processes.

    The order, the sharding over ranks (``DistributedSampler``'s: rank ``r`` takes every ``world_size``-th
    image of the epoch's permutation, padded or cut to equal shards), ``len`` and ``set_epoch`` are
    ``BatchLoader``'s, so both paths visit the training images in the same order.

    Args:
        files: the images and labels.
        batch_size, shuffle, drop_last, seed, rank, world_size, even_shards, device: as ``BatchLoader``.
        transform: PIL image -> float tensor ``(3, S, S)`` (``stream_train_transform`` / ``stream_eval_transform``).
        num_workers: decoding processes (0: decode in this process).
        mixup: a ``timm.data.Mixup`` applied to each collated batch (training); targets become soft.
    """

    def __init__(self, files: FileDataset, batch_size: int, transform: Callable, *, num_workers: int = 0,
                 mixup=None, **sharding):
        self.mixup, self.num_workers = mixup, num_workers
        super().__init__(files, batch_size, transform, **sharding)

    @property
    def soft_targets(self) -> bool:
        return self.mixup is not None

    def _batches(self, start_batch: int) -> list[list[tuple[int, tuple[int, ...]]]]:
        """Batches ``start_batch..`` as lists of ``(index, key)``; the key holds the image's global position."""
        indices = self.shard_indices().tolist()
        batches = []
        for batch in range(start_batch, len(self)):
            first = batch * self.batch_size
            positions = range(first, min(first + self.batch_size, len(indices)))
            # Rank r's i-th image sits at position i * world_size + r of the epoch's order on every rank count.
            batches.append([(indices[i], (self.seed, self.epoch, i * self.world_size + self.rank))
                            for i in positions])
        return batches

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch, start_batch + 1, ...`` of the current epoch."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        # Pinned batches copy to the GPU asynchronously (the trainer moves them there itself).
        pin = torch.cuda.is_available() if self.device is None else torch.device(self.device).type == "cuda"
        loader = DataLoader(_Samples(self.dataset, self.transform), batch_sampler=self._batches(start_batch),
                            num_workers=self.num_workers, collate_fn=_collate, pin_memory=pin,
                            persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        for batch, collated in enumerate(loader, start=start_batch):
            if isinstance(collated, _DecodeFailure):
                raise ImageDecodeError(collated.path, collated.cause)
            images, labels = (t.to(self.device, non_blocking=True) for t in collated) if self.device else collated
            if self.mixup is not None:
                with numpy_seeded(self.seed, self.epoch, batch, self.rank, _MIXUP_STREAM):  # Mixup uses np.random
                    images, labels = self.mixup(images, labels)
            yield images, labels

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.dataset)} files, batch_size={self.batch_size}, "
                f"batches={len(self)}, shuffle={self.shuffle}, workers={self.num_workers}, "
                f"rank={self.rank}/{self.world_size}, transform={self.transform!r})")


def files_of(split) -> FileDataset:
    """The files and labels of a scanned ``FolderSplit``."""
    return FileDataset(list(split.files), torch.tensor(split.labels, dtype=torch.int64), list(split.classes),
                       source=f"image folder {split.name} (streamed)")
