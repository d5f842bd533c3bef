"""Checkpoints as safetensors: weights and tensors in the file, everything else as JSON metadata.

Nothing here ever unpickles: a checkpoint from an untrusted source can at worst fail to load. Files are
written to a temporary name and moved into place, so an interrupted write never leaves a torn checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["save_model", "load_model", "save_tensors", "load_tensors", "load_meta", "file_sha256", "CheckpointError",
           "CheckpointWriteError", "WRITE_ERRORS", "FolderNotWritableError", "check_writable_folder", "config_mismatch", "weight_mismatch", "check_dense_init", "optimizer_state_to_tensors",
           "optimizer_state_from_tensors"]

_FORMAT = "dyntok/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, not safetensors, or not a dyntok checkpoint."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission); any previous file is left as it was."""


#: What a failed write raises: the OS's errors, and safetensors' own class for the I/O errors it meets.
WRITE_ERRORS = (OSError, SafetensorError)


class FolderNotWritableError(OSError):
    """An output folder that cannot be created or written; the message names the option that chose it."""


def check_writable_folder(folder: str | Path, option: str) -> Path:
    """Create ``folder`` if needed and make sure a file can be written in it, before any work is done.

    ``option`` names where the folder came from (``--output-dir``) for the message. The probe file is
    removed at once; root passes permission checks, so this also catches a read-only file system.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dyntok-write-test.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except WRITE_ERRORS as error:
        cause = getattr(error, "strerror", None) or error
        raise FolderNotWritableError(getattr(error, "errno", None), f"{option} {folder} cannot be written ({cause}); "
                                     f"choose a writable folder with {option}") from None
    return folder


def temporary_sibling(path: Path) -> str:
    """A new empty file beside ``path`` to write, then :func:`publish` onto it: an atomic write."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def publish(tmp: str, path: Path) -> None:
    """Move the written ``tmp`` onto ``path`` with the mode ``open`` gives a new file (0o666 less the umask).

    ``mkstemp`` and safetensors create files readable by their owner only; a checkpoint should be as
    readable as any other file the user writes.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_tensors(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and JSON-serialisable ``meta`` to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {"format": _FORMAT, "meta": json.dumps(meta)}
    had_previous = path.exists()
    tmp = None
    try:
        tmp = temporary_sibling(path)
        save_file(tensors, tmp, metadata=metadata)
        publish(tmp, path)
    except WRITE_ERRORS as error:
        kept = f"the previous {path.name} is intact" if had_previous else f"no {path.name} was written"
        cause = getattr(error, "strerror", None) or error
        raise CheckpointWriteError(getattr(error, "errno", None), f"could not write {path} ({cause}); {kept}. "
                                   f"Free some space or fix the folder's permissions, then run again") from error
    finally:
        if tmp is not None and os.path.exists(tmp):
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
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, json.JSONDecodeError, RecursionError) as error:  # deep nesting exhausts json's recursion
        raise CheckpointError(f"{path} has a damaged dyntok header ({type(error).__name__}: {error}); "
                              f"use another copy of the checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has a damaged dyntok header (meta is a {type(meta).__name__})")
    return meta


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes: names a checkpoint in provenance records and cache keys."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    from .models import BackboneSpec

    def settings(config: dict[str, Any]) -> dict[str, Any]:
        backbone = config.get("backbone", {})
        arch, kwargs = BackboneSpec(backbone.get("name", "?"), dict(backbone.get("overrides", {}))).resolved_kwargs()
        return {"method": config.get("method"), "backbone": arch, **kwargs, **config.get("method_kwargs", {})}

    found_settings, expected_settings = settings(found), settings(expected)
    differences = [f"{key}: {found_settings.get(key)!r} in the file, {expected_settings.get(key)!r} here"
                   for key in sorted(set(found_settings) | set(expected_settings), key=str)
                   if found_settings.get(key) != expected_settings.get(key)]
    return "; ".join(differences)


#: Backbone settings that change training but not the weights' shapes: a dense model may differ in them.
_TRAINING_ONLY = ("drop_path_rate", "drop_rate")


def check_dense_init(dense: nn.Module, model: nn.Module, source: str | Path) -> None:
    """A ``ValueError`` naming every difference when ``dense`` cannot initialise ``model`` (``--init``)."""
    if dense.config["method"] != "dense":
        raise CheckpointError(f"--init {source} is a {dense.config['method']} model; it must be a dense model of "
                              f"the same backbone (train one with --method dense)")
    found = {**dense.config, "method": model.config["method"], "method_kwargs": {}}
    expected = {**model.config, "method_kwargs": {}}
    for config in (found, expected):
        config["backbone"] = {**config["backbone"], "overrides": {key: value for key, value in
                                                                  config["backbone"]["overrides"].items()
                                                                  if key not in _TRAINING_ONLY}}
    differences = config_mismatch(found, expected)
    if differences:
        raise CheckpointError(f"--init {source} was trained for another backbone ({differences}); start from a "
                              f"dense model with the same backbone settings")


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
