"""Which data path a dataset takes: in memory when its decoded splits fit the memory budget, else streamed."""

from __future__ import annotations

import os
from typing import Sequence

from PIL import Image

__all__ = ["DATA_PATHS", "available_memory", "choose_data_path", "decoded_bytes"]

DATA_PATHS = ("auto", "memory", "stream")
_SAMPLED_FILES = 32  # image headers read to estimate a tree's decoded size


def available_memory() -> int:
    """Bytes of RAM the system can give without swapping (``MemAvailable``), else its total."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def decoded_bytes(files: Sequence[str], image_size: int | None) -> int:
    """Estimated bytes of ``files`` decoded as the in-memory path stores them (uint8 RGB).

    Reads only the headers of a few files spread over the list. Images of one size are stored at that
    size; a tree of mixed sizes is stored at ``image_size`` squared.
    """
    if not files:
        return 0
    step = max(1, len(files) // _SAMPLED_FILES)
    sizes = []
    for path in files[::step][:_SAMPLED_FILES]:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except Exception:  # the decode itself names the bad file; an estimate just skips it
            continue
    if not sizes:
        return 0
    if len(set(sizes)) > 1 and image_size is not None:
        return len(files) * 3 * image_size * image_size
    mean_pixels = sum(w * h for w, h in sizes) / len(sizes)
    return int(len(files) * 3 * mean_pixels)


def memory_budget(budget_gb: float | None) -> int:
    """Bytes one process may fill: the given budget, else half the available RAM over this node's processes."""
    if budget_gb is not None:
        return int(budget_gb * 1e9)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # each torchrun rank holds its own copy
    return available_memory() // (2 * local_processes)


def choose_data_path(requested: str, files: Sequence[str], image_size: int | None,
                     budget_gb: float | None) -> str:
    """``"memory"`` or ``"stream"`` for an image-folder tree whose splits list ``files``."""
    if requested != "auto":
        return requested
    return "memory" if decoded_bytes(files, image_size) <= memory_budget(budget_gb) else "stream"
