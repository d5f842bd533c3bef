"""Where datasets live: data-root lookup and dataset discovery.

A dataset is looked for in these roots, first hit wins:

1. the explicit ``data_root`` argument (CLI ``--data-root``),
2. ``$DYNTOK_DATA``,
3. ``./data``,
4. ``../shared/data`` (the project's shared copy, seen from the repository root).

Inside a root, a dataset called ``cifar10`` is either torchvision's pickled files
(``<root>/cifar-10-batches-py``; ``cifar-100-python`` for ``cifar100``) or an image-folder tree
``<root>/cifar10/{train,test|val}/<class>/*``. Any other name is looked for as an image-folder
tree only. A name that looks like a path (``./x``, ``~/x``, ``/x/y``) *is* the tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import DatasetNotFoundError

__all__ = [
    "DATA_ENV_VAR",
    "TORCHVISION_CIFAR",
    "DataRoot",
    "DatasetLocation",
    "candidate_roots",
    "find_dataset",
    "canonical_name",
]

DATA_ENV_VAR = "DYNTOK_DATA"

# Dataset name -> folder torchvision's CIFAR classes extract their pickled batches into.
TORCHVISION_CIFAR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass(frozen=True)
class DataRoot:
    """A folder that may contain datasets, and why it is searched (for error messages)."""

    path: Path
    origin: str  # "--data-root", "$DYNTOK_DATA", "./data", "../shared/data"


@dataclass(frozen=True)
class DatasetLocation:
    """Where a dataset was found and in which format."""

    name: str
    kind: Literal["folder", "torchvision"]
    path: Path  # the tree for "folder", torchvision's ``root`` argument for "torchvision"


def canonical_name(name: str) -> str:
    """``'CIFAR-10'`` / ``'cifar_10'`` -> ``'cifar10'``; other names are returned unchanged."""
    squashed = name.lower().replace("-", "").replace("_", "")
    return squashed if squashed in TORCHVISION_CIFAR else name


def candidate_roots(data_root: str | os.PathLike | None = None) -> list[DataRoot]:
    """The data roots to search, in priority order (relative ones resolved against the cwd)."""
    roots = []
    if data_root:
        roots.append(DataRoot(Path(data_root).expanduser(), "--data-root"))
    if os.environ.get(DATA_ENV_VAR):
        roots.append(DataRoot(Path(os.environ[DATA_ENV_VAR]).expanduser(), f"${DATA_ENV_VAR}"))
    roots.append(DataRoot(Path("data"), "./data"))
    roots.append(DataRoot(Path("..") / "shared" / "data", "../shared/data"))
    return [DataRoot(Path(os.path.abspath(root.path)), root.origin) for root in roots]


def looks_like_path(name: str) -> bool:
    """True for names meant as a filesystem path rather than a dataset name."""
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    return name.startswith((".", "~")) or any(sep in name for sep in separators)


def find_dataset(name: str, data_root: str | os.PathLike | None = None) -> DatasetLocation:
    """Locate dataset ``name`` (or the tree at path ``name``).

    Raises:
        DatasetNotFoundError: nothing matched; the message lists every place looked.
    """
    if looks_like_path(name):
        tree = Path(os.path.abspath(Path(name).expanduser()))
        if tree.is_dir():  # its layout is checked when it is loaded, with a precise message
            return DatasetLocation(tree.name, "folder", tree)
        raise DatasetNotFoundError(f"Dataset folder {str(tree)!r} does not exist.")

    name = canonical_name(name)
    looked = []
    for root in candidate_roots(data_root):
        location, places = _find_in_root(name, root)
        if location is not None:
            return location
        looked += places
    raise DatasetNotFoundError(not_found_message(name, looked))


def _find_in_root(name: str, root: DataRoot) -> tuple[DatasetLocation | None, list[str]]:
    """Look for ``name`` in one root; return the hit (or None) and the places checked."""
    places = []
    # torchvision's files first: they hold the official, lossless pixels.
    if name in TORCHVISION_CIFAR:
        pickles = root.path / TORCHVISION_CIFAR[name]
        if pickles.is_dir():
            return DatasetLocation(name, "torchvision", root.path), places
        places.append(f"{pickles}  (torchvision files, from {root.origin})")
    tree = root.path / name
    if (tree / "train").is_dir():
        return DatasetLocation(name, "folder", tree), places
    note = "  [exists but has no train/ folder]" if tree.is_dir() else ""
    places.append(f"{tree}/{{train,test|val}}/<class>/  (image folder, from {root.origin}){note}")
    return None, places


def not_found_message(name: str, looked: list[str]) -> str:
    fixes = [
        "pass --data-root DIR (data_root=DIR) for a DIR that contains it",
        f"set {DATA_ENV_VAR}=DIR",
        "give the path of an image-folder tree as the dataset name",
    ]
    if name in TORCHVISION_CIFAR:
        fixes.append("use --download (download=True) to fetch it with torchvision")
    return (
        f"Dataset {name!r} not found. Looked in:\n"
        + "".join(f"  - {place}\n" for place in looked)
        + "To fix: "
        + "; or ".join(fixes)
        + "."
    )
