"""``dyntok show``: pictures of what a saved model did with each image (kept patches, exits, GMACs)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import RECORDED_HOLDOUT_HELP, add_data_arguments, parse_knobs


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="draw what a model did with each image: kept patches, exits, GMACs",
        description="Run a saved model over a split or an image folder and write PNG figures into --out: every "
                    "image beside the patches it kept at each stage (dropped ones grey, merged ones coloured), "
                    "images grouped by the exit they left at or the token length they ran with, and per-image "
                    "and per-class GMACs. Which figures are drawn follows from what the model's predictions "
                    "report (docs/pictures.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="model.safetensors or last.safetensors written by dyntok train")
    parser.add_argument("--images", default="test", metavar="PATH_OR_SPLIT",
                        help="test or holdout (a split of --dataset), a dataset tree (its test split), or a folder "
                             "laid out as FOLDER/<class>/<image>")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder the PNGs are written to")
    parser.add_argument("--n", type=int, default=32, help="images drawn in the per-image figures")
    parser.add_argument("--limit", type=int, default=None,
                        help="predict only this many images, spread over the split (default: all)")
    parser.add_argument("--budget", action="append", default=[], metavar="KNOB=VALUE",
                        help="set a budget knob first, e.g. keep_ratio=0.7 (repeatable)")
    parser.add_argument("--calibrate-gmacs", type=float, default=None,
                        help="fit the budget knobs on the held-out split of --dataset to this mean GMACs first")
    add_data_arguments(parser, holdout_help=RECORDED_HOLDOUT_HELP)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..report.gallery import show, write_figures
    from ..training.distributed import select_device

    figures = show(args.checkpoint, args.images, n=args.n, budget=parse_knobs(args.budget),
                   calibrate=None if args.calibrate_gmacs is None else {"gmacs": args.calibrate_gmacs},
                   dataset=args.dataset, data_root=args.data_root, download=args.download,
                   holdout_size=args.holdout_size, limit=args.limit, batch_size=args.batch_size,
                   device=select_device(args.device))
    for path in write_figures(figures, args.out):
        print(f"wrote {path}")
    return 0
