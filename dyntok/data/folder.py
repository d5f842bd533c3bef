"""Image-folder trees: scanning, decoding to one uint8 tensor, and the on-disk decode cache.

Decoding 60,000 small JPEGs takes a minute on a laptop core, so a split is decoded once into a
``(N, 3, H, W)`` uint8 tensor and saved to the cache (safetensors: no pickle, safe to load).
The cache key covers the split's path, its file list and every file's size and mtime, so
touching, adding or removing any image re-decodes it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from ..progress import progress_bar

from ..fileio import WRITE_ERRORS, atomic_write
from .errors import DatasetLayoutError, DatasetNotFoundError, ImageDecodeError, ImageSizeError

__all__ = [
    "CACHE_ENV_VAR",
    "IMAGE_EXTENSIONS",
    "FolderSplit",
    "scan_tree",
    "decode_images",
    "default_cache_dir",
    "load_split",
]

CACHE_ENV_VAR = "DYNTOK_CACHE"
CACHE_FORMAT = "dyntok-image-cache-v1"  # bump when the stored layout changes
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"})
EVAL_SPLIT_NAMES = ("test", "val")  # "test" wins when a tree has both


@dataclass(frozen=True)
class FolderSplit:
    """One split of a tree as listed on disk: sorted classes, and files in (class, name) order."""

    directory: Path
    classes: list[str]
    files: list[str]  # full paths
    labels: list[int]

    @property
    def name(self) -> str:
        """``<tree>/<split>`` (``cifar10/train``): how reports name the split, never by a path of this machine."""
        return f"{self.directory.parent.name}/{self.directory.name}"


# ----------------------------------------------------------------------------- scanning


def scan_tree(tree: Path) -> dict[str, FolderSplit]:
    """List ``tree``'s ``train`` and evaluation split and check they agree.

    Returns ``{"train": ..., "test": ...}``; "test" is ``tree/test`` or, failing that, ``tree/val``.
    Raises ``DatasetLayoutError`` describing the expected layout when the tree does not fit it.
    """
    tree = Path(tree)
    if not tree.is_dir():
        raise DatasetNotFoundError(f"Dataset folder {str(tree)!r} does not exist.")
    if not (tree / "train").is_dir():
        raise DatasetLayoutError(f"{tree} has no train/ folder.")
    eval_dir = next((tree / name for name in EVAL_SPLIT_NAMES if (tree / name).is_dir()), None)
    if eval_dir is None:
        raise DatasetLayoutError(f"{tree} has no test/ or val/ folder.")
    train, test = scan_split(tree / "train"), scan_split(eval_dir)
    if train.classes != test.classes:
        raise DatasetLayoutError(_class_mismatch(train, test))
    return {"train": train, "test": test}


def scan_split(directory: Path) -> FolderSplit:
    """List ``directory/<class>/<image>``; every class folder must hold at least one image."""
    # Plain strings rather than Path objects: pathlib costs seconds on 60,000 files.
    directory = Path(directory)
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetLayoutError(f"{directory} has no class folders.")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(directory, name)
        entries = [e for e in os.scandir(class_dir)
                   if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
        broken = [e.path for e in entries if e.is_symlink() and not e.is_file()]
        if broken:  # skipping them would silently train on fewer images than the user put there
            raise ImageDecodeError(broken[0], FileNotFoundError(f"a link to {os.readlink(broken[0])!r}, "
                                                                f"which does not exist"))
        images = sorted(e.path for e in entries if e.is_file())
        if not images:
            raise DatasetLayoutError(
                f"Class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})."
            )
        files += images
        labels += [label] * len(images)
    return FolderSplit(directory, classes, files, labels)


def _class_mismatch(train: FolderSplit, test: FolderSplit) -> str:
    only_train = sorted(set(train.classes) - set(test.classes))
    only_test = sorted(set(test.classes) - set(train.classes))
    return (
        f"The class folders of {train.directory} and {test.directory} differ "
        f"(only in {train.directory.name}/: {only_train or 'none'}; "
        f"only in {test.directory.name}/: {only_test or 'none'})."
    )


# ----------------------------------------------------------------------------- decoding


def read_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """Decode one image to an ``(H, W, 3)`` uint8 array, resized to ``size x size`` if given."""
    image = open_rgb(path)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def open_rgb(path: str | Path) -> Image.Image:
    """Decode one image to an 8-bit RGB PIL image; any failure is an ``ImageDecodeError`` naming the file."""
    try:
        with Image.open(path) as image:
            return _to_rgb(image)  # forces the full decode: truncation fails here
    except Exception as error:  # PIL raises many types for bad files; all mean "bad file"
        raise ImageDecodeError(path, error) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: grey is repeated, alpha and palettes dropped, deep images scaled.

    PIL's own ``convert`` clips 16-bit greys to 0..255, which would turn most of a 16-bit PNG white:
    scale them to 8 bits first. Float images have no agreed range, so they are refused, not guessed.
    """
    if image.mode == "F":
        raise ValueError("floating-point images have no agreed pixel range; convert them to 8-bit first")
    if image.mode == "I" or image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"{image.mode} image with values outside 0..65535; convert it to 8-bit first")
        deep = image.mode.startswith("I;16") or pixels.max() > 255
        eight_bit = np.round(pixels / 257.0) if deep else pixels
        image = Image.fromarray(eight_bit.astype(np.uint8), mode="L")
    return image.convert("RGB")


def decode_images(paths: Sequence[str | Path], image_size: int | None = None, desc: str = "decoding") -> torch.Tensor:
    """Decode ``paths`` into one ``(N, 3, H, W)`` uint8 tensor, with a progress bar.

    Images are kept at their own size when they all share one. When they differ, they are all
    resized to ``image_size x image_size``; without ``image_size`` that is an ``ImageSizeError``.
    """
    out: np.ndarray | None = None
    forced_size = None  # set once sizes turn out to differ
    with progress_bar(paths, desc=desc, unit="img", mininterval=1.0) as progress:
        for index, path in enumerate(progress):
            pixels = read_rgb(path, forced_size)
            if out is None:
                out = np.empty((len(paths), 3, *pixels.shape[:2]), dtype=np.uint8)
            elif pixels.shape[:2] != out.shape[2:]:
                if image_size is None:
                    raise ImageSizeError(_size_mismatch(path, pixels, paths[0], out))
                forced_size = image_size
                out = _resize_decoded(out, index, image_size)
                pixels = read_rgb(path, forced_size)
            out[index] = pixels.transpose(2, 0, 1)
    if out is None:
        raise ValueError("decode_images() got no paths")
    return torch.from_numpy(out)


def _resize_decoded(out: np.ndarray, count: int, size: int) -> np.ndarray:
    """Re-home the first ``count`` decoded images into a ``size x size`` array (rare path)."""
    resized = np.empty((len(out), 3, size, size), dtype=np.uint8)
    for index in range(count):
        image = Image.fromarray(out[index].transpose(1, 2, 0))
        resized[index] = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    return resized


def _size_mismatch(path, pixels: np.ndarray, first, out: np.ndarray) -> str:
    (h, w), (h0, w0) = pixels.shape[:2], out.shape[2:]
    return (
        f"{path} is {w}x{h} pixels but {first} is {w0}x{h0}. Images are stored as one tensor, "
        "so they must share a size: pass image_size=N (dyntok train --image-size N, or image_size: N in a "
        "benchmark spec's data section) to resize all of them to NxN when decoding."
    )


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$DYNTOK_CACHE``, else ``~/.cache/dyntok``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or "~/.cache/dyntok").expanduser()


def _fingerprint(split: FolderSplit, image_size: int | None) -> str:
    """Hash of everything the decoded tensor depends on: path, files, sizes, mtimes, resize."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{split.directory.resolve()}\n{image_size}\n".encode())
    skip = len(str(split.directory)) + 1  # hash paths relative to the split folder
    for path, label in zip(split.files, split.labels):
        stat = os.stat(path)
        digest.update(f"{path[skip:]}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_prefix(split: FolderSplit) -> str:
    """File-name prefix shared by every cache entry of one split folder (used to prune old ones)."""
    where = hashlib.sha256(str(split.directory.resolve()).encode()).hexdigest()[:8]
    return f"{split.directory.parent.name}-{split.directory.name}-{where}-"


def _read_cache(path: Path, count: int) -> torch.Tensor | None:
    """The cached images, or None when absent or unusable (a bad cache is only re-decoded)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        images = load_file(path)["images"]
    except Exception as error:
        warnings.warn(f"Ignoring unreadable cache file {path} ({error}); decoding again.", stacklevel=3)
        return None
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != count:
        warnings.warn(f"Ignoring cache file {path} with unexpected contents; decoding again.", stacklevel=3)
        return None
    return images


def _write_cache(path: Path, images: torch.Tensor, split: FolderSplit) -> None:
    """Save atomically (tmp file + rename) so a crash never leaves a half-written entry."""
    from safetensors.torch import save_file

    metadata = {"format": CACHE_FORMAT, "source": str(split.directory)}
    try:
        with atomic_write(path) as tmp:
            save_file({"images": images.contiguous()}, tmp, metadata=metadata)
    except WRITE_ERRORS as error:  # the cache only saves time; a read-only home must not stop a run
        warnings.warn(f"Could not write the decode cache {path} ({error}); continuing without it.", stacklevel=3)
        return
    for stale in path.parent.glob(f"{_cache_prefix(split)}*.safetensors"):
        if stale != path:
            stale.unlink(missing_ok=True)


def load_split(
    split: FolderSplit,
    image_size: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Decoded ``(N, 3, H, W)`` uint8 images of ``split``, from the cache when it is current."""
    if not cache:
        return decode_images(split.files, image_size, desc=f"decoding {split.directory}")
    key = _fingerprint(split, image_size)
    path = Path(cache_dir or default_cache_dir()) / f"{_cache_prefix(split)}{key[:16]}.safetensors"
    images = _read_cache(path, len(split.files))
    if images is None:
        images = decode_images(split.files, image_size, desc=f"decoding {split.directory}")
        _write_cache(path, images, split)
    return images
