"""Checkpoints as safetensors: weights and tensors in the file, everything else as JSON metadata.

Nothing here ever unpickles: a checkpoint from an untrusted source can at worst fail to load. Files are
written to a temporary name and moved into place, so an interrupted write never leaves a torn checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["save_model", "load_model", "save_tensors", "load_tensors", "load_meta", "CheckpointError",
           "optimizer_state_to_tensors", "optimizer_state_from_tensors"]

_FORMAT = "dyntok/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, not safetensors, or not a dyntok checkpoint."""


def save_tensors(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and JSON-serialisable ``meta`` to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {"format": _FORMAT, "meta": json.dumps(meta)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: (tensors on CPU, meta)."""
    meta = load_meta(path)
    try:
        return load_file(str(path), device="cpu"), meta
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None


def load_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a file written by :func:`save_tensors`, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); dyntok checkpoints are "
                              f"safetensors files written by dyntok (pickled .pt/.pth files are refused)") from None
    if metadata.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a dyntok checkpoint (format "
                              f"{metadata.get('format')!r}); load raw timm weights with pretrained_file=")
    return json.loads(metadata["meta"])


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save weights, the config that rebuilds the model, and its budget knobs."""
    meta = {"kind": "model", "config": model.config, "budget": model.get_budget(), **(extra or {})}
    return save_tensors(path, model.state_dict(), meta)


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild a model saved by :func:`save_model` (or the model inside a training checkpoint)."""
    from .methods import create_model_from_config

    tensors, meta = load_tensors(path)
    if meta.get("kind") == "training":
        tensors = {name[len("model."):]: t for name, t in tensors.items() if name.startswith("model.")}
    elif meta.get("kind") != "model":
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r}, not a model")
    model = create_model_from_config(meta["config"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the model they say they are for: {error}") from None
    if meta.get("budget"):
        model.set_budget(**meta["budget"])
    return model.to(map_location)


def optimizer_state_to_tensors(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able skeleton (no pickle needed)."""
    tensors, skeleton = {}, {}
    for index, param_state in state["state"].items():
        entry = {}
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                entry[key] = value
        skeleton[str(index)] = entry
    return tensors, {"state": skeleton, "param_groups": state["param_groups"]}


def optimizer_state_from_tensors(tensors: dict[str, Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_tensors`."""
    state: dict[int, dict[str, Any]] = {int(index): dict(entry) for index, entry in skeleton["state"].items()}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": skeleton["param_groups"]}
