"""Method registry, ``create_model`` and model files: one way to build, save and rebuild any dyntok model.

A model name is ``<method>_<backbone>`` (``dynamicvit_vit_cifar_tiny``, ``dvt_deit_small_patch16_224``) or a
bare backbone name for the dense model (``vit_cifar_tiny``, ``vit_small_patch16_224``).
"""
from __future__ import annotations

import fnmatch
import inspect
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..fileio import CheckpointError, load_tensors, save_tensors, tensors_under
from ..models.vit import BACKBONE_OVERRIDES, PRESETS, BackboneSpec, list_backbones
from ..pretrained import REFERENCE, PretrainedError, reference_state_dict, refuse_architecture_changes, resolve_weights

__all__ = ["register_method", "create_model", "list_models", "list_methods", "get_method", "split_model_name",
           "model_name", "create_model_from_config", "save_model", "load_model", "config_mismatch", "check_model",
           "check_model_options", "weight_mismatch"]

#: Keyword arguments ``create_model`` itself takes besides backbone overrides and method options.
CREATE_MODEL_ARGUMENTS = ("pretrained", "pretrained_file")

_METHODS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_method(cls: T) -> T:
    """Class decorator: make a method available by its ``method_name``."""
    name = cls.method_name
    if not name or "_" in name:
        raise ValueError(f"method_name must be a non-empty word without '_', got {name!r}")
    _METHODS[name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of the registered methods, ``dense`` first."""
    return sorted(_METHODS, key=lambda name: (name != "dense", name))


def get_method(name: str) -> type:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(list_methods())}") from None


def split_model_name(name: str) -> tuple[str, str]:
    """``'dvt_vit_cifar_tiny'`` -> ``('dvt', 'vit_cifar_tiny')``; a bare backbone is the dense method."""
    prefix, _, rest = name.partition("_")
    if prefix in _METHODS and prefix != "dense" and rest:
        return prefix, rest
    if prefix == "dense" and rest:
        return "dense", rest
    return "dense", name


def model_name(method: str, backbone: str) -> str:
    """The inverse of :func:`split_model_name`: ``('dvt', 'vit_cifar_tiny')`` -> ``'dvt_vit_cifar_tiny'``."""
    return backbone if method == "dense" else f"{method}_{backbone}"


def create_model(name: str, pretrained: bool | str = False, pretrained_file: str | None = None, **kwargs: Any):
    """Build a model by name, like ``timm.create_model``.

    Backbone overrides (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``num_classes``,
    ``drop_path_rate``...) shape the backbone; every other keyword goes to the method (``keep_ratio=0.7``).

    ``pretrained`` on a dyntok preset loads the weights dyntok ships for ``name``: the dense reference of a
    preset, or a method's own weights trained from it by its recipe (``True``: the file in the package;
    ``"hf-hub:owner/repo"`` or a path: that file). ``pretrained="reference"`` starts a method from the
    preset's dense reference instead, through its ``init_from_dense``. On a timm name it loads timm's
    weights for the backbone (from the hub, or ``pretrained_file``) and the method starts from them.
    """
    method, backbone_name = split_model_name(name)
    overrides = {key: kwargs.pop(key) for key in BACKBONE_OVERRIDES if key in kwargs}
    if pretrained and backbone_name in PRESETS:
        return _create_pretrained(method, backbone_name, overrides, kwargs, pretrained_file or pretrained)
    spec = BackboneSpec(backbone_name, overrides, pretrained=bool(pretrained), pretrained_file=pretrained_file)
    return get_method(method)(spec, **kwargs)


def _create_pretrained(method: str, preset: str, overrides: dict[str, Any], method_kwargs: dict[str, Any],
                       source: bool | str | Path):
    """``create_model`` with ``pretrained=source`` on a dyntok preset.

    A dense preset is its reference. For a method, the file found for its name holds either the method's own
    trained weights, loaded as they are (budget knobs and training-only settings may be changed), or a dense
    reference (a file given for a method), from which the method starts through ``init_from_dense``;
    ``source="reference"`` starts it from the backbone's packaged reference.
    """
    reference_source = True if source == REFERENCE else source
    if method != "dense" and source != REFERENCE:
        path = resolve_weights(model_name(method, preset), source)
        trained = _load_shipped(path, preset)
        if trained.config["method"] == method:
            return _with_settings(trained, path, overrides, method_kwargs)
        if trained.config["method"] != "dense":
            raise PretrainedError(f"{path} holds {trained.config['method']} weights, not {method} weights or a "
                                  f"dense reference")
        reference_source = path
    model = get_method(method)(BackboneSpec(preset, overrides), **method_kwargs)
    model.init_from_dense(reference_state_dict(preset, overrides, reference_source))
    return model


def _load_shipped(path: Path, preset: str):
    """The model in ``path``, which must be built on ``preset``."""
    try:
        model = load_model(path)
    except CheckpointError as error:
        raise PretrainedError(f"weights for {preset!r} are unusable: {error}") from None
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
    refuse_architecture_changes(config["backbone"], overrides, str(path))
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


def check_model_options(name: str, kwargs: dict[str, Any]) -> None:
    """A ``ValueError`` listing what the method takes when ``kwargs`` holds a name it does not."""
    _check_options(get_method(split_model_name(name)[0]), kwargs)


def _check_options(cls: type, kwargs: dict[str, Any]) -> None:
    options = {key: value for key, value in kwargs.items()
               if key not in BACKBONE_OVERRIDES and key not in CREATE_MODEL_ARGUMENTS}
    accepted = [option for option in inspect.signature(cls).parameters if option != "backbone"]
    unknown = sorted(set(options) - set(accepted), key=str)
    if unknown:
        raise ValueError(f"{cls.__name__} does not take {', '.join(map(repr, unknown))}; it takes "
                         f"{', '.join(accepted) or 'no options'}, plus backbone overrides "
                         f"({', '.join(BACKBONE_OVERRIDES)})")


def check_model(name: str, kwargs: dict[str, Any]):
    """Build ``create_model(name, **kwargs)`` on the meta device, without pretrained weights: every option is
    checked (names, values, size bound) and nothing is allocated. Returns the shapes-only model, whose
    ``budget_space()`` checks budget knobs; ``ValueError`` names what cannot be built."""
    check_model_options(name, kwargs)
    buildable = {key: value for key, value in kwargs.items() if key not in CREATE_MODEL_ARGUMENTS}
    try:
        with torch.device("meta"):
            return create_model(name, **buildable)
    except (TypeError, AssertionError, RuntimeError) as error:  # a method given an option of the wrong type
        raise ValueError(f"{name} cannot be built with {buildable} ({type(error).__name__}: {error})") from None


def create_model_from_config(config: dict[str, Any]):
    """Rebuild a model from ``model.config`` (as saved in checkpoints), without pretrained downloads.

    The config may come from an untrusted file: its layout is checked here, its values by the method and
    the backbone (:mod:`dyntok.models.limits`), before anything is allocated.
    """
    backbone = _field(config, "backbone", dict)
    overrides = dict(_field(backbone, "overrides", dict, {}))
    unknown = sorted(set(overrides) - set(BACKBONE_OVERRIDES), key=str)
    if unknown:
        raise ValueError(f"backbone overrides {unknown} are not backbone settings ({', '.join(BACKBONE_OVERRIDES)})")
    method_kwargs = dict(_field(config, "method_kwargs", dict, {}))
    spec = BackboneSpec(_field(backbone, "name", str), overrides)
    cls = get_method(_field(config, "method", str))
    _check_options(cls, method_kwargs)
    return cls(spec, **{**cls.defaults_for_old_configs, **method_kwargs})


def _field(values: Any, key: str, kind: type, default: Any = None) -> Any:
    if not isinstance(values, dict) or (key not in values and default is None):
        raise ValueError(f"the config has no {key!r}")
    value = values.get(key, default)
    if not isinstance(value, kind):
        raise ValueError(f"the config's {key!r} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def list_models(pattern: str = "*", include_timm: bool = False) -> list[str]:
    """Model names ``create_model`` accepts: every method on every preset (and timm ViTs if asked)."""
    names = []
    for backbone in list_backbones(include_timm):
        names += [model_name(method, backbone) for method in list_methods()]
    return [name for name in names if fnmatch.fnmatch(name, pattern)]


# ------------------------------------------------------------------------------------------ model files
def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save weights, the config that rebuilds the model, and its budget knobs."""
    meta = {"kind": "model", "config": model.config, "budget": model.get_budget(), **(extra or {})}
    return save_tensors(path, model.state_dict(), meta)


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild a model saved by :func:`save_model` (or the model inside a training checkpoint)."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") == "training":
        tensors = tensors_under(tensors, "model.")  # a training checkpoint keeps the model's weights there
    elif meta.get("kind") != "model":
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r}, not a model")
    try:
        model = create_model_from_config(meta["config"])
    except (KeyError, TypeError, ValueError, AssertionError, RecursionError) as error:
        raise CheckpointError(f"{path} describes a model dyntok cannot build ({type(error).__name__}: {error}); "
                              f"it was written by another dyntok version or edited") from None
    problems = weight_mismatch(model.state_dict(), tensors)
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit the model its header describes "
                              f"({meta['config'].get('method')} on {meta['config'].get('backbone', {}).get('name')}): "
                              f"{problems}; the file is damaged or was edited")
    model.load_state_dict(tensors)
    if meta.get("budget"):
        model.set_budget(**meta["budget"])
    return model.to(map_location)


def weight_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor], limit: int = 3) -> str:
    """Missing, unexpected, misshapen and mistyped weights in a few words ('' when they fit).

    A weight stored in another dtype is refused rather than cast: ``load_state_dict`` would silently round
    float64 or reinterpret integer tensors, and dyntok never writes one (the file was converted or edited).
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = [name for name in expected if name in found]
    misshapen = [f"{name} {tuple(found[name].shape)} instead of {tuple(expected[name].shape)}"
                 for name in common if found[name].shape != expected[name].shape]
    mistyped = [f"{name} {found[name].dtype} instead of {expected[name].dtype}"
                for name in common if found[name].dtype != expected[name].dtype]
    parts = [f"{label}: {', '.join(items[:limit])}{' ...' if len(items) > limit else ''}"
             for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen),
                                  ("wrong dtype", mistyped))
             if items]
    return "; ".join(parts)


def config_mismatch(found: dict[str, Any], expected: dict[str, Any]) -> str:
    """How two ``model.config`` dicts differ, setting by setting: ``'num_classes: 100 in the file, 10 here'``."""
    def settings(config: dict[str, Any]) -> dict[str, Any]:
        backbone = config.get("backbone", {})
        arch, kwargs = BackboneSpec(backbone.get("name", "?"), dict(backbone.get("overrides", {}))).resolved_kwargs()
        return {"method": config.get("method"), "backbone": arch, **kwargs, **config.get("method_kwargs", {})}

    found_settings, expected_settings = settings(found), settings(expected)
    differences = [f"{key}: {found_settings.get(key)!r} in the file, {expected_settings.get(key)!r} here"
                   for key in sorted(set(found_settings) | set(expected_settings), key=str)
                   if found_settings.get(key) != expected_settings.get(key)]
    return "; ".join(differences)
