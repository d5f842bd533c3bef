"""Shared fixtures: tiny models and made-up data, so unit tests run in seconds on 2 CPU cores."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dyntok

#: Backbone overrides that make any registered method tiny: a 4x4 token grid, 4 blocks, width 32.
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR10 = REPO_ROOT.parent / "shared" / "data" / "cifar10"


def tiny_model(method: str = "dense", **kwargs):
    name = "vit_cifar_tiny" if method == "dense" else f"{method}_vit_cifar_tiny"
    torch.manual_seed(0)
    return dyntok.create_model(name, **{**TINY, **kwargs})


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 3, TINY["img_size"], TINY["img_size"])


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 3, 4, 0])


def requires_shared_cifar10():
    return pytest.mark.skipif(not (SHARED_CIFAR10 / "train").is_dir(),
                              reason=f"shared CIFAR-10 copy not found at {SHARED_CIFAR10}")


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 16,
                      splits=("train", "test")) -> Path:
    """A tiny image-folder dataset of random PNGs: ``root/{train,test}/class_k/i.png``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., k % 3] = 255 * (i % 2)  # a learnable colour cue per class
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "tiny")
