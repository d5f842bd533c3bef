"""Reference weights trained by dyntok itself, shipped inside the package and loaded the timm way.

Every adaptive method is applied to a *trained* ViT and judged by what it saves on that model, so dyntok
ships trained references for its CIFAR presets::

    model = dyntok.create_model("vit_cifar_micro", pretrained=True)            # the packaged file
    model = dyntok.create_model("dynamicvit_vit_cifar_micro", pretrained=True)  # a method started from it
    model = dyntok.create_model("vit_cifar_micro", pretrained="hf-hub:owner/repo")  # the same file from a hub

A weights file is an ordinary dyntok model checkpoint (safetensors, never pickle) of the dense preset whose
metadata carries a model card: the recipe and the command that made it, its training log, test top-1, data,
seed and library versions. ``dyntok pretrain PRESET`` re-runs the recipe (resumable) and writes a new file;
see docs/pretrained.md.
"""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_model, load_tensors, save_model
from ..models.vit import BackboneSpec

__all__ = ["RECIPES", "PretrainedError", "WEIGHTS_DIR", "available", "export_reference", "load_reference",
           "model_card", "reference_state_dict", "resolve_weights", "shipped_presets"]

log = logging.getLogger(__name__)

#: Where the packaged files live: ``<preset>.safetensors``.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

HUB_PREFIX = "hf-hub:"

#: Backbone settings that do not change the weights' shapes, so they may differ from the file's.
_FREE_OVERRIDES = frozenset({"drop_path_rate", "drop_rate"})


class PretrainedError(ValueError):
    """Reference weights that are missing, unreadable, or made for another model."""


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
                     progress: bool = True):
        """The ``TrainConfig`` of this recipe; ``--resume`` is on, so a re-run continues an interrupted one."""
        from ..data import DataConfig
        from ..training import TrainConfig

        data = DataConfig(dataset=self.dataset, data_root=data_root, batch_size=self.batch_size,
                          holdout_size=self.holdout_size, seed=self.seed, randaugment=self.randaugment,
                          label_smoothing=self.label_smoothing)
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


def shipped_presets() -> list[str]:
    """Presets with a reference file in this installation."""
    return sorted(path.stem for path in WEIGHTS_DIR.glob("*.safetensors"))


def available(preset: str) -> bool:
    return (WEIGHTS_DIR / f"{preset}.safetensors").is_file()


def resolve_weights(preset: str, source: bool | str | os.PathLike = True) -> Path:
    """The file holding ``preset``'s reference weights.

    ``source`` is ``True`` (the packaged file), ``"hf-hub:owner/repo"`` (``<preset>.safetensors`` from that
    Hugging Face hub repository, cached by ``huggingface_hub``), or a path to a weights file.
    """
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith(HUB_PREFIX):
        path = Path(source)
        if not path.is_file():
            raise PretrainedError(f"no weights file at {path}")
        return path
    if isinstance(source, str):
        return _download(source[len(HUB_PREFIX):], f"{preset}.safetensors")
    path = WEIGHTS_DIR / f"{preset}.safetensors"
    if not path.is_file():
        shipped = ", ".join(shipped_presets()) or "none"
        raise PretrainedError(f"dyntok ships no weights for {preset!r} (shipped: {shipped}); train them with "
                              f"`dyntok pretrain {preset}`, or pass pretrained='hf-hub:owner/repo' or a file")
    return path


def _download(repo_id: str, filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        raise PretrainedError("loading weights from a hub needs huggingface_hub "
                              "(pip install huggingface_hub)") from None
    from ..models.hub import HubUnavailableError, hub_access

    try:
        with hub_access(f"{filename} from hub repository {repo_id!r}", "pretrained=True (the packaged weights) or "
                                                                         "the path of a local file"):
            return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except HubUnavailableError:
        raise
    except Exception as error:  # network, authentication and missing-file errors all end here
        raise PretrainedError(f"could not fetch {filename} from hub repository {repo_id!r} ({type(error).__name__}: "
                              f"{error}); offline, use the packaged weights (pretrained=True) or a local "
                              f"file") from None


def load_reference(preset: str, source: bool | str | os.PathLike = True):
    """The shipped reference of ``preset`` as a dense dyntok model (eval mode, on the CPU)."""
    path = resolve_weights(preset, source)
    try:
        model = load_model(path)
    except CheckpointError as error:
        raise PretrainedError(f"reference weights for {preset!r} are unusable: {error}") from None
    backbone = model.config["backbone"]
    if model.config["method"] != "dense" or backbone["name"] != preset:
        raise PretrainedError(f"{path} holds {model.config['method']} weights for {backbone['name']!r}, "
                              f"not the dense {preset!r}")
    return model.eval()


def reference_state_dict(preset: str, overrides: dict[str, Any], source: bool | str | os.PathLike = True
                         ) -> dict[str, torch.Tensor]:
    """The reference's dense ``state_dict`` for a model built with ``overrides``.

    Overrides that change the architecture are refused, naming the setting; a different ``num_classes``
    keeps every weight but the classifier, which starts afresh (fine-tuning on another dataset), as in timm.
    """
    from ..methods import create_model

    reference = load_reference(preset, source)
    # Compare what each side builds (preset plus overrides), so restating a preset's own value is no clash.
    _, asked = BackboneSpec(preset, overrides).resolved_kwargs()
    _, trained = BackboneSpec(preset, reference.config["backbone"]["overrides"]).resolved_kwargs()
    ignored = _FREE_OVERRIDES | {"num_classes"}
    clashing = sorted(key for key in asked.keys() | trained.keys()
                      if key not in ignored and asked.get(key) != trained.get(key))
    if clashing:
        built = ", ".join(f"{key}={asked.get(key)!r}" for key in clashing)
        made = ", ".join(f"{key}={trained.get(key)!r}" for key in clashing)
        raise PretrainedError(f"the {preset!r} reference was trained with {made}; it cannot be loaded into a model "
                              f"built with {built}. Drop those settings or train from scratch")
    weights = reference.state_dict()
    classes = overrides.get("num_classes")
    if classes is not None and classes != reference.num_classes:
        log.warning("the %s reference has %d classes; its classifier is replaced by a new one for %d classes",
                    preset, reference.num_classes, classes)
        fresh = create_model(preset, **overrides).state_dict()
        weights = {key: fresh[key] if key.startswith("vit.head.") else value for key, value in weights.items()}
    return weights


def model_card(preset: str, source: bool | str | os.PathLike = True) -> dict[str, Any]:
    """The model card stored with a reference: recipe, command, log, test top-1, data, seed, versions."""
    _, meta = load_tensors(resolve_weights(preset, source))
    return meta.get("card", {})


def export_reference(run_dir: str | Path, preset: str, destination: str | Path | None = None) -> Path:
    """Write a finished ``dyntok train`` run of ``preset`` as a shipped reference, with its model card."""
    import json

    import timm

    from .. import __version__

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
    destination = Path(destination) if destination is not None else WEIGHTS_DIR / f"{preset}.safetensors"
    _, run_meta = load_tensors(run_dir / "model.safetensors")
    extra = {key: value for key, value in run_meta.items() if key not in ("kind", "config", "budget")}
    return save_model(model, destination, extra={**extra, "card": card})
