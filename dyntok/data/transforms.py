"""Batch transforms on uint8 image tensors: vectorised, seeded, device-agnostic.

A transform maps a uint8 batch ``(B, 3, H, W)`` and its int64 labels to the model's input:
float32 ``(B, 3, S, S)`` normalised images and labels (or soft targets under mixup). Random
choices come from generators keyed by ``(seed, epoch, batch_index, rank)`` (see ``seeding``),
so a batch is the same whether it is produced in order or on its own after a resume.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .seeding import all_seeded, numpy_seeded, seeded_generator, torch_seeded

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "default_normalization",
    "normalize",
    "random_crop_flip",
    "EvalTransform",
    "TrainTransform",
]

# Per-channel statistics of the training sets (std over all pixels, not the oft-copied
# per-image average 0.2023/0.1994/0.2010).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

PADDING_MODES = ("reflect", "zero", "edge")
# Separate streams so e.g. enabling RandAugment does not change the crops.
_CROP_STREAM, _RANDAUGMENT_STREAM, _MIXUP_STREAM, _ERASING_STREAM = 1, 2, 3, 4

BatchKey = Sequence[int]


def default_normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CIFAR-100's mean/std for ``cifar100``, CIFAR-10's for everything else."""
    from .roots import canonical_name

    if canonical_name(dataset) == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    return CIFAR10_MEAN, CIFAR10_STD


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], size: int | None = None
) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(B, 3, size, size)`` with ``(x / 255 - mean) / std``.

    Resizing (bilinear, antialiased) happens only when ``size`` differs from the stored size,
    e.g. 32x32 CIFAR fed to a 224x224 ViT; on a GPU batch this costs next to nothing.
    """
    x = images.to(torch.float32, copy=True)  # a copy even for float input: modified in place below
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    shift = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) * 255
    scale = 1 / (torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) * 255)
    return x.sub_(shift).mul_(scale)  # x is a fresh tensor: in place is safe and saves copies


def random_crop_flip(
    images: torch.Tensor,
    padding: int,
    generator: torch.Generator,
    padding_mode: str = "reflect",
    flip: bool = True,
) -> torch.Tensor:
    """``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` for a whole batch at once.

    Instead of padding and slicing image by image, every output pixel's source row and column
    is computed (shift, mirror for the flip, reflect/clamp at the borders) and the batch is
    gathered in one indexing op. Works for any dtype; randomness is drawn on the CPU so the
    result does not depend on the device.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    b, _, h, w = images.shape
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} needs images larger than {padding}px, got {h}x{w}")
    shifts = torch.randint(-padding, padding + 1, (2, b, 1), generator=generator)
    flipped = torch.rand(b, 1, generator=generator) < 0.5 if flip else torch.zeros(b, 1, dtype=torch.bool)
    rows = torch.arange(h) + shifts[0]  # (B, H): source row of each output row
    cols = torch.arange(w) + shifts[1]
    cols = torch.where(flipped, cols.flip(1), cols)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    if padding_mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    out = _gather(images, rows.to(images.device), cols.to(images.device))
    if padding_mode == "zero":
        out = out.masked_fill(~inside[:, None].to(images.device), 0)
    return out


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror out-of-range indices like ``F.pad(mode='reflect')`` (edge pixel not repeated)."""
    index = index.abs()
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


def _gather(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[b, c, i, j] = images[b, c, rows[b, i], cols[b, j]]``."""
    # One gather over flattened pixels: several times faster than advanced indexing.
    b, c, h, w = images.shape
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, h * w).gather(2, flat).view(b, c, h, w)


def center_crop(images: torch.Tensor, crop_pct: float) -> torch.Tensor:
    """The centre ``crop_pct`` of each side of a ``(B, C, H, W)`` batch (a view; the whole batch at 1.0)."""
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h * crop_pct)), max(1, round(w * crop_pct))
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top:top + ch, left:left + cw]


class EvalTransform:
    """Centre-crop ``crop_pct`` of the image, normalise, and resize to ``image_size`` when it differs."""

    soft_targets = False

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: int | None = None,
                 crop_pct: float = 1.0):
        self.mean, self.std, self.image_size, self.crop_pct = tuple(mean), tuple(std), image_size, crop_pct

    def __call__(self, images, labels, key: BatchKey = (), device=None):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        size = self.image_size
        if self.crop_pct < 1:
            size = size or images.shape[-1]  # crop, then back to the model's size
            images = center_crop(images, self.crop_pct)
        return normalize(images, self.mean, self.std, size), labels

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.mean}, std={self.std}, image_size={self.image_size}, "
                f"crop_pct={self.crop_pct})")


class TrainTransform(EvalTransform):
    """Train-time augmentation, in order: crop + flip, RandAugment, normalise/resize, mixup.

    Args:
        crop_padding: pixels of padding for the random crop (4 for CIFAR; 0 disables it).
        padding_mode: ``"reflect"``, ``"zero"`` or ``"edge"``.
        hflip: random horizontal flip with probability 0.5.
        randaugment: ``(num_ops, magnitude)`` for ``torchvision.transforms.v2.RandAugment``,
            applied per image on the stored uint8 images, or None.
        random_erasing: probability of ``timm.data.RandomErasing`` (per-pixel noise) on each normalised image.
        mixup: a ``timm.data.Mixup``; the batch's targets become soft ``(B, num_classes)``
            float tensors (with its label smoothing folded in). Needs an even batch size.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int | None = None,
        crop_padding: int = 4,
        padding_mode: str = "reflect",
        hflip: bool = True,
        randaugment: tuple[int, int] | None = None,
        random_erasing: float = 0.0,
        mixup=None,
    ):
        super().__init__(mean, std, image_size)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.crop_padding, self.padding_mode, self.hflip = crop_padding, padding_mode, hflip
        self.randaugment = _make_randaugment(randaugment)
        self.random_erasing = random_erasing
        self.mixup = mixup
        self.soft_targets = mixup is not None

    def __call__(self, images, labels, key: BatchKey = (), device=None):
        if self.crop_padding or self.hflip:
            generator = seeded_generator(*key, _CROP_STREAM)
            images = random_crop_flip(images, self.crop_padding, generator, self.padding_mode, self.hflip)
        if self.randaugment is not None:
            with torch_seeded(*key, _RANDAUGMENT_STREAM), _one_thread():  # RandAugment draws from the global RNG
                images = torch.stack([self.randaugment(image) for image in images])
        x, labels = super().__call__(images, labels, key, device)
        if self.random_erasing:
            x = _random_erasing(x, self.random_erasing, key)
        if self.mixup is not None:
            if len(x) % 2:
                raise ValueError(f"mixup/cutmix needs an even batch size, got {len(x)}")
            with numpy_seeded(*key, _MIXUP_STREAM):  # timm's Mixup draws from np.random
                x, labels = self.mixup(x, labels)
        return x, labels

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_padding={self.crop_padding}, padding_mode={self.padding_mode!r}, "
            f"hflip={self.hflip}, randaugment={self.randaugment}, mixup={self.mixup is not None}, "
            f"mean={self.mean}, std={self.std}, image_size={self.image_size})"
        )


def _random_erasing(x: torch.Tensor, probability: float, key: BatchKey) -> torch.Tensor:
    """timm's random erasing (DeiT's settings: per-pixel normal noise, one box) on a normalised batch."""
    from timm.data import RandomErasing

    erase = RandomErasing(probability, mode="pixel", device=str(x.device))
    with all_seeded(*key, _ERASING_STREAM):  # it draws from Python's and torch's global RNGs
        return erase(x)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run small per-image CPU ops on one intra-op thread, then give the others back.

    A 32-px image is far too small to split across threads, but each op still wakes the whole pool: on a
    16-core GPU host running four trainings, RandAugment then took over a second per batch of 128.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _make_randaugment(options: tuple[int, int] | None):
    if options is None:
        return None
    from torchvision.transforms import v2

    num_ops, magnitude = options
    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
