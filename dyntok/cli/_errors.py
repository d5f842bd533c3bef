"""How the ``dyntok`` command words a failure: the cause and the fix in one line, and an exit code.

dyntok's own errors already say both (they are raised with the option or file that caused them); the OS's
errors name a file and an errno, which this module turns into the fix. Anything else is a bug: the user
gets one line saying how to see the traceback.
"""
from __future__ import annotations

import errno

import torch
from safetensors import SafetensorError

__all__ = ["explain", "USER_ERROR", "INTERNAL_ERROR"]

#: Exit code of a failure the user can fix (bad input, full disk, busy folder); argparse uses it too.
USER_ERROR = 2
#: Exit code of a failure that is dyntok's fault.
INTERNAL_ERROR = 1

#: What to do about an OS error, by errno.
_FIXES = {
    errno.ENOSPC: "free some space on that disk, or write elsewhere",
    errno.EDQUOT: "free some space within your quota, or write elsewhere",
    errno.EACCES: "choose a folder you can write to (or read from), or fix its permissions",
    errno.EPERM: "choose a folder you can write to (or read from), or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EISDIR: "that path is a folder: give a file",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def explain(error: Exception) -> tuple[str, int]:
    """``(message, exit code)`` for ``error``: one line, or a short paragraph for dyntok's own guidance."""
    from ..training.lock import RunLockedError

    if isinstance(error, (ValueError, FloatingPointError, RunLockedError)):
        return str(error), USER_ERROR
    if isinstance(error, OSError):
        return _os_error(error), USER_ERROR
    if isinstance(error, SafetensorError):
        return (f"a safetensors file could not be read or written ({error}); check that the disk has free space "
                f"and the folder is writable"), USER_ERROR
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or _is_cpu_out_of_memory(error):
        return (f"out of memory ({_first_line(error) or 'no details'}): lower --batch-size, use a smaller model, "
                f"or run on a device with more memory"), USER_ERROR
    return (f"{type(error).__name__}: {_first_line(error)}. This looks like a bug in dyntok: run again with --debug "
            f"(or DYNTOK_DEBUG=1) for the traceback, and report it"), INTERNAL_ERROR


def _os_error(error: OSError) -> str:
    """The OS's message with the file it is about and the fix (dyntok's own messages are kept as they are)."""
    if error.filename is None:  # raised by dyntok with its own message (a failed write), without "[Errno N]"
        return error.strerror or str(error)
    where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
    fix = _FIXES.get(error.errno, "check that path")
    return f"{where}: {error.strerror or error}; {fix}"


def _is_cpu_out_of_memory(error: Exception) -> bool:
    """PyTorch's CPU allocator reports a failed allocation as a plain ``RuntimeError``."""
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""
