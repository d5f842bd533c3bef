"""Accuracy and executed MACs of any method over a data split: the floor above the methods, below training,
the benchmark and the command line."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .measure.speed import inference_context, precision
from .methods import AdaptiveViT

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Top-1 and MACs over a split; ``per_image_macs`` keeps every image's count, in data order.

    ``precision`` names the arithmetic the model ran in (that of the speed measurements on the same device).
    """

    top1: float
    mean_gmacs: float
    num_images: int
    per_image_macs: Tensor
    correct: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    precision: str = "float32"

    def summary(self) -> dict[str, Any]:
        macs = self.per_image_macs / 1e9
        return {"top1": self.top1, "mean_gmacs": self.mean_gmacs, "min_gmacs": macs.min().item(),
                "max_gmacs": macs.max().item(), "num_images": self.num_images, "precision": self.precision}


@torch.no_grad()
def evaluate(model: AdaptiveViT, loader: Iterable[tuple[Tensor, Tensor]], device: str | torch.device = "cpu",
             progress: bool = True, desc: str = "eval") -> EvalResult:
    """Run ``model.predict`` over ``loader``; accuracy from the logits, compute from the reported MACs.

    The model runs under :func:`~dyntok.measure.speed.inference_context`, as it does when its speed is
    timed (bf16 autocast on GPU, float32 on CPU): a method whose decisions depend on its outputs (DVT's
    exits) then takes the same decisions here as while timed, so accuracy, MACs and time describe one run.
    """
    device = torch.device(device)
    model.eval()
    macs, correct, extras = [], [], {}
    with inference_context(device):
        for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
            prediction = model.predict(images.to(device, non_blocking=True))
            correct.append(prediction.logits.argmax(-1).cpu() == labels)
            macs.append(prediction.macs.cpu().double())
            for key, value in prediction.extras.items():
                if isinstance(value, Tensor) and value.shape[:1] == labels.shape[:1]:
                    extras.setdefault(key, []).append(value.cpu())
    if not correct:
        raise ValueError("the evaluation split is empty")
    correct_t, macs_t = torch.cat(correct), torch.cat(macs)
    return EvalResult(top1=correct_t.float().mean().item(), mean_gmacs=macs_t.mean().item() / 1e9,
                      num_images=len(correct_t), per_image_macs=macs_t, correct=correct_t,
                      extras={key: torch.cat(values) for key, values in extras.items()}, precision=precision(device))
