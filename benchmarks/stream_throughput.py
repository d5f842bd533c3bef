"""Images per second of dyntok's streaming training loader against timm's own, on the same image folder.

Both decode JPEGs in ``--workers`` processes and apply DeiT's training augmentation at 224 px
(RandomResizedCrop, flip, RandAugment m9, random erasing 0.25, bicubic) and mixup/cutmix on the batch:

* dyntok: ``build_loaders(DataConfig(data_path="stream", ...))["train"]`` (per-image seeded augmentation,
  exact resume);
* timm: ``create_dataset`` (``ImageDataset``) + ``create_loader(is_training=True, ...)`` + ``Mixup``, as
  timm's ``train.py`` builds it (without the CUDA prefetcher: this is a CPU measurement), with the same fix
  to its RandAugment (``keep_a_bit_when_posterizing``: without it timm's posterize fails on current Pillow).

The two loaders run alternately, ``--repeats`` times each (docs/measurement.md), and the median images/s of
each is printed with their ratio. Point ``--folder`` at an image-folder tree with a ``train/`` split, or let
``--make N`` write N synthetic ImageNet-sized JPEGs (500x375) first.

    nice python benchmarks/stream_throughput.py --make 2000 --folder /tmp/stream_bench --workers 2 \\
        --batch-size 64 --batches 20 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dyntok.data import DataConfig, build_loaders
from dyntok.data.stream import keep_a_bit_when_posterizing

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_folder(root: Path, images: int, classes: int = 10, size=(500, 375)) -> None:
    """``images`` smooth random JPEGs (quality 90) in ``root/{train,val}/class_k/``: ImageNet's typical size."""
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", classes)):
        for index in range(count):
            folder = root / split / f"class_{index % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)  # JPEG-friendly content
            image.save(folder / f"{index}.JPEG", quality=90)


def dyntok_loader(folder: Path, args):
    data = DataConfig(dataset=str(folder), data_path="stream", image_size=224, batch_size=args.batch_size,
                      holdout_size=0, num_workers=args.workers, randaugment=(2, 9), random_erasing=0.25,
                      mixup_alpha=0.8, cutmix_alpha=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return build_loaders(data, label_smoothing=0.1)["train"]


def timm_loader(folder: Path, args):
    from timm.data import Mixup, create_dataset, create_loader

    dataset = create_dataset("", root=str(folder / "train"), is_training=True)
    loader = create_loader(dataset, input_size=(3, 224, 224), batch_size=args.batch_size, is_training=True,
                           use_prefetcher=False, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel",
                           interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=args.workers)
    keep_a_bit_when_posterizing(dataset.transform)  # else timm's RandAugment fails on current Pillow
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=len(dataset.reader.class_to_idx))
    return loader, mixup


def images_per_second(batches, count: int) -> float:
    """Time ``count`` batches after the first (which pays for starting the workers)."""
    iterator = iter(batches)
    next(iterator)
    start, seen = time.perf_counter(), 0
    for _ in range(count):
        images, _ = next(iterator)
        seen += len(images)
    return seen / (time.perf_counter() - start)


def timm_batches(loader, mixup):
    for images, labels in loader:
        yield mixup(images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="image-folder tree with a train/ split")
    parser.add_argument("--make", type=int, default=0, help="first write this many synthetic JPEGs into --folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.make:
        make_folder(args.folder, args.make)
    ours, theirs = [], []
    for repeat in range(args.repeats):
        loader = dyntok_loader(args.folder, args)
        loader.set_epoch(repeat)
        ours.append(images_per_second(loader, args.batches))
        theirs.append(images_per_second(timm_batches(*timm_loader(args.folder, args)), args.batches))
        print(f"repeat {repeat + 1}: dyntok {ours[-1]:.1f} img/s, timm {theirs[-1]:.1f} img/s", flush=True)
    mine, timm = statistics.median(ours), statistics.median(theirs)
    print(f"median over {args.repeats}: dyntok streaming {mine:.1f} img/s, timm create_loader {timm:.1f} img/s "
          f"(dyntok / timm = {mine / timm:.2f}); {args.workers} workers, batch {args.batch_size}, 224 px")


if __name__ == "__main__":
    main()
