"""Throughput and latency, measured as the project's protocol says (docs/measurement.md).

Speed is only meaningful as a ratio to the dense model measured in the same process, interleaved with it,
on real test images (a dynamic model's cost depends on content). Each repetition times every model once, in
rotating order, so drifts in machine speed hit all models alike; the median repetition is reported.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["SpeedResult", "measure_throughput", "measure_latency", "compare_speed", "inference_context", "precision",
           "synchronize"]


@dataclass
class SpeedResult:
    """Median and every repetition; ``value`` is images/s for throughput, ms/image for latency."""

    value: float
    repetitions: list[float]


def inference_context(device: torch.device) -> contextlib.AbstractContextManager:
    """float32 on CPU, bf16 autocast on GPU (the protocol's settings)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision(device: str | torch.device) -> str:
    """The arithmetic :func:`inference_context` runs in on ``device``, as reports name it."""
    return "bfloat16 autocast" if torch.device(device).type == "cuda" else "float32"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pass(predict: Callable[[Tensor], object], batches: list[Tensor], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), inference_context(device):
        for batch in batches:
            predict(batch)
    synchronize(device)
    return time.perf_counter() - start


def _interleaved(models: Mapping[str, Callable[[Tensor], object]], batches: list[Tensor], repeats: int,
                 warmup: int, device: torch.device, desc: str, progress: bool) -> dict[str, list[float]]:
    names = list(models)
    for _ in range(warmup):
        for name in names:
            _time_pass(models[name], batches, device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in tqdm(range(repeats), desc=desc, leave=False, disable=not progress):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            seconds[name].append(_time_pass(models[name], batches, device))
    return seconds


def measure_throughput(models: Mapping[str, Callable[[Tensor], object]], images: Tensor, batch_size: int = 64,
                       repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu",
                       progress: bool = True) -> dict[str, SpeedResult]:
    """Images per second of each ``predict`` callable over ``images``, interleaved; median of ``repeats``."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    device = torch.device(device)
    batches = [chunk.to(device) for chunk in images.split(batch_size)]
    seconds = _interleaved(models, batches, repeats, warmup, device, "throughput", progress)
    return {name: SpeedResult(len(images) / statistics.median(times), [len(images) / t for t in times])
            for name, times in seconds.items()}


def measure_latency(models: Mapping[str, Callable[[Tensor], object]], images: Tensor, repeats: int = 5,
                    warmup: int = 1, device: str | torch.device = "cpu", progress: bool = True
                    ) -> dict[str, SpeedResult]:
    """Milliseconds per image at batch size 1, interleaved; median of ``repeats`` passes over ``images``."""
    device = torch.device(device)
    batches = [image.unsqueeze(0).to(device) for image in images]
    seconds = _interleaved(models, batches, repeats, warmup, device, "latency", progress)
    return {name: SpeedResult(1000 * statistics.median(times) / len(images),
                              [1000 * t / len(images) for t in times])
            for name, times in seconds.items()}


def compare_speed(baseline: Callable[[Tensor], object], candidate: Callable[[Tensor], object] | None,
                  images: Tensor, batch_size: int, latency_images: int, repeats: int = 5, warmup: int = 1,
                  device: str | torch.device = "cpu", progress: bool = False, baseline_name: str = "reference"
                  ) -> dict[str, float]:
    """Throughput over ``images`` and batch-1 latency over the first ``latency_images`` of ``candidate`` against
    ``baseline``, interleaved (the baseline alone when ``candidate`` is None: it is then its own candidate).

    Both ratios read the same way, baseline time over candidate time (above 1: the candidate is faster):
    ``speedup`` for throughput, ``latency_speedup`` for latency. ``baseline_name`` names the baseline's own
    figures (``reference_throughput``, ``reference_latency_ms``).
    """
    predictors = {"baseline": baseline} if candidate is None else {"baseline": baseline, "candidate": candidate}
    measured = "candidate" if candidate is not None else "baseline"
    throughput = measure_throughput(predictors, images, batch_size, repeats, warmup, device, progress=progress)
    latency = measure_latency(predictors, images[:latency_images], repeats, warmup, device, progress=progress)
    return {"throughput": throughput[measured].value, f"{baseline_name}_throughput": throughput["baseline"].value,
            "speedup": throughput[measured].value / throughput["baseline"].value,
            "latency_ms": latency[measured].value, f"{baseline_name}_latency_ms": latency["baseline"].value,
            "latency_speedup": latency["baseline"].value / latency[measured].value}
