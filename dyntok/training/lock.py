"""One run per output folder: a second run pointed at a busy folder stops at once instead of mixing checkpoints.

The lock is an advisory ``flock`` on ``<folder>/.dyntok.lock``, a file that also names its owner (pid, host,
start time) for the error message. The kernel drops the lock when its owner dies, however it dies (SIGKILL
included), so a lock left by a dead run is simply taken over; the file itself is never deleted, which
avoids the race where one run unlinks a lock another has just taken.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; runs there are not guarded
    fcntl = None

__all__ = ["RunLockedError", "LOCK_NAME", "claim_output_dir"]

log = logging.getLogger(__name__)

LOCK_NAME = ".dyntok.lock"


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""


@contextmanager
def claim_output_dir(folder: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``folder``'s lock for the duration of the block; ``RunLockedError`` if another run holds it."""
    if not enabled or fcntl is None:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(_busy_message(folder, _read_owner(handle))) from None
        except OSError as error:  # e.g. ENOLCK on a file system without locks: run, but say so
            log.warning("cannot lock %s (%s); make sure no other run writes to this folder", path, error)
            yield
            return
        previous = _read_owner(handle)
        if previous:
            log.warning("%s: taking over the lock of a run that is no longer alive (%s)", folder, _describe(previous))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)  # an empty lock file says "nobody": the next run takes it silently
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_owner(handle) -> dict:
    handle.seek(0)
    try:
        owner = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {"pid": "unknown"}
    return owner if isinstance(owner, dict) else {"pid": "unknown"}


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else ""
    return f"pid {owner.get('pid', 'unknown')} on {owner.get('host', 'an unknown host')}{when}"


def _busy_message(folder: Path, owner: dict) -> str:
    return (f"another run ({_describe(owner)}) is writing to {folder}; two runs in one folder would overwrite "
            f"each other's checkpoints. Wait for it to finish, stop it, or pass another --output-dir")
