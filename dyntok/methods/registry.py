"""Method registry and ``create_model``: one way to build any dyntok model by name.

A model name is ``<method>_<backbone>`` (``dynamicvit_vit_cifar_tiny``, ``dvt_deit_small_patch16_224``) or a
bare backbone name for the dense model (``vit_cifar_tiny``, ``vit_small_patch16_224``).
"""
from __future__ import annotations

import fnmatch
import inspect
from typing import Any, TypeVar

import torch

from ..models.vit import BACKBONE_OVERRIDES, PRESETS, BackboneSpec, list_backbones

__all__ = ["register_method", "create_model", "list_models", "list_methods", "get_method", "split_model_name",
           "check_model", "check_model_options"]

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
        from ..pretrained import load_pretrained

        return load_pretrained(name, overrides, kwargs, pretrained_file or pretrained)
    spec = BackboneSpec(backbone_name, overrides, pretrained=bool(pretrained), pretrained_file=pretrained_file)
    return get_method(method)(spec, **kwargs)


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
    return cls(spec, **method_kwargs)


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
        names += [backbone if method == "dense" else f"{method}_{backbone}" for method in list_methods()]
    return [name for name in names if fnmatch.fnmatch(name, pattern)]
