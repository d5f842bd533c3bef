"""A worker-free batch loader over an in-memory ``ImageTensorDataset``.

With the whole dataset in one uint8 tensor, a batch is an index op plus a few vectorised
transforms, so worker processes would only add start-up time and copies. The loader:

* shuffles with a permutation seeded by ``(seed, epoch)``: call ``set_epoch`` every epoch;
* shards for DDP like ``DistributedSampler``: every rank takes ``permutation[rank::world_size]``
  of the same permutation, so shards are disjoint and equally long (the permutation is padded by
  wrap-around, or cut with ``drop_last``);
* resumes bit-exactly mid-epoch: ``iterate(start_batch=k)`` yields batches ``k, k+1, ...`` exactly
  as an uninterrupted epoch would, since each batch's augmentation is seeded by its own
  ``(seed, epoch, batch_index, rank)``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from .datasets import ImageTensorDataset
from .seeding import seeded_generator

__all__ = ["BatchLoader"]

_SHUFFLE_STREAM = 0x5F1E

Transform = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class BatchLoader:
    """Yield ``(images float32 (B, 3, S, S), labels int64 (B,))`` batches of ``dataset``.

    Args:
        dataset: the in-memory images and labels.
        batch_size: per-rank batch size.
        transform: a ``TrainTransform`` / ``EvalTransform`` (or any callable with the signature
            ``(images_uint8, labels, key, device) -> (x, y)``).
        shuffle: a new seeded permutation each epoch (else dataset order).
        drop_last: cut the permutation to a multiple of ``world_size`` (no duplicated samples)
            and drop each rank's final incomplete batch.
        seed: base seed of the shuffle and of the augmentation.
        rank, world_size: this process's shard.
        even_shards: pad by wrap-around so all ranks get the same number of samples (needed
            when every rank must run the same number of steps). ``False`` gives every sample
            exactly once across ranks, with shard lengths differing by at most one.
        device: move each batch there before the float transforms (e.g. resize on the GPU).
    """

    def __init__(
        self,
        dataset: ImageTensorDataset,
        batch_size: int,
        transform: Transform,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = True,
        device: torch.device | str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset, self.batch_size, self.transform = dataset, batch_size, transform
        if self.soft_targets and (batch_size % 2 or not drop_last):
            raise ValueError("mixup/cutmix needs an even batch_size and drop_last=True")
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size, self.even_shards = rank, world_size, even_shards
        self.device = device
        self.epoch = 0

    @property
    def soft_targets(self) -> bool:
        """True when batches carry ``(B, num_classes)`` float targets (mixup/cutmix is on)."""
        return bool(getattr(self.transform, "soft_targets", False))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples in this rank's shard per epoch (before dropping an incomplete last batch)."""
        n, world = len(self.dataset), self.world_size
        if self.drop_last:
            return n // world
        if self.even_shards:
            return math.ceil(n / world)
        return len(range(self.rank, n, world))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def shard_indices(self, epoch: int | None = None) -> torch.Tensor:
        """Dataset indices this rank visits in ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=seeded_generator(self.seed, epoch, _SHUFFLE_STREAM))
        else:
            order = torch.arange(n)
        if self.drop_last or self.even_shards:
            total = self.num_samples * self.world_size
            order = order.repeat(math.ceil(total / max(n, 1)))[:total]  # wrap-around padding or cut
        return order[self.rank :: self.world_size]

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch, start_batch + 1, ...`` of the current epoch."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        indices = self.shard_indices()
        for batch in range(start_batch, len(self)):
            picked = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            key = (self.seed, self.epoch, batch, self.rank)
            yield self.transform(self.dataset.images[picked], self.dataset.labels[picked], key, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.dataset)} images, batch_size={self.batch_size}, "
            f"batches={len(self)}, shuffle={self.shuffle}, drop_last={self.drop_last}, "
            f"rank={self.rank}/{self.world_size}, transform={self.transform!r})"
        )
