"""The ground floor of file I/O: one atomic write, safetensors files with JSON metadata, and file hashes.

Nothing here ever unpickles: a file from an untrusted source can at worst fail to load. Every file is written
to a temporary name beside its destination and moved into place (:func:`atomic_write`), so an interrupted
write never leaves a torn checkpoint, decode cache or benchmark record. This module imports nothing else
from dyntok: every layer above may use it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["CheckpointError", "CheckpointWriteError", "FolderNotWritableError", "WRITE_ERRORS", "atomic_write",
           "check_writable_folder", "save_tensors", "load_tensors", "load_meta", "file_sha256", "tensors_under",
           "prefixed"]

_FORMAT = "dyntok/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, not safetensors, or not a dyntok checkpoint."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission); any previous file is left as it was."""


class FolderNotWritableError(OSError):
    """An output folder that cannot be created or written; the message names the option that chose it."""


#: What a failed write raises: the OS's errors, and safetensors' own class for the I/O errors it meets.
WRITE_ERRORS = (OSError, SafetensorError)


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


@contextmanager
def atomic_write(path: str | Path) -> Iterator[str]:
    """Yield a temporary file name beside ``path`` to write; when the block ends it replaces ``path`` in one step.

    If the block raises, the temporary file is removed and ``path`` keeps its previous contents. The folder is
    created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _publish(tmp: str, path: Path) -> None:
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
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {"format": _FORMAT, "meta": json.dumps(meta)}
    had_previous = path.exists()
    try:
        with atomic_write(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except WRITE_ERRORS as error:
        kept = f"the previous {path.name} is intact" if had_previous else f"no {path.name} was written"
        cause = getattr(error, "strerror", None) or error
        raise CheckpointWriteError(getattr(error, "errno", None), f"could not write {path} ({cause}); {kept}. "
                                   f"Free some space or fix the folder's permissions, then run again") from error
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


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``tensors`` with every name under ``prefix`` (``'model.'``): several state dicts share one file."""
    return {prefix + name: tensor for name, tensor in tensors.items()}


def tensors_under(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The inverse of :func:`prefixed`: the tensors named under ``prefix``, with the prefix removed."""
    return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
