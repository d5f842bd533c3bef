"""In-memory datasets: one uint8 image tensor plus int64 labels, and the held-out split.

Small datasets (CIFAR, or any image-folder tree that fits in RAM) are decoded once and kept as
``(N, 3, H, W)`` uint8, so an epoch is a few tensor index operations instead of N JPEG decodes.
Our code never unpickles anything; torchvision's own CIFAR reader does that for its files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from .errors import DatasetNotFoundError
from .folder import load_split, scan_tree
from .roots import TORCHVISION_CIFAR, DatasetLocation, candidate_roots, canonical_name, find_dataset
from .seeding import seeded_generator

__all__ = ["ImageTensorDataset", "load_dataset", "holdout_split", "holdout_indices", "locate_dataset"]

Split = Literal["train", "test"]
_HOLDOUT_STREAM = 0x401D  # keeps the holdout draw independent of the loader's shuffles


@dataclass
class ImageTensorDataset:
    """Images as one ``(N, 3, H, W)`` uint8 tensor with ``(N,)`` int64 labels.

    ``source`` says where the pixels came from, e.g. to report "CIFAR-10 (JPEG copy)".
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str = ""
    indices: torch.Tensor | None = field(default=None, repr=False)  # positions in the parent, if a subset

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            got = f"{tuple(self.images.shape)} {self.images.dtype}"
            raise ValueError(f"images must be (N, 3, H, W) uint8, got {got}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            got = f"{tuple(self.labels.shape)} {self.labels.dtype}"
            raise ValueError(f"labels must be ({len(self.images)},) int64, got {got}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """Stored (height, width)."""
        return tuple(self.images.shape[2:])

    def fingerprint(self) -> str:
        """A short hash of the class names and every image's label, in order.

        The held-out split is drawn from the labels (stratified, seeded), so two training sets with the same
        fingerprint give the same split; one with another fingerprint is not the set a model was trained on.
        Hashing labels, not pixels, keeps it instant for any dataset size.
        """
        return label_fingerprint(self.classes, self.labels)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ImageTensorDataset":
        """A copy holding only ``indices`` (in that order); ``.indices`` records where they came from."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        parent = self.indices[indices] if self.indices is not None else indices
        return ImageTensorDataset(self.images[indices], self.labels[indices], self.classes, self.source, parent)


# ----------------------------------------------------------------------------- loading


def label_fingerprint(classes: Sequence[str], labels: torch.Tensor) -> str:
    """A short hash of the class names and every label, in order: what the held-out split is drawn from."""
    digest = hashlib.sha256(json.dumps(list(classes)).encode())
    digest.update(labels.numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]


def load_dataset(
    name: str,
    split: Split = "train",
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ImageTensorDataset:
    """Load one split of dataset ``name`` into memory.

    Args:
        name: ``"cifar10"``, ``"cifar100"``, the name of an image-folder tree inside a data
            root, or a path to such a tree.
        split: ``"train"`` or ``"test"`` (an image-folder tree's ``test/``, else its ``val/``).
        data_root: searched first; see ``dyntok.data.roots`` for the other places.
        download: fetch CIFAR-10/100 with torchvision into the first data root when it is
            found nowhere.
        image_size: only used when an image-folder tree's images differ in size: all are then
            resized to ``image_size x image_size`` at decode time (the loaders resize batches).
        cache, cache_dir: keep decoded image-folder splits on disk (default ``$DYNTOK_CACHE``
            or ``~/.cache/dyntok``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    location, fetch = _locate(name, data_root, download)
    if location.kind == "torchvision":
        return _load_torchvision_cifar(location, split, fetch)
    splits = scan_tree(location.path)  # lists both splits so a class mismatch is caught early
    chosen = splits[split]
    images = load_split(chosen, image_size, cache=cache, cache_dir=cache_dir)
    labels = torch.tensor(chosen.labels, dtype=torch.int64)
    return ImageTensorDataset(images, labels, chosen.classes, source=f"image folder {chosen.name}")


def locate_dataset(name: str, data_root=None, download: bool = False) -> DatasetLocation:
    """Where ``name`` is (or, with ``download``, where torchvision will put CIFAR)."""
    return _locate(name, data_root, download)[0]


def _locate(name: str, data_root, download: bool) -> tuple[DatasetLocation, bool]:
    """Where the dataset is, and whether torchvision must download it first."""
    try:
        return find_dataset(name, data_root), False
    except DatasetNotFoundError:
        if not (download and canonical_name(name) in TORCHVISION_CIFAR):
            raise
    target = candidate_roots(data_root)[0].path  # --data-root, else $DYNTOK_DATA, else ./data
    return DatasetLocation(canonical_name(name), "torchvision", target), True


def _load_torchvision_cifar(location: DatasetLocation, split: Split, download: bool) -> ImageTensorDataset:
    """Read torchvision's pickled CIFAR files (checked against their published MD5s)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    reader = {"cifar10": CIFAR10, "cifar100": CIFAR100}[location.name]
    folder = Path(location.path) / TORCHVISION_CIFAR[location.name]
    try:
        data = reader(root=str(location.path), train=split == "train", download=download)
    except (RuntimeError, OSError) as error:  # offline download, missing or corrupt batch files
        action = "Downloading" if download else "Reading"
        raise DatasetNotFoundError(
            f"{action} {location.name} in {folder} failed: {error}\n"
            f"If the files there are incomplete or corrupt, delete {folder} and use --download "
            "(download=True) where there is network, or point --data-root at a good copy."
        ) from error
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    labels = torch.as_tensor(data.targets, dtype=torch.int64)
    source = f"torchvision {location.name} files in {folder}"
    return ImageTensorDataset(images, labels, list(data.classes), source=source)


# ----------------------------------------------------------------------------- held-out split


def holdout_split(
    dataset: ImageTensorDataset, size: int | float, seed: int = 0
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Carve a seeded, class-stratified held-out part from a *training* set (for calibration).

    Args:
        size: a count (``int``) or a fraction of the dataset (``float`` in ``[0, 1)``).
        seed: the same seed always gives the same split.

    Returns:
        ``(train_part, held_part)``: disjoint, together covering ``dataset``, each in the
        original order. Each class contributes in proportion to its size (largest-remainder
        rounding), so the held part has the training set's class balance.
    """
    kept, held = holdout_indices(dataset.labels, size, seed)
    return dataset.subset(kept), dataset.subset(held)


def holdout_indices(labels: torch.Tensor, size: int | float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted positions of the training part and of the held-out part; what :func:`holdout_split` cuts.

    Only the labels decide, so the streaming path holds out exactly the images the in-memory path does.
    """
    count = _holdout_count(size, len(labels))
    held = _stratified_sample(labels, count, seeded_generator(seed, _HOLDOUT_STREAM))
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().squeeze(1), held


def _holdout_count(size: int | float, total: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"holdout size must be an int count or a float fraction, got {size!r}")
    if isinstance(size, float) and not 0.0 <= size < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {size}")
    count = round(size * total) if isinstance(size, float) else size
    if not 0 <= count < total:
        raise ValueError(f"holdout_size (--holdout-size) must leave some training data: got {count} of {total} "
                         f"images; give a smaller count or a share such as 0.1")
    return count


def _stratified_sample(labels: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``count`` items drawn per class in proportion to class size."""
    classes, class_sizes = labels.unique(return_counts=True)
    exact = class_sizes.double() * count / len(labels)
    quota = exact.floor().long()
    # Hand the rounding leftovers to the classes that lost the most (ties: lower class first).
    order = torch.argsort(exact - quota, descending=True, stable=True)
    quota[order[: count - int(quota.sum())]] += 1
    picks = []
    for cls, take in zip(classes.tolist(), quota.tolist()):
        members = (labels == cls).nonzero().squeeze(1)
        picks.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(picks).sort().values
