"""How dyntok's shipped references are trained and exported (``dyntok pretrain``).

A recipe is the ``dyntok train`` options of one preset; :func:`export_reference` turns a finished run into a
weights file with its model card, which :mod:`dyntok.pretrained` then finds and loads.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from .._versions import __version__
from ..data import DataConfig
from ..fileio import load_tensors
from ..methods import load_model, save_model
from ..pretrained import packaged_file
from .trainer import TrainConfig

__all__ = ["RECIPES", "Recipe", "export_reference"]


@dataclass(frozen=True)
class Recipe:
    """How a reference was trained: ``dyntok train`` options (the same names), one per preset.

    The schedule is sized for 2 CPU cores: a recipe known to work for small ViTs on CIFAR (AdamW, warm-up
    plus cosine, crop/flip, light RandAugment, label smoothing) at the longest schedule the budget allowed.
    """

    epochs: float = 20
    lr: float = 2e-3
    warmup_epochs: float = 2
    randaugment: tuple[int, int] = (1, 5)
    label_smoothing: float = 0.1
    batch_size: int = 128
    holdout_size: int = 5000
    seed: int = 0
    dataset: str = "cifar10"

    def train_config(self, preset: str, output_dir: str | Path, data_root: str | None = None, device: str = "auto",
                     progress: bool = True) -> TrainConfig:
        """The ``TrainConfig`` of this recipe; ``--resume`` is on, so a re-run continues an interrupted one."""
        data = DataConfig(dataset=self.dataset, data_root=data_root, batch_size=self.batch_size,
                          holdout_size=self.holdout_size, seed=self.seed, randaugment=self.randaugment)
        return TrainConfig(model=preset, data=data, output_dir=str(output_dir), epochs=self.epochs, lr=self.lr,
                           warmup_epochs=self.warmup_epochs, label_smoothing=self.label_smoothing, seed=self.seed,
                           device=device, compile=True, resume=True, progress=progress)

    def train_fields(self) -> dict[str, Any]:
        """The optimisation settings of the recipe, as a benchmark entry's ``train`` section."""
        return {"epochs": self.epochs, "lr": self.lr, "warmup_epochs": self.warmup_epochs,
                "label_smoothing": self.label_smoothing, "seed": self.seed, "compile": True}

    def command(self, preset: str) -> str:
        """The equivalent ``dyntok train`` command line (the model card records it)."""
        ops, magnitude = self.randaugment
        return (f"dyntok train --model {preset} --dataset {self.dataset} --epochs {self.epochs:g} --lr {self.lr:g} "
                f"--warmup-epochs {self.warmup_epochs:g} --randaugment {ops} {magnitude} "
                f"--label-smoothing {self.label_smoothing:g} --batch-size {self.batch_size} "
                f"--holdout-size {self.holdout_size} --seed {self.seed} --compile")


#: The recipe of every preset dyntok ships weights for: the two references (micro, and the wider and deeper
#: tiny) and micro's two static baselines trained with the same budget (the same ViT on 16 tokens, and a
#: smaller ViT).
RECIPES: dict[str, Recipe] = {
    "vit_cifar_micro": Recipe(),
    # Tiny trains at ~2.6x micro's cost per epoch but is not in the default benchmark, so it gets twice the
    # schedule: it is the stronger reference for users who adapt a model of their own.
    "vit_cifar_tiny": Recipe(epochs=40, warmup_epochs=4),
    "vit_cifar_micro_patch8": Recipe(),
    "vit_cifar_nano": Recipe(),
}




def export_reference(run_dir: str | Path, preset: str, destination: str | Path | None = None) -> Path:
    """Write a finished ``dyntok train`` run of ``preset`` as a shipped reference, with its model card."""
    run_dir = Path(run_dir)
    model = load_model(run_dir / "model.safetensors")
    config = json.loads((run_dir / "train_config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log_lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    recipe = RECIPES.get(preset, Recipe())
    card = {
        "preset": preset, "command": recipe.command(preset), "recipe": config,
        "test_top1": metrics["test"]["top1"], "test_images": metrics["test"].get("num_images"),
        "data": {"dataset": config["data"].get("dataset"), "holdout_size": config["data"].get("holdout_size"),
                 "note": "CIFAR-10 (JPEG copy) when trained on ../shared/data/cifar10"},
        "seed": config["seed"], "epochs": config["epochs"],
        "train_seconds": sum(record.get("seconds", 0.0) for record in log_lines),
        "log": log_lines,
        "versions": {"dyntok": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }
    # The reference is saved under the preset's name, so it loads by name whatever overrides built it.
    model.backbone_spec = type(model.backbone_spec)(preset, {})
    destination = Path(destination) if destination is not None else packaged_file(preset)
    _, run_meta = load_tensors(run_dir / "model.safetensors")
    extra = {key: value for key, value in run_meta.items() if key not in ("kind", "config", "budget")}
    return save_model(model, destination, extra={**extra, "card": card})
