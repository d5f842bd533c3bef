"""Image folders as they come: odd colour modes and depths, unreadable or missing files, odd paths.

Each is loaded correctly or refused with the file and what to do; never silently changed. Corrupt and
truncated files, mixed sizes, empty class folders and class lists that differ between splits are covered in
tests/test_data.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dyntok.data import folder
from dyntok.data.datasets import load_dataset
from dyntok.data.errors import ImageDecodeError

from .conftest import make_image_folder

SIZE = 8


def tree_with(tmp_path, image: Image.Image, name: str = "00.png"):
    """A 2-class tree whose first training image (in sorted order) is ``image``."""
    root = make_image_folder(tmp_path / "tree", classes=2, per_class=2, size=SIZE)
    target = root / "train" / "class_0" / name
    (root / "train" / "class_0" / "0.png").unlink()
    image.save(target)
    return root, target


def first_image(root, tmp_path) -> np.ndarray:
    data = load_dataset(str(root), "train", cache_dir=tmp_path / "cache")
    return data.images[0].permute(1, 2, 0).numpy()


GREY = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE) * 3
COLOUR = np.stack([GREY, 255 - GREY, GREY // 2], axis=-1)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1"])
def test_grey_alpha_palette_and_bilevel_images_become_the_right_rgb(tmp_path, mode):
    source = Image.fromarray(COLOUR if mode in ("RGBA", "P") else GREY)
    image = source.convert(mode)
    root, _ = tree_with(tmp_path, image)
    expected = np.asarray(image.convert("RGB"))
    if mode in ("L", "LA"):
        expected = np.repeat(GREY[..., None], 3, axis=-1)
    elif mode == "RGBA":
        expected = COLOUR
    assert np.array_equal(first_image(root, tmp_path), expected)


def test_sixteen_bit_greys_are_scaled_not_clipped(tmp_path):
    deep = GREY.astype(np.uint16) * 257  # 8-bit values spread over the 16-bit range
    root, _ = tree_with(tmp_path, Image.fromarray(deep))
    assert np.array_equal(first_image(root, tmp_path), np.repeat(GREY[..., None], 3, axis=-1))


def test_float_images_are_refused_rather_than_guessed(tmp_path):
    root, target = tree_with(tmp_path, Image.fromarray(GREY.astype(np.float32) / 255), name="00.tiff")
    with pytest.raises(ImageDecodeError, match="no agreed pixel range") as info:
        first_image(root, tmp_path)
    assert info.value.path == str(target)


def test_an_unreadable_file_is_named_with_the_fix(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "tree", classes=2, per_class=2, size=SIZE)
    locked = root / "train" / "class_1" / "1.png"
    opened = Image.open

    def open_image(path, *args, **kwargs):
        if str(path) == str(locked):  # what a file without read permission does (tests may run as root)
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(folder.Image, "open", open_image)
    with pytest.raises(ImageDecodeError, match="chmod a\\+r") as info:
        load_dataset(str(root), "train", cache_dir=tmp_path / "cache")
    assert info.value.path == str(locked)


def test_a_broken_link_is_reported_not_skipped(tmp_path):
    root = make_image_folder(tmp_path / "tree", classes=2, per_class=2, size=SIZE)
    link = root / "train" / "class_0" / "2.png"
    link.symlink_to(tmp_path / "elsewhere" / "gone.png")
    with pytest.raises(ImageDecodeError, match="(?s)does not exist.*The file is missing") as info:
        load_dataset(str(root), "train", cache_dir=tmp_path / "cache")
    assert info.value.path == str(link)


def test_odd_paths_and_class_names_load_in_sorted_order(tmp_path):
    root = make_image_folder(tmp_path / "my data" / "ünï côde" / "-tree", classes=3, per_class=2, size=SIZE)
    for split in ("train", "test"):
        for old, new in (("class_0", "ça va"), ("class_1", "-dash"), ("class_2", "100%")):
            (root / split / old).rename(root / split / new)
    (root / "train" / "ça va" / "notes.txt").write_text("not an image: ignored, like any non-image file")
    (root / "train" / "ça va" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "ça va" / "UPPER.PNG").write_bytes((root / "train" / "ça va" / "0.png").read_bytes())
    data = load_dataset(str(root), "train", cache_dir=tmp_path / "cache")
    assert data.classes == ["-dash", "100%", "ça va"]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]  # UPPER.PNG counts: extensions are case-blind
