"""How dyntok's shipped weights are trained and exported (``dyntok pretrain``).

A recipe is the ``dyntok train`` options of one model: a preset's dense reference, or a method trained from
it. :func:`export_reference` turns a finished run into a weights file with its model card, which
:mod:`dyntok.pretrained` then finds and ``create_model(name, pretrained=True)`` loads.

The papers' own ImageNet recipes (``dyntok train --recipe``) are in :mod:`dyntok.training.paper_recipes`.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch

from .._versions import __version__
from ..data import DataConfig
from ..fileio import load_tensors
from ..methods import load_model, save_model
from ..methods.registry import split_model_name
from ..pretrained import packaged_file
from .trainer import TrainConfig

__all__ = ["RECIPES", "Recipe", "export_reference"]


@dataclass(frozen=True)
class Recipe:
    """How a shipped file was trained: ``dyntok train`` options (the same names), one per model name.

    The references' schedule is sized for 2 CPU cores: a recipe known to work for small ViTs on CIFAR (AdamW,
    warm-up plus cosine, crop/flip, light RandAugment, label smoothing) at the longest schedule the budget
    allowed. A method's recipe starts from the dense reference (``init="pretrained"``, which is also its
    teacher where the method distils) and follows its paper's fine-tuning recipe, scaled; ``source`` says
    where each setting comes from and why it differs from the paper.
    """

    epochs: float = 20
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2
    randaugment: tuple[int, int] = (1, 5)
    label_smoothing: float = 0.1
    batch_size: int = 128
    holdout_size: int = 5000
    seed: int = 0
    dataset: str = "cifar10"
    init: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    #: ``torch.compile`` the training step: ~1.45x for the dense references on CPU, but nothing for the
    #: methods (DVT 452 ms a step eager, 454 compiled, after 89 s of compiling), so their recipes run eager.
    compile: bool = True

    def train_config(self, name: str, output_dir: str | Path, data_root: str | None = None, device: str = "auto",
                     progress: bool = True) -> TrainConfig:
        """The ``TrainConfig`` of this recipe; ``--resume`` is on, so a re-run continues an interrupted one."""
        data = DataConfig(dataset=self.dataset, data_root=data_root, batch_size=self.batch_size,
                          holdout_size=self.holdout_size, seed=self.seed, randaugment=self.randaugment)
        return TrainConfig(model=name, model_kwargs=dict(self.model_kwargs), data=data, output_dir=str(output_dir),
                           init=self.init, device=device, resume=True, progress=progress, **self.train_fields())

    def train_fields(self) -> dict[str, Any]:
        """The optimisation settings of the recipe, as a benchmark entry's ``train`` section."""
        return {"epochs": self.epochs, "lr": self.lr, "min_lr": self.min_lr, "weight_decay": self.weight_decay,
                "warmup_epochs": self.warmup_epochs, "label_smoothing": self.label_smoothing, "seed": self.seed,
                "compile": self.compile}

    def command(self, name: str) -> str:
        """The equivalent ``dyntok train`` command line (the model card records it)."""
        method, backbone = split_model_name(name)
        ops, magnitude = self.randaugment
        words = ["dyntok train"] + ([f"--method {method}"] if method != "dense" else []) + [f"--model {backbone}"]
        words += [f"--init {self.init}"] if self.init else []
        words += [f"--model-arg {key}={value}" for key, value in self.model_kwargs.items()]
        words += [f"--dataset {self.dataset} --epochs {self.epochs:g} --lr {self.lr:g}"]
        if (self.min_lr, self.weight_decay) != (1e-5, 0.05):  # TrainConfig's defaults
            words += [f"--min-lr {self.min_lr:g} --weight-decay {self.weight_decay:g}"]
        words += [f"--warmup-epochs {self.warmup_epochs:g} --randaugment {ops} {magnitude} "
                  f"--label-smoothing {self.label_smoothing:g} --batch-size {self.batch_size} "
                  f"--holdout-size {self.holdout_size} --seed {self.seed}" + (" --compile" if self.compile else "")]
        return " ".join(words)


def _method_recipe(epochs: float, source: str, **settings: Any) -> Recipe:
    """A method fine-tuned from the micro reference (its teacher, where it distils) with the reference's data."""
    return Recipe(epochs=epochs, init="pretrained", source=source, compile=False, **settings)


#: The recipe of every model dyntok ships weights for: the two references (micro, and the wider and deeper
#: tiny), micro's two static baselines trained with the same budget (the same ViT on 16 tokens, and a smaller
#: ViT), and each learned method started from the micro reference (docs/pretrained.md gives the pilots behind
#: every deviation from the papers).
RECIPES: dict[str, Recipe] = {
    "vit_cifar_micro": Recipe(),
    # Tiny trains at ~2.6x micro's cost per epoch but is not in the default benchmark, so it gets twice the
    # schedule: it is the stronger reference for users who adapt a model of their own.
    "vit_cifar_tiny": Recipe(epochs=40, warmup_epochs=4),
    "vit_cifar_micro_patch8": Recipe(),
    "vit_cifar_nano": Recipe(),
    "dynamicvit_vit_cifar_micro": _method_recipe(
        10, lr=1e-3, warmup_epochs=1, model_kwargs={"backbone_lr_scale": 1.0},
        source="DynamicViT's fine-tune (30 epochs from a trained DeiT, lr 1e-3 for the predictors, predictors "
               "alone for the first 5/30, distillation from the dense model), scaled to 10 epochs. The backbone "
               "learns at the predictors' rate, not x0.01: in a short run x0.01 leaves it nearly frozen, and "
               "x1.0 gave +2.25 points after one epoch."),
    "dvt_vit_cifar_micro": _method_recipe(
        10, lr=1e-3, warmup_epochs=1,
        source="DVT trains its cascade end to end with the summed exit losses (CIFAR: fine-tuned from trained "
               "backbones); every stage starts from the reference. 10 epochs, the methods' shared CPU budget; lr "
               "1e-3, since the coarse stages must learn new patch grids (at 5e-4 for one epoch the 4x4 stage "
               "reached 62.21%, below the static patch-8 model's 64.88%)."),
    "revit_vit_cifar_micro": _method_recipe(
        10, lr=1e-3, warmup_epochs=1,
        source="No official code; the reconstruction trains the ViT at every length (cross-entropy summed, "
               "distilled from the longest) for 80% of the run, then the length assigner on the frozen ViT's "
               "labels for 20%. 10 epochs, the methods' shared CPU budget."),
    "adavit_vit_cifar_micro": _method_recipe(
        10, lr=1e-3, warmup_epochs=1, model_kwargs={"policy_bias": "target"},
        source="AdaViT as released (heads gate fc1, patch policy from block 0), fine-tuned from the reference "
               "with one lr for the backbone and the policies and no teacher (ada_main.py; no training command "
               "was published). 10 epochs, the methods' shared CPU budget, at the lr of the benchmark's "
               "fine-tunes. Policies start at their usage targets, not at the official zero biases: after one "
               "epoch zero biases gave 32.9% at 3.43x fewer GMACs, target biases 48.2% at 2.33x."),
    "evit_vit_cifar_micro": _method_recipe(
        10, lr=8e-5, min_lr=8e-6, weight_decay=1e-6, warmup_epochs=0,
        source="EViT's fine-tune from a trained DeiT (finetune.sh: 30 epochs, lr 2e-5 per 512 images falling to "
               "2e-6, weight decay 1e-6, no warm-up, the target keep rate from the first step, which "
               "init_from_dense settles). Its lr is 1/25 of the from-scratch recipe's 5e-4, so 1/25 of the "
               "reference's 2e-3 here; 10 epochs, the methods' shared CPU budget."),
}


def _without_machine_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config as a model card records it: folders by their last name, never a path of the machine."""
    data = dict(config.get("data", {}))
    for key in ("data_root", "dataset"):  # a dataset may be an image-folder path; cifar10 stays cifar10
        if data.get(key):
            data[key] = Path(data[key]).name
    return {**config, "output_dir": Path(config["output_dir"]).name, "data": data}


def export_reference(run_dir: str | Path, name: str, destination: str | Path | None = None) -> Path:
    """Write a finished ``dyntok train`` run of model ``name`` as shipped weights, with its model card.

    ``name`` is a preset (a reference) or ``<method>_<preset>`` (a method trained from the reference); the
    card records the recipe and its command, the training log, the test top-1 and GMACs at the budget the
    model is saved with, the data, the seed and the library versions.
    """
    run_dir = Path(run_dir)
    model = load_model(run_dir / "model.safetensors")
    config = _without_machine_paths(json.loads((run_dir / "train_config.json").read_text()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log_lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    recipe = RECIPES.get(name, Recipe())
    card = {
        "preset": name, "command": replace(recipe, dataset=Path(recipe.dataset).name).command(name), "recipe": config, "recipe_source": recipe.source,
        "test_top1": metrics["test"]["top1"], "test_gmacs": metrics["test"].get("mean_gmacs"),
        "test_images": metrics["test"].get("num_images"), "budget": model.get_budget(),
        "data": {"dataset": config["data"].get("dataset"), "holdout_size": config["data"].get("holdout_size"),
                 "note": "CIFAR-10 (JPEG copy) when trained on ../shared/data/cifar10"},
        "seed": config["seed"], "epochs": config["epochs"],
        "train_seconds": sum(record.get("seconds", 0.0) for record in log_lines),
        "log": log_lines,
        "versions": {"dyntok": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }
    # Saved under the preset's name, so the file loads by name whatever overrides built it.
    model.backbone_spec = type(model.backbone_spec)(model.backbone_spec.name, {})
    destination = Path(destination) if destination is not None else packaged_file(name)
    _, run_meta = load_tensors(run_dir / "model.safetensors")
    extra = {key: value for key, value in run_meta.items() if key not in ("kind", "config", "budget")}
    return save_model(model, destination, extra={**extra, "card": card})
