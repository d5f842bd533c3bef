"""Weights trained by dyntok itself, shipped inside the package and loaded the timm way.

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
versions. This module finds and reads those files on the floors below the methods (file I/O and the
backbones) and never builds a model, so ``create_model`` (:mod:`dyntok.methods.registry`) can use it; how the
files are trained and exported (``dyntok pretrain NAME``) is :mod:`dyntok.training.recipes`. See
docs/pretrained.md.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from timm.layers import trunc_normal_

from ..fileio import CheckpointError, load_tensors
from ..models.vit import PRESETS, BackboneSpec

__all__ = ["REFERENCE", "PretrainedError", "WEIGHTS_DIR", "available", "model_card", "packaged_file",
           "reference_state_dict", "refuse_architecture_changes", "resolve_weights", "shipped_presets"]

log = logging.getLogger(__name__)

#: Where the packaged files live: ``<name>.safetensors``.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

HUB_PREFIX = "hf-hub:"

#: ``pretrained=`` value that starts a method from its backbone's dense reference instead of its own weights.
REFERENCE = "reference"

#: Backbone settings that do not change the weights' shapes, so they may differ from the file's.
_FREE_OVERRIDES = frozenset({"drop_path_rate", "drop_rate"})

#: The dense model's classifier, renewed for another class count.
_CLASSIFIER = "vit.head"


class PretrainedError(ValueError):
    """Shipped weights that are missing, unreadable, or made for another model."""


def shipped_presets() -> list[str]:
    """Models with a packaged weights file in this installation (presets, and methods on them)."""
    return sorted(path.stem for path in WEIGHTS_DIR.glob("*.safetensors"))


def available(name: str) -> bool:
    return packaged_file(name).is_file()


def packaged_file(name: str) -> Path:
    """Where the package keeps (or would keep) the weights of model ``name``."""
    return WEIGHTS_DIR / f"{name}.safetensors"


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
    path = packaged_file(name)
    if not path.is_file():
        raise PretrainedError(_not_shipped(name))
    return path


def _not_shipped(name: str) -> str:
    """Why ``name`` has no packaged file, and the ways to get weights for it."""
    shipped = ", ".join(shipped_presets()) or "none"
    ways = [f"train them with `dyntok pretrain {name}` (`dyntok pretrain --help` lists the models with a recipe)"]
    if name not in PRESETS:  # a method on a preset
        ways.append(f"start the method from its dense reference with pretrained={REFERENCE!r}")
    ways.append("pass pretrained='hf-hub:owner/repo' or a file")
    return f"dyntok ships no weights for {name!r} (shipped: {shipped}); " + ", or ".join(ways)


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


def _read_reference(preset: str, source: bool | str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The dense ``state_dict`` in ``preset``'s reference file and the file's header, checked to be that preset."""
    path = resolve_weights(preset, source)
    try:
        weights, meta = load_tensors(path)
    except CheckpointError as error:
        raise PretrainedError(f"weights for {preset!r} are unusable: {error}") from None
    config = meta.get("config", {})
    method, name = config.get("method"), config.get("backbone", {}).get("name")
    if meta.get("kind") != "model" or name != preset:
        raise PretrainedError(f"{path} holds {method} weights for {name!r}, not for {preset!r}")
    if method != "dense":
        raise PretrainedError(f"{path} holds {method} weights for {preset!r}, not the dense {preset!r}")
    return weights, meta


def reference_state_dict(preset: str, overrides: dict[str, Any], source: bool | str | os.PathLike = True
                         ) -> dict[str, torch.Tensor]:
    """The reference's dense ``state_dict`` for a model built with ``overrides``.

    Overrides that change the architecture are refused, naming the setting; a different ``num_classes``
    keeps every weight but the classifier, which starts afresh (fine-tuning on another dataset), as timm's
    builder does.
    """
    weights, meta = _read_reference(preset, source)
    refuse_architecture_changes(meta["config"]["backbone"], overrides, f"the {preset!r} reference", {"num_classes"})
    classes, trained_classes = overrides.get("num_classes"), len(weights[f"{_CLASSIFIER}.weight"])
    if classes is not None and classes != trained_classes:
        log.warning("the %s reference has %d classes; its classifier is replaced by a new one for %d classes",
                    preset, trained_classes, classes)
        weights = {**weights, **_fresh_classifier(weights, classes)}
    return weights


def _fresh_classifier(weights: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """A new classifier for ``num_classes``, initialised as timm initialises a ViT's (no model is built)."""
    old = weights[f"{_CLASSIFIER}.weight"]
    weight = trunc_normal_(torch.empty(num_classes, old.shape[1], dtype=old.dtype), std=0.02)
    return {f"{_CLASSIFIER}.weight": weight, f"{_CLASSIFIER}.bias": torch.zeros(num_classes, dtype=old.dtype)}


def refuse_architecture_changes(trained_backbone: dict[str, Any], overrides: dict[str, Any], what: str,
                                free: set[str] | frozenset[str] = frozenset()) -> None:
    """A ``PretrainedError`` naming every backbone setting in ``overrides`` that would change the shapes of the
    weights trained on ``trained_backbone`` (a ``model.config["backbone"]``); ``free`` ones, and those that
    change training alone, may differ."""
    preset = trained_backbone["name"]
    # Compare what each side builds (preset plus overrides), so restating a preset's own value is no clash.
    _, asked = BackboneSpec(preset, overrides).resolved_kwargs()
    _, made = BackboneSpec(preset, trained_backbone.get("overrides", {})).resolved_kwargs()
    ignored = _FREE_OVERRIDES | set(free)
    clashing = sorted(key for key in asked.keys() | made.keys()
                      if key not in ignored and asked.get(key) != made.get(key))
    if clashing:
        built = ", ".join(f"{key}={asked.get(key)!r}" for key in clashing)
        trained_with = ", ".join(f"{key}={made.get(key)!r}" for key in clashing)
        raise PretrainedError(f"{what} was trained with {trained_with}; it cannot be loaded into a model built with "
                              f"{built}. Drop those settings or train from scratch")


def model_card(name: str, source: bool | str | os.PathLike = True) -> dict[str, Any]:
    """The model card stored with shipped weights: recipe, command, log, test top-1, data, seed, versions."""
    _, meta = load_tensors(resolve_weights(name, source))
    return meta.get("card", {})
