"""The data layer: find datasets, hold them in memory as uint8 tensors, batch and augment them.

Quick start::

    from dyntok.data import DataConfig, build_loaders

    loaders = build_loaders(DataConfig(dataset="cifar10", batch_size=128))
    for epoch in range(epochs):
        loaders["train"].set_epoch(epoch)
        for images, labels in loaders["train"]:
            ...

See ``docs/data.md`` for where data is looked for, the decode cache and the options.
"""

from .config import DataConfig, build_loaders
from .datasets import ImageTensorDataset, holdout_split, load_dataset
from .errors import DatasetLayoutError, DatasetNotFoundError, ImageDecodeError, ImageSizeError
from .folder import default_cache_dir
from .loader import BatchLoader
from .roots import DatasetLocation, candidate_roots, find_dataset
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    EvalTransform,
    TrainTransform,
    normalize,
    random_crop_flip,
)

__all__ = [
    "BatchLoader",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DataConfig",
    "DatasetLayoutError",
    "DatasetLocation",
    "DatasetNotFoundError",
    "EvalTransform",
    "ImageDecodeError",
    "ImageSizeError",
    "ImageTensorDataset",
    "TrainTransform",
    "build_loaders",
    "candidate_roots",
    "default_cache_dir",
    "find_dataset",
    "holdout_split",
    "load_dataset",
    "normalize",
    "random_crop_flip",
]
