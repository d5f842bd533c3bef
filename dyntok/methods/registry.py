"""Method registry and ``create_model``: one way to build any dyntok model by name.

A model name is ``<method>_<backbone>`` (``dynamicvit_vit_cifar_tiny``, ``dvt_deit_small_patch16_224``) or a
bare backbone name for the dense model (``vit_cifar_tiny``, ``vit_small_patch16_224``).
"""
from __future__ import annotations

import fnmatch
from typing import Any, TypeVar

from ..models.vit import BACKBONE_OVERRIDES, PRESETS, BackboneSpec, list_backbones

__all__ = ["register_method", "create_model", "list_models", "list_methods", "get_method", "split_model_name"]

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


def create_model_from_config(config: dict[str, Any]):
    """Rebuild a model from ``model.config`` (as saved in checkpoints), without pretrained downloads."""
    backbone = config["backbone"]
    spec = BackboneSpec(backbone["name"], dict(backbone.get("overrides", {})))
    return get_method(config["method"])(spec, **config.get("method_kwargs", {}))


def list_models(pattern: str = "*", include_timm: bool = False) -> list[str]:
    """Model names ``create_model`` accepts: every method on every preset (and timm ViTs if asked)."""
    names = []
    for backbone in list_backbones(include_timm):
        names += [backbone if method == "dense" else f"{method}_{backbone}" for method in list_methods()]
    return [name for name in names if fnmatch.fnmatch(name, pattern)]
