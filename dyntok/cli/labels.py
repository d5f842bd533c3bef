"""``dyntok labels``: each image's cheapest correct exit (ReViT's token-length labels), stored with provenance.

For a model with several exits (ReViT's token lengths, DVT's stages), the label of an image is the first
exit of :meth:`predict_all_exits` that classifies it correctly, the last where none does. The file says
where the labels came from: the checkpoint (path and SHA-256), the model, the dataset and the exact split.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..data import BatchLoader, DataConfig, EvalTransform, holdout_split, load_dataset
from ..fileio import file_sha256, save_tensors
from ..measure.oracle import collect_exit_correctness, first_correct_exit
from ..methods import load_model
from ..training.distributed import select_device
from ._common import add_data_arguments, data_config

__all__ = ["add_parser", "run", "write_exit_labels"]


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="store each training image's cheapest correct exit (ReViT's token-length labels)",
        description="Run every exit of a saved model over a split of the training set (evaluation transforms, "
                    "dataset order) and store, per image, the first exit that is right (the last if none), "
                    "with the checkpoint's hash and the split definition.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="model.safetensors written by dyntok train")
    parser.add_argument("--output", required=True, help="where to write the labels (.safetensors)")
    parser.add_argument("--split", choices=("train", "holdout"), default="train",
                        help="the training images left for training, or the held-out ones")
    add_data_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def run(args: argparse.Namespace) -> int:
    path = write_exit_labels(args.checkpoint, data_config(args), args.split, args.output, select_device(args.device))
    print(f"wrote {path}")
    return 0


def write_exit_labels(checkpoint: str | Path, data: DataConfig, split: str, output: str | Path,
                      device: torch.device) -> Path:
    """Compute and save the labels of ``split`` ("train" or "holdout" of ``data``'s training set).

    The file holds ``labels`` (N,) long, ``correct`` (N, K) uint8 (which exits are right) and ``index`` (N,)
    long (each image's position in the full training set); its metadata holds the provenance.
    """
    model = load_model(checkpoint, map_location=device).eval()
    exit_macs = model.exit_macs()
    if exit_macs is None or len(exit_macs) < 2:
        raise ValueError(f"{checkpoint} holds a {model.method_name!r} model, which has no exits to route between")
    images = _training_split(data, split)
    loader = BatchLoader(images, data.eval_batch_size or data.batch_size, EvalTransform(*data.normalization(),
                                                                                        data.image_size))
    correct = collect_exit_correctness(model, loader, device)
    tensors = {"labels": first_correct_exit(correct), "correct": correct.to(torch.uint8), "index": images.indices}
    meta: dict[str, Any] = {
        "kind": "exit_labels",
        "definition": "first exit of predict_all_exits that is right, the last if none (ReViT: shortest length)",
        "checkpoint": {"path": str(checkpoint), "sha256": file_sha256(checkpoint)},
        "model": model.config, "exit_macs": exit_macs,
        "split": {"name": split, "dataset": data.dataset, "source": images.source, "holdout_size": data.holdout_size,
                  "seed": data.seed, "transform": "eval", "images": len(images)},
    }
    return save_tensors(output, tensors, json.loads(json.dumps(meta)))


def _training_split(data: DataConfig, split: str):
    """The part of the training set named by ``split``, exactly as ``build_loaders`` carves it."""
    train_set = load_dataset(data.dataset, "train", data_root=data.data_root, download=data.download,
                             image_size=data.image_size, cache_dir=data.cache_dir)
    train_part, held_part = holdout_split(train_set, data.holdout_size, data.seed)
    chosen = train_part if split == "train" else held_part
    if len(chosen) == 0:
        raise ValueError(f"the {split!r} split is empty (holdout_size={data.holdout_size})")
    return chosen

