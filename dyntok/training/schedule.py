"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr``; a pure function of the step."""
from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float) -> float:
    """The learning rate at ``step`` (0-based) of ``total_steps``.

    Being a function of the step alone, it needs no state in checkpoints: resuming at step s gives the same
    learning rate as an uninterrupted run.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))
