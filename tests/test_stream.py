"""The streaming data path: the same images as in memory, exact resume, rank-independent augmentation."""
from __future__ import annotations

import pytest
import torch

from dyntok.data import DataConfig, ImageDecodeError, build_loaders
from dyntok.data.config import resolve_data_path

from .conftest import make_image_folder

NORMALIZATION = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def folder_224(tmp_path_factory):
    """3 classes x 6 images per split at 224 px, as an ImageNet-style tree (train/ and val/)."""
    return make_image_folder(tmp_path_factory.mktemp("imagenet") / "tiny", classes=3, per_class=6, size=224,
                             splits=("train", "val"))


def config(folder, path, **overrides) -> DataConfig:
    values = dict(dataset=str(folder), image_size=224, batch_size=4, holdout_size=4, data_path=path,
                  num_workers=0, cache_dir=str(folder.parent / "cache"), **NORMALIZATION)
    return DataConfig(**{**values, **overrides})


def everything(loader):
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("split", ["holdout", "test"])
def test_streaming_gives_the_in_memory_images_and_labels_for_evaluation(folder_224, split):
    memory = build_loaders(config(folder_224, "memory"))[split]
    stream = build_loaders(config(folder_224, "stream", num_workers=2))[split]
    (memory_x, memory_y), (stream_x, stream_y) = everything(memory), everything(stream)
    assert torch.equal(memory_y, stream_y)
    torch.testing.assert_close(stream_x, memory_x, rtol=0, atol=1e-5)  # 1/255 / 0.25 per grey level


def test_streaming_holds_out_the_same_training_images(folder_224):
    from dyntok.data.folder import scan_tree

    memory = build_loaders(config(folder_224, "memory"))
    stream = build_loaders(config(folder_224, "stream"))
    files = scan_tree(folder_224)["train"].files
    assert stream["holdout"].dataset.files == [files[i] for i in memory["holdout"].dataset.indices]
    assert not set(stream["holdout"].dataset.files) & set(stream["train"].dataset.files)
    assert torch.equal(memory["train"].shard_indices(3), stream["train"].shard_indices(3))  # same order too


def augmented(folder, rank=0, world_size=1, **overrides):
    data = config(folder, "stream", randaugment=(2, 9), random_erasing=0.5, **overrides)
    return build_loaders(data, rank=rank, world_size=world_size)["train"]


def test_resume_mid_epoch_is_exact_with_any_number_of_workers(folder_224):
    loader = augmented(folder_224)
    loader.set_epoch(2)
    whole = list(loader)
    with_workers = augmented(folder_224, num_workers=2)
    with_workers.set_epoch(2)
    resumed = list(with_workers.iterate(start_batch=1))
    assert len(resumed) == len(whole) - 1
    for (x, y), (rx, ry) in zip(whole[1:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_each_rank_sees_its_share_of_the_single_process_batch_with_the_same_augmentation(folder_224):
    single = augmented(folder_224)
    ranks = [augmented(folder_224, rank=r, world_size=2, batch_size=2) for r in range(2)]
    for loader in (single, *ranks):
        loader.set_epoch(1)
    x, y = next(iter(single))
    parts = [next(iter(rank)) for rank in ranks]
    for r, (rx, ry) in enumerate(parts):  # rank r's i-th image is the single process's image 2i + r
        assert torch.equal(rx, x[r::2]) and torch.equal(ry, y[r::2])


def test_epochs_differ_and_augmentation_is_random(folder_224):
    loader = augmented(folder_224)
    loader.set_epoch(0)
    first = next(iter(loader))[0]
    loader.set_epoch(1)
    assert not torch.equal(first, next(iter(loader))[0])


def test_mixup_gives_soft_targets(folder_224):
    loader = build_loaders(config(folder_224, "stream", mixup_alpha=0.8, cutmix_alpha=1.0),
                           label_smoothing=0.1)["train"]
    images, targets = next(iter(loader))
    assert loader.soft_targets and targets.shape == (4, 3)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_a_corrupt_image_names_the_file_even_from_a_worker(tmp_path):
    folder = make_image_folder(tmp_path / "bad", classes=2, per_class=4, size=32)
    broken = folder / "test" / "class_1" / "2.png"
    broken.write_bytes(b"not a png")
    test = build_loaders(config(folder, "stream", image_size=32, holdout_size=0, num_workers=2))["test"]
    with pytest.raises(ImageDecodeError, match="2.png") as error:
        everything(test)
    assert error.value.path == str(broken)


def test_auto_streams_what_does_not_fit_the_memory_budget(folder_224):
    # 36 images of 224 x 224 x 3 bytes: 5.4 MB decoded.
    assert resolve_data_path(config(folder_224, "auto", memory_budget_gb=0.001)) == "stream"
    assert resolve_data_path(config(folder_224, "auto", memory_budget_gb=1.0)) == "memory"
    assert resolve_data_path(config(folder_224, "memory", memory_budget_gb=0.001)) == "memory"


def test_torchvision_cifar_is_never_streamed(tmp_path):
    root = tmp_path / "root"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(ValueError, match="streaming reads image-folder trees"):
        resolve_data_path(DataConfig(dataset="cifar10", data_root=str(root), data_path="stream"))
    assert resolve_data_path(DataConfig(dataset="cifar10", data_root=str(root))) == "memory"


def test_unknown_data_path_is_refused():
    with pytest.raises(ValueError, match="data_path"):
        DataConfig(data_path="disk")


def test_randaugment_at_its_strongest_posterize_does_not_stop_training():
    # timm maps magnitude 10 to 0 bits, which current Pillow refuses; ours keeps 1 bit.
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from dyntok.data.stream import stream_train_transform

    transform = stream_train_transform(DataConfig(randaugment=(2, 9), image_size=32), 32)
    randaugment = next(step for step in transform.transforms if isinstance(step, RandAugment))
    posterize = next(op for op in randaugment.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    pixels = posterize(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert pixels.getpixel((0, 0)) == (128, 0, 0)  # the top bit of each channel
