"""What a perfect router would do: for models with several exits, the cheapest exit that is right.

A method that routes each image to one of several exits (ReViT's token lengths, DVT's stages) is only as
good as its routing. Knowing the labels, an oracle sends every image straight to the cheapest exit that
classifies it correctly; the gap between the oracle's curve and the method's own is what the router costs.
Everything here works from :meth:`~dyntok.methods.AdaptiveViT.predict_all_exits` and
:meth:`~dyntok.methods.AdaptiveViT.exit_macs`, so it never needs to know the method.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["exit_correctness", "first_correct_exit", "collect_exit_correctness", "oracle_curve"]


def exit_correctness(exit_logits: Sequence[Tensor], target: Tensor) -> Tensor:
    """(B, K) bool: whether exit k classifies image b correctly. Soft (mixup) targets count by their argmax."""
    if target.ndim == 2:
        target = target.argmax(dim=-1)
    return torch.stack([logits.argmax(dim=-1) == target for logits in exit_logits], dim=1)


def first_correct_exit(correct: Tensor) -> Tensor:
    """(B,) long: each image's first correct exit, or the last exit where none is right.

    This is ReViT's token-length label: exits ordered from the shortest token length to the longest.
    """
    last = correct.shape[1] - 1
    first = correct.int().argmax(dim=1)  # argmax returns the first maximum: the first True
    return torch.where(correct.any(dim=1), first, torch.full_like(first, last))


@torch.no_grad()
def collect_exit_correctness(model, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> Tensor:
    """(N, K) bool over a whole split, in the loader's order: which exits get each image right."""
    rows = [exit_correctness(model.predict_all_exits(images.to(device)), labels.to(device)).cpu()
            for images, labels in loader]
    if not rows:
        raise ValueError("the split is empty")
    return torch.cat(rows)


def oracle_curve(correct: Tensor, exit_macs: Sequence[float], points: int = 12) -> list[dict[str, float]]:
    """Accuracy against mean GMACs of the best routing that knows the labels, cheapest budget first.

    Every image starts at the cheapest exit; an image the cheapest exit gets wrong but a later one gets
    right can be moved to its cheapest correct exit, and moving the images whose move costs least first
    maximises the accuracy at every budget (each move gains exactly one correct image). Images no exit gets
    right stay at the cheapest. ``exit_macs[k]`` is what answering at exit k costs in all (cumulative for a
    cascade). Returns up to ``points`` evenly spread points, both ends included.
    """
    costs = torch.as_tensor(list(exit_macs), dtype=torch.float64)
    if correct.ndim != 2 or correct.shape[1] != len(costs) or len(correct) == 0:
        raise ValueError(f"need (N > 0, {len(costs)}) correctness for {len(costs)} exits, got {tuple(correct.shape)}")
    samples = len(correct)
    cheapest = costs.argmin()
    # The cheapest correct exit of each image (inf where none is right).
    cost_if_right = torch.where(correct, costs, torch.full_like(costs, float("inf"))).amin(dim=1)
    movable = torch.isfinite(cost_if_right) & ~correct[:, cheapest]
    extra = (cost_if_right[movable] - costs[cheapest]).sort().values
    base_top1 = correct[:, cheapest].double().mean().item()
    moved = torch.arange(len(extra) + 1)
    top1 = base_top1 + moved.double() / samples
    mean_macs = costs[cheapest] + torch.cat([extra.new_zeros(1), extra.cumsum(0)]) / samples
    keep = torch.linspace(0, len(extra), min(points, len(extra) + 1)).round().long().unique()
    return [{"top1": top1[i].item(), "mean_gmacs": mean_macs[i].item() / 1e9} for i in keep.tolist()]
