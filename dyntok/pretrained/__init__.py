"""Reference weights trained by dyntok itself, shipped inside the package and loaded the timm way.

Every adaptive method is applied to a *trained* ViT and judged by what it saves on that model, so dyntok
ships trained references for its CIFAR presets, and each learned method trained from the micro reference by
its paper's recipe (scaled to CIFAR-10 on 2 CPU cores)::

    model = dyntok.create_model("vit_cifar_micro", pretrained=True)                   # the packaged reference
    model = dyntok.create_model("dynamicvit_vit_cifar_micro", pretrained=True)         # DynamicViT's own weights
    model = dyntok.create_model("dynamicvit_vit_cifar_tiny", pretrained="reference")   # a method started from
                                                                                       # the dense reference
    model = dyntok.create_model("vit_cifar_micro", pretrained="hf-hub:owner/repo")     # the same file from a hub

A weights file is an ordinary dyntok model checkpoint (safetensors, never pickle) whose metadata carries a
model card: the recipe and the command that made it, its training log, test top-1, data, seed and library
versions. ``dyntok pretrain NAME`` re-runs the recipe (resumable) and writes a new file; see
docs/pretrained.md.
"""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_model, load_tensors, save_model
from ..models.vit import BackboneSpec

__all__ = ["RECIPES", "REFERENCE", "PretrainedError", "WEIGHTS_DIR", "available", "export_reference",
           "load_pretrained", "load_reference", "model_card", "reference_state_dict", "resolve_weights",
           "shipped_presets"]

log = logging.getLogger(__name__)

#: Where the packaged files live: ``<preset>.safetensors``.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

HUB_PREFIX = "hf-hub:"

#: ``pretrained=`` value that starts a method from its backbone's dense reference instead of its own weights.
REFERENCE = "reference"

#: Backbone settings that do not change the weights' shapes, so they may differ from the file's.
_FREE_OVERRIDES = frozenset({"drop_path_rate", "drop_rate"})


class PretrainedError(ValueError):
    """Reference weights that are missing, unreadable, or made for another model."""


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

    def train_config(self, name: str, output_dir: str | Path, data_root: str | None = None, device: str = "auto",
                     progress: bool = True):
        """The ``TrainConfig`` of this recipe; ``--resume`` is on, so a re-run continues an interrupted one."""
        from ..data import DataConfig
        from ..training import TrainConfig

        data = DataConfig(dataset=self.dataset, data_root=data_root, batch_size=self.batch_size,
                          holdout_size=self.holdout_size, seed=self.seed, randaugment=self.randaugment,
                          label_smoothing=self.label_smoothing)
        return TrainConfig(model=name, model_kwargs=dict(self.model_kwargs), data=data, output_dir=str(output_dir),
                           init=self.init, device=device, resume=True, progress=progress, **self.train_fields())

    def train_fields(self) -> dict[str, Any]:
        """The optimisation settings of the recipe, as a benchmark entry's ``train`` section."""
        return {"epochs": self.epochs, "lr": self.lr, "min_lr": self.min_lr, "weight_decay": self.weight_decay,
                "warmup_epochs": self.warmup_epochs, "label_smoothing": self.label_smoothing, "seed": self.seed,
                "compile": True}

    def command(self, name: str) -> str:
        """The equivalent ``dyntok train`` command line (the model card records it)."""
        from ..methods.registry import split_model_name

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
                  f"--holdout-size {self.holdout_size} --seed {self.seed} --compile"]
        return " ".join(words)


def _method_recipe(epochs: float, source: str, **settings: Any) -> Recipe:
    """A method fine-tuned from the micro reference (its teacher, where it distils) with the reference's data."""
    return Recipe(epochs=epochs, init="pretrained", source=source, **settings)


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
}


def shipped_presets() -> list[str]:
    """Presets with a reference file in this installation."""
    return sorted(path.stem for path in WEIGHTS_DIR.glob("*.safetensors"))


def available(preset: str) -> bool:
    return (WEIGHTS_DIR / f"{preset}.safetensors").is_file()


def resolve_weights(name: str, source: bool | str | os.PathLike = True) -> Path:
    """The file holding the shipped weights of model ``name`` (a preset, or ``<method>_<preset>``).

    ``source`` is ``True`` (the packaged file), ``"hf-hub:owner/repo"`` (``<name>.safetensors`` from that
    Hugging Face hub repository, cached by ``huggingface_hub``), or a path to a weights file.
    """
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith(HUB_PREFIX):
        path = Path(source)
        if not path.is_file():
            raise PretrainedError(f"no weights file at {path}")
        return path
    if isinstance(source, str):
        return _download(source[len(HUB_PREFIX):], f"{name}.safetensors")
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise PretrainedError(_not_shipped(name))
    return path


def _not_shipped(name: str) -> str:
    """Why ``name`` has no packaged file, and the ways to get weights for it."""
    from ..methods.registry import split_model_name

    shipped = ", ".join(shipped_presets()) or "none"
    ways = [f"train them with `dyntok pretrain {name}`"] if name in RECIPES else []
    if split_model_name(name)[0] != "dense":
        ways.append(f"start the method from its dense reference with pretrained={REFERENCE!r}")
    ways.append("pass pretrained='hf-hub:owner/repo' or a file")
    return f"dyntok ships no weights for {name!r} (shipped: {shipped}); " + ", or ".join(ways)


def _download(repo_id: str, filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        raise PretrainedError("loading weights from a hub needs huggingface_hub "
                              "(pip install huggingface_hub)") from None
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as error:  # network, authentication and missing-file errors all end here
        raise PretrainedError(f"could not fetch {filename} from hub repository {repo_id!r} ({type(error).__name__}: "
                              f"{error}); offline, use the packaged weights (pretrained=True) or a local "
                              f"file") from None


def load_reference(preset: str, source: bool | str | os.PathLike = True):
    """The shipped reference of ``preset`` as a dense dyntok model (eval mode, on the CPU)."""
    path = resolve_weights(preset, source)
    model = _load(path, preset)
    if model.config["method"] != "dense":
        raise PretrainedError(f"{path} holds {model.config['method']} weights for {preset!r}, not the dense "
                              f"{preset!r}")
    return model.eval()


def load_pretrained(name: str, overrides: dict[str, Any], method_kwargs: dict[str, Any],
                    source: bool | str | os.PathLike = True):
    """``create_model(name, pretrained=source, **overrides, **method_kwargs)`` for a dyntok preset.

    A dense preset is its reference. For a method, the file found for ``name`` holds either the method's
    own trained weights, loaded as they are (budget knobs and training-only settings may be changed), or a
    dense reference (a file given for a method), from which the method starts through ``init_from_dense``;
    ``source="reference"`` starts it from the backbone's packaged reference.
    """
    from ..methods.registry import get_method, split_model_name

    method, preset = split_model_name(name)
    reference_source = True if source == REFERENCE else source
    if method != "dense" and source != REFERENCE:
        path = resolve_weights(name, source)
        trained = _load(path, name)
        if trained.config["method"] == method:
            return _with_settings(trained, path, overrides, method_kwargs)
        if trained.config["method"] != "dense":
            raise PretrainedError(f"{path} holds {trained.config['method']} weights, not {method} weights or a "
                                  f"dense reference")
        reference_source = path
    model = get_method(method)(BackboneSpec(preset, overrides), **method_kwargs)
    model.init_from_dense(reference_state_dict(preset, overrides, reference_source))
    return model


def _load(path: Path, name: str):
    """The model in ``path``, which must be built on ``name``'s backbone."""
    from ..methods.registry import split_model_name

    try:
        model = load_model(path)
    except CheckpointError as error:
        raise PretrainedError(f"weights for {name!r} are unusable: {error}") from None
    preset = split_model_name(name)[1]
    if model.config["backbone"]["name"] != preset:
        raise PretrainedError(f"{path} holds {model.config['method']} weights for "
                              f"{model.config['backbone']['name']!r}, not for {preset!r}")
    return model


def _with_settings(trained, path: Path, overrides: dict[str, Any], method_kwargs: dict[str, Any]):
    """``trained`` rebuilt with the asked settings: budget knobs and training-only settings may change,
    anything that would change the weights' shapes is refused by name."""
    if not overrides and not method_kwargs:
        return trained
    config = trained.config
    _refuse_architecture_changes(trained, overrides, str(path))
    budget = trained.get_budget()
    spec = BackboneSpec(config["backbone"]["name"], {**config["backbone"]["overrides"], **overrides})
    model = type(trained)(spec, **{**config["method_kwargs"], **method_kwargs})
    try:
        model.load_state_dict(trained.state_dict())
    except RuntimeError:
        changed = ", ".join(f"{key}={value!r}" for key, value in config["method_kwargs"].items()
                            if key in method_kwargs and method_kwargs[key] != value)
        raise PretrainedError(f"{path} was trained with {changed}; these settings shape its weights, so they "
                              f"cannot differ from the file's") from None
    model.set_budget(**{key: value for key, value in budget.items() if key not in method_kwargs})
    return model


def reference_state_dict(preset: str, overrides: dict[str, Any], source: bool | str | os.PathLike = True
                         ) -> dict[str, torch.Tensor]:
    """The reference's dense ``state_dict`` for a model built with ``overrides``.

    Overrides that change the architecture are refused, naming the setting; a different ``num_classes``
    keeps every weight but the classifier, which starts afresh (fine-tuning on another dataset), as in timm.
    """
    from ..methods import create_model

    reference = load_reference(preset, source)
    _refuse_architecture_changes(reference, overrides, f"the {preset!r} reference", {"num_classes"})
    weights = reference.state_dict()
    classes = overrides.get("num_classes")
    if classes is not None and classes != reference.num_classes:
        log.warning("the %s reference has %d classes; its classifier is replaced by a new one for %d classes",
                    preset, reference.num_classes, classes)
        fresh = create_model(preset, **overrides).state_dict()
        weights = {key: fresh[key] if key.startswith("vit.head.") else value for key, value in weights.items()}
    return weights


def _refuse_architecture_changes(trained, overrides: dict[str, Any], what: str, free: set[str] = frozenset()) -> None:
    """A ``PretrainedError`` naming every backbone setting in ``overrides`` that would change the shapes of
    ``trained``'s weights (``free`` ones, and those that change training alone, may differ)."""
    preset = trained.config["backbone"]["name"]
    # Compare what each side builds (preset plus overrides), so restating a preset's own value is no clash.
    _, asked = BackboneSpec(preset, overrides).resolved_kwargs()
    _, made = BackboneSpec(preset, trained.config["backbone"]["overrides"]).resolved_kwargs()
    ignored = _FREE_OVERRIDES | set(free)
    clashing = sorted(key for key in asked.keys() | made.keys() if key not in ignored and asked.get(key) != made.get(key))
    if clashing:
        built = ", ".join(f"{key}={asked.get(key)!r}" for key in clashing)
        trained_with = ", ".join(f"{key}={made.get(key)!r}" for key in clashing)
        raise PretrainedError(f"{what} was trained with {trained_with}; it cannot be loaded into a model built with "
                              f"{built}. Drop those settings or train from scratch")


def model_card(preset: str, source: bool | str | os.PathLike = True) -> dict[str, Any]:
    """The model card stored with a reference: recipe, command, log, test top-1, data, seed, versions."""
    _, meta = load_tensors(resolve_weights(preset, source))
    return meta.get("card", {})


def export_reference(run_dir: str | Path, name: str, destination: str | Path | None = None) -> Path:
    """Write a finished ``dyntok train`` run of model ``name`` as shipped weights, with its model card.

    ``name`` is a preset (a reference) or ``<method>_<preset>`` (a method trained from the reference); the
    card records the recipe and its command, the training log, the test top-1 and GMACs at the budget the
    model is saved with, the data, the seed and the library versions.
    """
    import json

    import timm

    from .. import __version__

    run_dir = Path(run_dir)
    model = load_model(run_dir / "model.safetensors")
    config = json.loads((run_dir / "train_config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log_lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    recipe = RECIPES.get(name, Recipe())
    card = {
        "preset": name, "command": recipe.command(name), "recipe": config, "recipe_source": recipe.source,
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
    destination = Path(destination) if destination is not None else WEIGHTS_DIR / f"{name}.safetensors"
    _, run_meta = load_tensors(run_dir / "model.safetensors")
    extra = {key: value for key, value in run_meta.items() if key not in ("kind", "config", "budget")}
    return save_model(model, destination, extra={**extra, "card": card})
