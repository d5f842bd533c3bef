"""Errors raised by the data layer.

Each one says what was wrong *and* what to do about it, because the person reading it is
usually at a terminal halfway through setting up an experiment.
"""

from __future__ import annotations

__all__ = ["DatasetNotFoundError", "DatasetLayoutError", "ImageDecodeError", "ImageSizeError"]

EXPECTED_LAYOUT = (
    "Expected an image-folder tree:\n"
    "  <root>/train/<class>/*.jpg\n"
    "  <root>/test/<class>/*.jpg   (or <root>/val/<class>/*.jpg)\n"
    "with the same non-empty class folders in both splits (class index = sorted folder name)."
)


class DatasetNotFoundError(FileNotFoundError):
    """No data root holds the requested dataset; the message lists every place looked."""


class DatasetLayoutError(ValueError):
    """A dataset folder exists but is not laid out as ``root/{train,test|val}/<class>/*``."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}\n{EXPECTED_LAYOUT}")


class ImageDecodeError(ValueError):
    """An image file could not be read; the message names the file."""

    def __init__(self, path, cause: BaseException):
        if isinstance(cause, PermissionError):
            problem = "This user may not read the file. Fix its permissions (e.g. chmod a+r) or run as its owner"
        elif isinstance(cause, FileNotFoundError):
            problem = "The file is missing. Restore it (re-extract the dataset) or delete the entry"
        else:
            problem = ("The file is corrupt, truncated or not an image. Replace it with a good copy "
                       "(re-extract or re-download the dataset) or delete it")
        super().__init__(
            f"Cannot decode image {str(path)!r}: {type(cause).__name__}: {cause}\n"
            f"{problem}, then run again. Nothing was cached, so no other file is affected."
        )
        self.path = str(path)


class ImageSizeError(ValueError):
    """Images of one dataset differ in size and no common size was requested."""
