"""``dyntok pretrain``: re-run the recipe of a shipped reference and write its weights with a model card."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..pretrained import WEIGHTS_DIR
from ..training import train
from ..training.recipes import RECIPES, export_reference


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="train dyntok's reference ViTs with their recipe and export them",
        description="Train each preset with the recipe its shipped weights were made with (resuming an "
                    "interrupted run from OUTPUT_DIR/<preset>/last.safetensors), then write "
                    "<preset>.safetensors with its model card to --export.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("presets", nargs="*", default=list(RECIPES), metavar="PRESET",
                        help=f"presets to train (default: all of {', '.join(RECIPES)})")
    parser.add_argument("--output-dir", default="runs/pretrain", help="training runs go to OUTPUT_DIR/<preset>")
    parser.add_argument("--export", default=str(WEIGHTS_DIR),
                        help="where the finished weights are written (default: the package's own weights folder)")
    parser.add_argument("--data-root", default=None, help="where to look first for CIFAR-10 (see `dyntok train`)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    unknown = [preset for preset in args.presets if preset not in RECIPES]
    if unknown:
        raise ValueError(f"no recipe for {', '.join(unknown)}; presets with a recipe: {', '.join(RECIPES)}")
    for preset in args.presets:
        run_dir = Path(args.output_dir) / preset
        config = RECIPES[preset].train_config(preset, run_dir, args.data_root, args.device, not args.no_progress)
        train(config)
        path = export_reference(run_dir, preset, Path(args.export) / f"{preset}.safetensors")
        print(f"{preset}: wrote {path}")
    return 0
