"""Tests of dyntok.data on tiny image-folder trees and fake CIFAR pickles made per test."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dyntok.data import (
    BatchLoader,
    DataConfig,
    DatasetLayoutError,
    DatasetNotFoundError,
    EvalTransform,
    ImageDecodeError,
    ImageSizeError,
    ImageTensorDataset,
    TrainTransform,
    build_loaders,
    find_dataset,
    holdout_split,
    load_dataset,
    random_crop_flip,
)
from dyntok.data import folder
from dyntok.data.seeding import seeded_generator

CLASSES = ("cat", "dog", "frog")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run every test in an empty cwd, with a private cache and no $DYNTOK_DATA."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("DYNTOK_DATA", raising=False)
    monkeypatch.setenv("DYNTOK_CACHE", str(tmp_path / "cache"))
    return work


def make_tree(root: Path, classes=CLASSES, per_class=4, size=8, splits=("train", "test"), ext="png") -> Path:
    """``root/{splits}/<class>/NNNN.<ext>``; pixel value encodes (class, index) for checks."""
    for split in splits:
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = np.full((size, size, 3), 10 * label + index, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index:04d}.{ext}")
    return root


def tiny_dataset(n=12, num_classes=3, size=8) -> ImageTensorDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    labels = torch.arange(n) % num_classes
    return ImageTensorDataset(images, labels, [f"c{i}" for i in range(num_classes)])


# ----------------------------------------------------------------------------- roots


def test_root_lookup_order(tmp_path, isolated, monkeypatch):
    arg, env, local, shared = tmp_path / "arg", tmp_path / "env", isolated / "data", tmp_path / "shared" / "data"
    for root in (arg, env, local, shared):
        make_tree(root / "tiny", per_class=1)
    monkeypatch.setenv("DYNTOK_DATA", str(env))

    assert find_dataset("tiny", data_root=arg).path == arg / "tiny"
    assert find_dataset("tiny").path == env / "tiny"
    monkeypatch.delenv("DYNTOK_DATA")
    assert find_dataset("tiny").path == local / "tiny"
    os.rename(local, isolated / "moved")
    assert find_dataset("tiny").path == shared / "tiny"


def test_not_found_lists_every_place_and_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNTOK_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as info:
        find_dataset("cifar10", data_root=tmp_path / "arg")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for place in ("arg/cifar-10-batches-py", "arg/cifar10", "env/cifar10", "work/data/cifar10", "shared/data/cifar10"):
        assert place in message
    for fix in ("--data-root", "DYNTOK_DATA", "--download"):
        assert fix in message


def test_torchvision_files_are_found_before_a_tree_in_the_same_root(tmp_path):
    make_tree(tmp_path / "cifar10", per_class=1)
    (tmp_path / "cifar-10-batches-py").mkdir()
    location = find_dataset("CIFAR-10", data_root=tmp_path)
    assert (location.kind, location.path, location.name) == ("torchvision", tmp_path, "cifar10")


def test_dataset_name_can_be_a_path(tmp_path):
    make_tree(tmp_path / "mine", per_class=2)
    data = load_dataset(str(tmp_path / "mine"), "test")
    assert data.images.shape == (6, 3, 8, 8) and data.classes == list(CLASSES)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- image folders


def test_image_folder_loads_pixels_and_labels_in_sorted_class_order(tmp_path):
    make_tree(tmp_path / "tiny", classes=("zebra", "ant", "moth"), per_class=2)
    data = load_dataset("tiny", "train", data_root=tmp_path)
    assert data.classes == ["ant", "moth", "zebra"]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.images.dtype == torch.uint8 and data.images.shape == (6, 3, 8, 8)
    # make_tree fills each image with 10 * (its index in the given class list) + file index
    assert data.images[:, 0, 0, 0].tolist() == [10, 11, 20, 21, 0, 1]
    assert data.source == "image folder tiny/train"  # reports name the data, never a path of this machine


def test_val_split_is_used_when_there_is_no_test_split(tmp_path):
    make_tree(tmp_path / "tiny", per_class=2, splits=("train", "val"))
    assert len(load_dataset("tiny", "test", data_root=tmp_path)) == 6


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_error_names_the_file_and_caches_nothing(tmp_path, damage):
    tree = make_tree(tmp_path / "tiny", ext="jpg", size=32)
    bad = tree / "train" / "dog" / "0002.jpg"
    bad.write_bytes(b"not a jpeg" if damage == "garbage" else bad.read_bytes()[:200])
    with pytest.raises(ImageDecodeError) as info:
        load_dataset("tiny", "train", data_root=tmp_path)
    assert str(bad) in str(info.value) and "Replace it" in str(info.value)
    assert info.value.path == str(bad)
    assert not list((tmp_path / "cache").glob("*"))
    assert bad.exists()  # the user's file is left alone


def _no_class_folders(tree):
    for path in (tree / "train").glob("*/*"):
        path.rename(tree / "train" / f"{path.parent.name}-{path.name}")
    for path in (tree / "train").glob("*/"):
        path.rmdir()


@pytest.mark.parametrize(
    "break_it, problem",
    [
        (_no_class_folders, "has no class folders"),
        (lambda tree: (tree / "train").rename(tree / "training"), "has no train/ folder"),
        (lambda tree: (tree / "test").rename(tree / "testing"), "has no test/ or val/ folder"),
        (lambda tree: [p.unlink() for p in (tree / "test" / "dog").iterdir()], "holds no images"),
        (lambda tree: (tree / "test" / "dog").rename(tree / "test" / "hound"), "class folders of"),
    ],
    ids=["no-class-folders", "no-train", "no-test", "empty-class", "class-mismatch"],
)
def test_wrong_layout_explains_the_expected_layout(tmp_path, break_it, problem):
    tree = make_tree(tmp_path / "tiny", per_class=2)
    break_it(tree)
    with pytest.raises(DatasetLayoutError) as info:
        load_dataset(str(tree), "train")
    assert problem in str(info.value)
    assert "<root>/train/<class>/*.jpg" in str(info.value)


def test_images_of_different_sizes_need_image_size(tmp_path):
    tree = make_tree(tmp_path / "tiny", per_class=2)
    odd = tree / "train" / "frog" / "0001.png"
    Image.new("RGB", (10, 6)).save(odd)
    with pytest.raises(ImageSizeError, match="image_size"):
        load_dataset(str(tree), "train")
    assert load_dataset(str(tree), "train", image_size=5).images.shape == (6, 3, 5, 5)


def test_decode_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    decoded, real_decode = [], folder.decode_images

    def counting_decode(paths, *args, **kwargs):
        decoded.append(len(paths))
        return real_decode(paths, *args, **kwargs)

    monkeypatch.setattr(folder, "decode_images", counting_decode)
    tree = make_tree(tmp_path / "tiny")
    first = load_dataset(str(tree), "train")
    assert decoded == [12] and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    assert torch.equal(load_dataset(str(tree), "train").images, first.images)
    assert decoded == [12]  # second load came from the cache

    changed = tree / "train" / "cat" / "0000.png"
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(10**18, 10**18))  # a distinct mtime even on coarse-clock filesystems
    assert load_dataset(str(tree), "train").images[0, 0, 0, 0] == 200
    assert decoded == [12, 12]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # the stale entry was pruned


def test_unreadable_cache_file_is_decoded_again(tmp_path):
    tree = make_tree(tmp_path / "tiny")
    first = load_dataset(str(tree), "train")
    [entry] = (tmp_path / "cache").glob("*.safetensors")
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        assert torch.equal(load_dataset(str(tree), "train").images, first.images)


# ----------------------------------------------------------------------------- torchvision CIFAR


def _write_fake_cifar(root: Path, name: str, per_batch: int = 6) -> None:
    """Files in torchvision's format (its reader unpickles them; our code never does)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder_name, label_key, batches = "cifar-10-batches-py", "labels", [f"data_batch_{i}" for i in range(1, 6)]
        meta_file, meta = "batches.meta", {"label_names": [f"class{i}" for i in range(10)]}
        batches.append("test_batch")
    else:
        folder_name, label_key, batches = "cifar-100-python", "fine_labels", ["train", "test"]
        meta_file, meta = "meta", {"fine_label_names": [f"class{i}" for i in range(100)]}
    base = root / folder_name
    base.mkdir(parents=True)
    for batch in batches:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = list(range(per_batch))
        with open(base / batch, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
    with open(base / meta_file, "wb") as f:
        pickle.dump(meta, f)


@pytest.mark.parametrize("name, train_size, num_classes", [("cifar10", 30, 10), ("cifar100", 6, 100)])
def test_torchvision_cifar_files(tmp_path, monkeypatch, name, train_size, num_classes):
    import torchvision.datasets.cifar

    _write_fake_cifar(tmp_path, name)
    # The fake files cannot match the published MD5s that torchvision checks.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train = load_dataset(name, "train", data_root=tmp_path, download=False)
    test = load_dataset(name, "test", data_root=tmp_path)
    assert train.images.shape == (train_size, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 3, 32, 32) and test.labels.tolist() == list(range(6))
    assert train.num_classes == num_classes and train.classes[1] == "class1"
    # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values
    with open(next((tmp_path).glob("cifar-*")) / ("test_batch" if name == "cifar10" else "test"), "rb") as f:
        rows = pickle.load(f)["data"]
    assert torch.equal(test.images[2, 1].flatten(), torch.from_numpy(rows[2, 1024:2048]))


def test_failed_download_explains_itself(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(self):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="network unreachable") as info:
        load_dataset("cifar10", data_root=tmp_path / "dl", download=True)
    assert str(tmp_path / "dl" / "cifar-10-batches-py") in str(info.value)


# ----------------------------------------------------------------------------- holdout


@pytest.mark.parametrize("size, expected", [(4, 4), (0.25, 3), (0, 0)])
def test_holdout_split_is_seeded_disjoint_complete_and_stratified(size, expected):
    data = tiny_dataset(n=12)
    train, held = holdout_split(data, size, seed=3)
    train_again, held_again = holdout_split(data, size, seed=3)
    assert torch.equal(held.indices, held_again.indices) and torch.equal(train.indices, train_again.indices)
    assert len(held) == expected
    assert sorted(train.indices.tolist() + held.indices.tolist()) == list(range(12))
    assert torch.equal(held.labels, data.labels[held.indices])
    assert torch.equal(held.images, data.images[held.indices])
    if expected == 3:  # one per class
        assert sorted(held.labels.tolist()) == [0, 1, 2]


def test_holdout_split_depends_on_the_seed_and_rejects_bad_sizes():
    data = tiny_dataset(n=300)
    picks = {tuple(holdout_split(data, 30, seed=s)[1].indices.tolist()) for s in range(3)}
    assert len(picks) == 3
    for bad in (1.0, -0.1, 300, -1):
        with pytest.raises(ValueError):
            holdout_split(data, bad)
    with pytest.raises(TypeError):
        holdout_split(data, True)


# ----------------------------------------------------------------------------- loader


def _ids(loader: BatchLoader) -> list[int]:
    """Which images a loader yields, read back from the pixel value tiny_dataset put there."""
    return [int(v) for images, _ in loader for v in images[:, 0, 0, 0]]


@pytest.mark.parametrize("n, drop_last, shard_len", [(12, False, 4), (10, False, 4), (10, True, 3)])
def test_loader_shards_are_disjoint_equal_and_repeatable(n, drop_last, shard_len):
    data = tiny_dataset(n)
    identity = EvalTransform(mean=(0, 0, 0), std=(1 / 255,) * 3)  # float pixel values unchanged

    def shard(rank):
        loader = BatchLoader(data, 3, identity, shuffle=True, drop_last=drop_last, seed=5, rank=rank, world_size=3)
        loader.set_epoch(1)
        return _ids(loader)

    shards = [shard(rank) for rank in range(3)]
    assert shards == [shard(rank) for rank in range(3)]
    assert all(len(ids) == shard_len for ids in shards)
    seen = [i for ids in shards for i in ids]
    if drop_last:
        assert len(set(seen)) == len(seen) == 9
    else:
        assert set(seen) == set(range(n)) and len(seen) - len(set(seen)) == 3 * shard_len - n  # wrap-around


def test_loader_shuffles_per_epoch_and_counts_batches():
    data = tiny_dataset(10)
    identity = EvalTransform(mean=(0, 0, 0), std=(1 / 255,) * 3)
    loader = BatchLoader(data, 4, identity, shuffle=True, seed=1)
    epochs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        epochs.append(_ids(loader))
    assert epochs[0] == epochs[2] != epochs[1] and sorted(epochs[1]) == list(range(10))
    assert len(loader) == 3 and len(BatchLoader(data, 4, identity, drop_last=True)) == 2
    assert _ids(BatchLoader(data, 4, identity)) == list(range(10))  # no shuffle: dataset order
    uneven = [BatchLoader(data, 4, identity, rank=r, world_size=3, even_shards=False) for r in range(3)]
    assert sorted(i for loader in uneven for i in _ids(loader)) == list(range(10))


def test_resume_mid_epoch_gives_the_same_batches():
    data = tiny_dataset(24)
    transform = TrainTransform(MEAN, STD, image_size=12, crop_padding=2, randaugment=(2, 9))
    loader = BatchLoader(data, 4, transform, shuffle=True, drop_last=True, seed=7, rank=1, world_size=2)
    loader.set_epoch(3)
    full = list(loader)
    resumed = BatchLoader(data, 4, transform, shuffle=True, drop_last=True, seed=7, rank=1, world_size=2)
    resumed.set_epoch(3)
    tail = list(resumed.iterate(start_batch=2))
    assert len(full) == 3 and len(tail) == 1
    assert torch.equal(tail[0][0], full[2][0]) and torch.equal(tail[0][1], full[2][1])


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("mode, torch_mode", [("reflect", "reflect"), ("zero", "constant"), ("edge", "replicate")])
def test_random_crop_flip_matches_pad_then_crop(mode, torch_mode):
    images = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(images, 2, seeded_generator(1), mode)
    generator = seeded_generator(1)  # replay the same draws by hand
    shifts = torch.randint(-2, 3, (2, 8, 1), generator=generator) + 2
    flips = torch.rand(8, 1, generator=generator) < 0.5
    padded = F.pad(images.float(), (2, 2, 2, 2), mode=torch_mode).to(torch.uint8)
    for i in range(8):
        expected = padded[i, :, shifts[0, i, 0] : shifts[0, i, 0] + 6, shifts[1, i, 0] : shifts[1, i, 0] + 6]
        assert torch.equal(out[i], expected.flip(-1) if flips[i, 0] else expected)


def test_train_transform_shapes_dtypes_and_reproducibility():
    images, labels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 1])
    transform = TrainTransform(MEAN, STD, image_size=16, randaugment=(2, 9))
    x, y = transform(images, labels, key=(0, 0, 0, 0))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, transform(images, labels, key=(0, 0, 0, 0))[0])
    assert not torch.equal(x, transform(images, labels, key=(0, 0, 1, 0))[0])


def test_randaugment_runs_on_one_thread_and_gives_the_threads_back():
    """Per-image ops on tiny images must not wake the whole thread pool (over a second a batch on a 16-core
    host running four trainings); the result is the same and the thread count is restored."""
    images, labels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 1])
    transform = TrainTransform(MEAN, STD, randaugment=(2, 9))
    expected = transform(images, labels, key=(0, 0, 0, 0))[0]
    seen, augment = [], transform.randaugment
    transform.randaugment = lambda image: (seen.append(torch.get_num_threads()), augment(image))[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = transform(images, labels, key=(0, 0, 0, 0))[0]
        assert seen == [1] * 4 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, expected)


def test_eval_transform_only_normalizes():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    x, y = EvalTransform(MEAN, STD)(images, torch.tensor([0, 1]))
    assert torch.allclose(x, torch.full_like(x, 2.0)) and y.tolist() == [0, 1]


def test_mixup_gives_soft_targets():
    from timm.data import Mixup

    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=3)
    transform = TrainTransform(MEAN, STD, mixup=mixup)
    images, labels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 1])
    x, y = transform(images, labels, key=(0, 0, 0, 0))
    assert y.shape == (4, 3) and y.dtype == torch.float32 and torch.allclose(y.sum(1), torch.ones(4))
    assert torch.equal(y, transform(images, labels, key=(0, 0, 0, 0))[1])
    with pytest.raises(ValueError, match="even batch_size"):
        BatchLoader(tiny_dataset(), 3, transform, drop_last=True)


# ----------------------------------------------------------------------------- config


def test_build_loaders_end_to_end(tmp_path):
    make_tree(tmp_path / "tiny", per_class=4)
    config = DataConfig.from_dict(json.loads(json.dumps(DataConfig(
        dataset="tiny", data_root=str(tmp_path), holdout_size=3, batch_size=2, image_size=12,
        mixup_alpha=0.2, mean=MEAN, std=STD,
    ).to_dict())))
    loaders = build_loaders(config, rank=0, world_size=2, label_smoothing=0.1)
    assert loaders["num_classes"] == 3 and loaders["class_names"] == list(CLASSES)
    assert len(loaders["holdout"].dataset) == 3 and len(loaders["train"].dataset) == 9
    assert loaders["train"].soft_targets and config.mixup and config.mean == MEAN
    images, targets = next(iter(loaders["train"]))
    assert images.shape == (2, 3, 12, 12) and targets.shape == (2, 3)
    test_labels = torch.cat([labels for _, labels in loaders["test"]])
    assert len(test_labels) == 12  # evaluation is not sharded by default: rank 0 sees it all
    with pytest.raises(ValueError, match="unknown data options"):
        DataConfig.from_dict({"batchsize": 3})


# ----------------------------------------------------------------------------- shared CIFAR-10


def _shared_cifar10() -> Path | None:
    repo = Path(__file__).resolve().parents[1]
    for candidate in (Path("/work/shared/data/cifar10"), repo.parent / "shared" / "data" / "cifar10"):
        if (candidate / "test").is_dir():
            return candidate
    return None


@pytest.mark.integration
def test_shared_cifar10_test_split(tmp_path):
    tree = _shared_cifar10()
    if tree is None:
        pytest.skip("the shared CIFAR-10 copy (../shared/data/cifar10 beside the repo) is absent")
    data = load_dataset(str(tree), "test", cache_dir=tmp_path)
    assert data.images.shape == (10000, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.num_classes == 10 and data.classes[0] == "airplane" and data.classes[-1] == "truck"
    assert data.labels.bincount().tolist() == [1000] * 10
