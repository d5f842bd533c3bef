"""``dyntok pretrain``: re-run the recipe of shipped weights (a reference or a method) and write them with a model card."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..pretrained import WEIGHTS_DIR
from ..training import train
from ..training.recipes import RECIPES, export_reference


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="train dyntok's shipped models (references and methods) with their recipe and export them",
        description="Train each model with the recipe its shipped weights were made with (resuming an "
                    "interrupted run from OUTPUT_DIR/<name>/last.safetensors), then write <name>.safetensors "
                    "with its model card to --export. A method's recipe starts from the shipped dense reference "
                    "of its backbone, so train references first (the default order does).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(RECIPES), metavar="NAME",
                        help=f"models to train (default: all of {', '.join(RECIPES)}, in that order)")
    parser.add_argument("--output-dir", default="runs/pretrain", help="training runs go to OUTPUT_DIR/<name>")
    parser.add_argument("--export", default=str(WEIGHTS_DIR),
                        help="where the finished weights are written (default: the package's own weights folder)")
    parser.add_argument("--data-root", default=None, help="where to look first for CIFAR-10 (see `dyntok train`)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    unknown = [name for name in args.names if name not in RECIPES]
    if unknown:
        raise ValueError(f"no recipe for {', '.join(unknown)}; models with a recipe: {', '.join(RECIPES)}")
    for name in args.names:
        run_dir = Path(args.output_dir) / name
        config = RECIPES[name].train_config(name, run_dir, args.data_root, args.device, not args.no_progress)
        train(config)
        path = export_reference(run_dir, name, Path(args.export) / f"{name}.safetensors")
        print(f"{name}: wrote {path}")
    return 0
