"""Budgets in milliseconds: the budget knobs under which a batch of ``batch_size`` images takes at most
``latency_ms`` on the machine at hand (:meth:`~dyntok.methods.AdaptiveViT.calibrate_latency`).

Only the method contract is used, never the method's name: the method's own :meth:`budget_sweep` gives the
candidate budgets, each is timed, the slowest one within the target is kept (more compute buys accuracy),
and the gap to the next slower one is closed by bisecting between the two where their knobs are numbers
(a keep ratio, a bias, a list of thresholds). How time is read is injected (:data:`Timer`), so tests run on a
fake clock.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .speed import _time_pass

__all__ = ["Timer", "wall_clock_timer", "fit_latency_budget", "timed_images", "TIMED_BATCHES", "TIMED_IMAGES"]

#: ``timer(predict, batches)`` -> milliseconds per batch of calling ``predict`` on each of ``batches``.
Timer = Callable[[Callable[[Tensor], object], Sequence[Tensor]], float]
#: Batches timed per budget, at least: several, so that content-dependent costs (exit and length shares) are
#: averaged.
TIMED_BATCHES = 4
#: Images timed per budget, at least. At batch 1, four images misjudge a content-dependent method's mean cost:
#: DVT fitted on four landed at 0.72 and 1.26 of its targets on 32 others (micro, 2 CPU cores).
TIMED_IMAGES = 32
#: Bisection steps between two swept budgets.
_REFINE_STEPS = 6


def wall_clock_timer(repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu") -> Timer:
    """The real clock: median over ``repeats`` passes (after ``warmup``), in the protocol's arithmetic."""
    device = torch.device(device)

    def timer(predict: Callable[[Tensor], object], batches: Sequence[Tensor]) -> float:
        batches = [batch.to(device) for batch in batches]
        for _ in range(warmup):
            _time_pass(predict, batches, device)
        return 1000 * statistics.median(_time_pass(predict, batches, device) for _ in range(repeats)) / len(batches)

    return timer


def fit_latency_budget(model, images: Tensor, latency_ms: float, batch_size: int = 1,
                       timer: Timer | None = None) -> dict[str, Any]:
    """Set ``model``'s budget to the slowest one found within ``latency_ms`` per batch; return it.

    ``images`` are timed in batches of ``batch_size`` (the first :func:`timed_images` of them). Raises
    ``ValueError`` when even the fastest swept budget is slower than the target.
    """
    if not latency_ms > 0 or batch_size < 1:
        raise ValueError(f"need a positive latency and batch size, got {latency_ms} ms at batch {batch_size}")
    timer = timer or wall_clock_timer()
    batches = [batch for batch in images[:timed_images(batch_size)].split(batch_size) if len(batch) == batch_size]
    if not batches:
        raise ValueError(f"need at least {batch_size} images to time batches of {batch_size}")

    def latency(budget: dict[str, Any]) -> float:
        model.set_budget(**budget)
        return timer(model.predict, batches)

    timed = sorted(((latency(budget), index, budget) for index, budget in enumerate(_candidates(model))),
                   key=lambda entry: entry[:2])
    within = [entry for entry in timed if entry[0] <= latency_ms]
    if not within:
        fastest_ms, _, fastest = timed[0]
        raise ValueError(f"no budget of {model.method_name} meets {latency_ms:g} ms at batch {batch_size}: the "
                         f"fastest swept, {fastest}, takes {fastest_ms:.3g} ms")
    best = within[-1][2]
    # Refine towards the fastest slower budget that a line from ``best`` reaches: a budget differing in a
    # knob that cannot be blended (ReViT's grid=None vs a fixed grid) may sit between two that can.
    slower = next((budget for _, _, budget in timed[len(within):] if _between(best, budget, 0.5) is not None), None)
    if slower is not None:
        best = _bisect(latency, best, slower, latency_ms)
    model.set_budget(**best)
    return model.get_budget()


def timed_images(batch_size: int) -> int:
    """How many images each budget is timed on: :data:`TIMED_BATCHES` batches, and at least
    :data:`TIMED_IMAGES` images."""
    return batch_size * max(TIMED_BATCHES, math.ceil(TIMED_IMAGES / batch_size))


def _candidates(model) -> list[dict[str, Any]]:
    """The current budget and the method's sweep, each once."""
    points: list[dict[str, Any]] = []
    for point in [model.get_budget(), *model.budget_sweep()]:
        if point not in points:
            points.append(point)
    return points


def _bisect(latency: Callable[[dict[str, Any]], float], within: dict[str, Any], over: dict[str, Any],
            latency_ms: float) -> dict[str, Any]:
    """The budget furthest towards ``over`` that stays within the target, along the line between the two."""
    low, high, best = 0.0, 1.0, within
    for _ in range(_REFINE_STEPS):
        middle = (low + high) / 2
        point = _between(within, over, middle)
        if point is None:
            break
        try:
            fits = latency(point) <= latency_ms
        except ValueError:  # a blend the method does not accept (a sentinel value): keep the swept point
            break
        if fits:
            low, best = middle, point
        else:
            high = middle
    return best


def _between(start: dict[str, Any], end: dict[str, Any], share: float) -> dict[str, Any] | None:
    """Each knob ``share`` of the way from ``start`` to ``end``; None when a differing knob is not numeric."""
    point = {}
    for name, first in start.items():
        last = end.get(name, first)
        if first == last:
            point[name] = first
        elif _is_number(first) and _is_number(last):
            point[name] = _blend(first, last, share)
        elif (isinstance(first, list) and isinstance(last, list) and len(first) == len(last)
              and all(map(_is_number, first + last))):
            point[name] = [_blend(a, b, share) for a, b in zip(first, last)]
        else:
            return None
    return point


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _blend(first: float, last: float, share: float) -> float:
    value = first + share * (last - first)
    return round(value) if isinstance(first, int) and isinstance(last, int) else value
