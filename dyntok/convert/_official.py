"""Reading an officially released checkpoint safely, and writing what it maps to as a dyntok checkpoint.

Official checkpoints are torch pickles. They are only ever read with ``weights_only=True``: tensors, plain
containers and, as the one allowed class, ``argparse.Namespace`` (the training arguments several releases
save beside the weights, which record the budget the model was trained at). Anything else in the pickle is
refused before it can run.
"""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from ..adapt import backbone_spec_of
from ..fileio import file_sha256
from ..methods import AdaptiveViT, save_model
from ..methods.registry import get_method
from ..models.vit import BackboneSpec

__all__ = ["ConversionError", "DEIT_EVAL_TRANSFORM", "Official", "backbone_dyntok_name", "backbone_official_name",
           "read_checkpoint", "timm_vit_backbone", "write_converted"]


#: How every official evaluation here prepares ImageNet images (DeiT's: resize to 256 bicubic, centre crop 224,
#: ImageNet statistics). Written into converted checkpoints; ``dyntok eval`` normalises with it.
#: The official evaluations' inputs (DeiT's: resize to 224 / 0.875 bicubic, centre crop 224, ImageNet mean and
#: std), recorded the way trained models record theirs, so that ``dyntok eval`` feeds a converted model the same.
DEIT_EVAL_TRANSFORM = {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD), "crop_pct": 0.875}


class ConversionError(ValueError):
    """An official checkpoint that cannot be read safely, or that is not what it was said to be."""


def backbone_dyntok_name(key: str) -> str:
    """The dyntok weight a timm ViT key maps to in a method of one backbone (held as ``self.vit``)."""
    return f"vit.{key}"


def backbone_official_name(key: str) -> str | None:
    """The timm key of a dyntok backbone weight (the inverse of :func:`backbone_dyntok_name`); None for a
    weight outside the backbone."""
    return key[len("vit."):] if key.startswith("vit.") else None


@dataclass
class Official:
    """What an official file holds: its weights (the ones its evaluation loads) and its training arguments."""

    path: Path
    weights: dict[str, Tensor]
    weights_key: str | None
    args: dict[str, Any] = field(default_factory=dict)
    #: The file's top-level entries; beside the weights, what some releases record (results, thresholds...).
    entries: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: str | Path, weight_keys: Iterable[str]) -> Official:
    """Read ``path`` without running code and pick its weights: the first of ``weight_keys`` present (the
    order the official evaluation looks for them), or the file itself when it is a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no official checkpoint at {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"needs {found.group(1)}" if found else "holds objects other than tensors"
        raise ConversionError(f"refusing to load {path}: its pickle {what}, which is not a tensor or a plain "
                              f"container (a pickle that would run code, or a damaged file)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        raise ConversionError(f"{path} is truncated or not a torch checkpoint ({type(error).__name__}); "
                              f"download it again") from None
    return _pick_weights(path, content, tuple(weight_keys))


def _pick_weights(path: Path, content: Any, weight_keys: tuple[str, ...]) -> Official:
    if not isinstance(content, dict):
        raise ConversionError(f"{path} holds a {type(content).__name__}, not a checkpoint dictionary")
    args = content.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else {}
    for key in weight_keys:
        if isinstance(content.get(key), dict):
            return Official(path, _tensors(path, content[key]), key, args, content)
    if content and all(isinstance(value, Tensor) for value in content.values()):
        return Official(path, _tensors(path, content), None, args)
    raise ConversionError(f"{path} has none of the entries {list(weight_keys)} where the official code keeps its "
                          f"weights (found {sorted(map(str, content))[:6]})")


def _tensors(path: Path, state: dict[str, Any]) -> dict[str, Tensor]:
    """The state dict's tensors, without the ``module.`` prefix a DistributedDataParallel save adds."""
    if not all(isinstance(value, Tensor) for value in state.values()):
        raise ConversionError(f"{path}: the weights entry holds values other than tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def timm_vit_backbone(official: Official, num_heads: int | None = None,
                      prefix: str = "") -> tuple[str, dict[str, Any]]:
    """The timm DeiT that holds weights of these shapes (timm's key names after ``prefix``), as (name, overrides).

    DeiT-Ti/S/B by width; heads of 64 channels as in every DeiT unless ``num_heads`` says otherwise (the
    weights do not show how the attention is split).
    """
    weights = {key[len(prefix):]: value for key, value in official.weights.items() if key.startswith(prefix)}
    required = ("pos_embed", "patch_embed.proj.weight", "head.weight", "blocks.0.mlp.fc1.weight")
    absent = [key for key in required if key not in weights]
    if absent:
        raise ConversionError(f"{official.path} has no {', '.join(prefix + key for key in absent)}: not a ViT "
                              f"checkpoint with timm's key names (found {sorted(official.weights)[:5]} ...)")
    embed_dim, patch = weights["patch_embed.proj.weight"].shape[0], weights["patch_embed.proj.weight"].shape[-1]
    num_patches = weights["pos_embed"].shape[1] - 1
    depth = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("blocks."))
    kwargs = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads or max(1, embed_dim // 64),
                  patch_size=patch, img_size=patch * round(num_patches ** 0.5),
                  num_classes=weights["head.weight"].shape[0],
                  mlp_ratio=weights["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim)
    arch = {192: "deit_tiny_patch16_224", 768: "deit_base_patch16_224"}.get(embed_dim, "deit_small_patch16_224")
    with torch.device("meta"):
        spec = backbone_spec_of(timm.create_model(arch, weight_init="skip", **kwargs))
    return spec.name, dict(spec.overrides)


def write_converted(official: Official, out: str | Path, method: str, backbone: tuple[str, dict[str, Any]],
                    options: dict[str, Any], budget: dict[str, Any],
                    dyntok_name: Callable[[str], str | None], source: str,
                    reported: dict[str, Any] | None = None) -> AdaptiveViT:
    """Build ``method`` on ``backbone`` with ``options``, load the renamed official weights, set ``budget``
    and save the model to ``out``. ``dyntok_name`` maps an official key to dyntok's (None: not mapped);
    ``reported``: results the official file records about itself, kept in the checkpoint's metadata."""
    model = get_method(method)(BackboneSpec(*backbone), **options)
    renamed = _renamed_weights(official, model.state_dict(), dyntok_name, source)
    model.load_state_dict(renamed)
    model.set_budget(**budget)
    origin = {"source": source, "file": official.path.name, "sha256": file_sha256(official.path),
              "weights_key": official.weights_key, **({"reported": reported} if reported else {})}
    save_model(model, out, extra={"converted_from": origin, "eval_transform": DEIT_EVAL_TRANSFORM})
    return model.eval()


def _renamed_weights(official: Official, expected: dict[str, Tensor], dyntok_name: Callable[[str], str | None],
                     source: str) -> dict[str, Tensor]:
    """The official weights under dyntok's names; a ``ConversionError`` naming every key that does not fit."""
    renamed, unexpected, misshapen = {}, [], []
    for key, value in official.weights.items():
        name = dyntok_name(key)
        if name not in expected:
            unexpected.append(key)
        elif value.shape != expected[name].shape:
            misshapen.append(f"{key} {tuple(value.shape)} for {tuple(expected[name].shape)}")
        else:
            renamed[name] = value.to(expected[name].dtype)
    missing = sorted(set(expected) - set(renamed) - {dyntok_name(key) for key in official.weights})
    if unexpected or missing or misshapen:
        raise ConversionError(f"{official.path} is not a {source} checkpoint of the expected shape: "
                              + _describe(("keys that do not map", sorted(unexpected)),
                                          ("dyntok weights left without a value", missing),
                                          ("wrong shapes", misshapen)))
    return renamed


def _describe(*parts: tuple[str, list[str]], limit: int = 4) -> str:
    return "; ".join(f"{label}: {', '.join(items[:limit])}{' ...' if len(items) > limit else ''}"
                     for label, items in parts if items)
