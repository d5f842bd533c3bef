"""Reproducible randomness keyed by position, so any batch can be recomputed on its own.

Every random draw of the data layer (the epoch shuffle, each batch's crops, flips,
RandAugment ops and mixup) comes from a generator seeded by a *key* such as
``(seed, epoch, batch_index, rank, stream)`` rather than from a stream that advances with
time. Resuming at batch ``k`` of an epoch therefore reproduces batch ``k`` bit for bit
without replaying batches ``0..k-1``.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

__all__ = ["derive_seed", "seeded_generator", "numpy_seeded", "torch_seeded", "all_seeded"]


def derive_seed(*key: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints (via numpy's SeedSequence).

    Nearby keys such as ``(0, 1, 2)`` and ``(0, 2, 1)`` give unrelated seeds, which simple
    arithmetic like ``seed * 1000 + epoch`` does not guarantee.
    """
    words = np.random.SeedSequence([int(k) % 2**64 for k in key]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))  # torch seeds must fit in a signed 64-bit int


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``key``."""
    return torch.Generator().manual_seed(derive_seed(*key))


@contextlib.contextmanager
def numpy_seeded(*key: int):
    """Seed numpy's *global* RNG for a block, restoring its state afterwards.

    Needed for ``timm.data.Mixup``, which draws from ``np.random`` directly.
    """
    state = np.random.get_state()
    np.random.seed(derive_seed(*key) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


@contextlib.contextmanager
def torch_seeded(*key: int):
    """Seed torch's global CPU RNG for a block, restoring it afterwards.

    Needed for torchvision's RandAugment, which takes no generator argument.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*key))
        yield


@contextlib.contextmanager
def all_seeded(*key: int):
    """Seed Python's, numpy's and torch's global RNGs for a block, restoring all three afterwards.

    timm's and torchvision's PIL transforms draw from whichever of them suits the author (RandomResizedCrop
    and RandAugment from ``random``, random erasing from ``random`` and torch): seeding all three makes one
    image's augmentation a function of its key alone, in any process.
    """
    python_state = random.getstate()
    seed = derive_seed(*key)
    random.seed(seed)
    try:
        with numpy_seeded(seed), torch_seeded(seed):
            yield
    finally:
        random.setstate(python_state)
