"""The dependency versions dyntok is tested with, and a warning when the installed ones differ.

MAC cross-checks, fused-attention dispatch and timm's model internals all moved between releases; a torch
or timm outside the range below may still work, but results are not vouched for, so dyntok says so once
at import time instead of letting figures change quietly. ``requirements/lock.txt`` pins what
``./run.sh`` installs; this range is what the test suite was run with (see docs/install.md).
"""
from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

__all__ = ["__version__", "TESTED", "DependencyVersionWarning", "untested_versions", "warn_if_untested"]

#: dyntok's own version (the package re-exports it as ``dyntok.__version__``).
__version__ = "0.1.0"

#: Package -> (oldest, newest) release the test suite has passed with, inclusive (local tags ignored).
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.14.1", "2.15.0"),
    "timm": ("1.0.31", "1.0.31"),
}


class DependencyVersionWarning(UserWarning):
    """An installed dependency is outside the range dyntok was tested with."""


def untested_versions(installed: dict[str, str] | None = None) -> list[str]:
    """One sentence per installed package outside :data:`TESTED` (``installed`` overrides for tests)."""
    problems = []
    for package, (oldest, newest) in TESTED.items():
        found = (installed or {}).get(package) or _installed_version(package)
        if found is None:
            continue
        release = Version(Version(found).base_version)
        if not Version(oldest) <= release <= Version(newest):
            span = oldest if oldest == newest else f"{oldest} to {newest}"
            problems.append(f"{package} {found} is installed; dyntok is tested with {package} {span}")
    return problems


def warn_if_untested(installed: dict[str, str] | None = None) -> None:
    """Warn once per process (Python's default warning filter) if a dependency is outside the tested range."""
    problems = untested_versions(installed)
    if problems:
        warnings.warn("; ".join(problems) + ". Results (MAC cross-checks, speed) may differ; ./run.sh installs "
                      "the tested versions from requirements/lock.txt.", DependencyVersionWarning, stacklevel=3)


def _installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
