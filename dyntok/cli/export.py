"""``dyntok export``: a saved model at a fixed budget as ONNX graphs that ``dyntok.runtime.load`` runs."""
from __future__ import annotations

import argparse

from ..fileio import load_meta
from ..methods import load_model
from ..deploy.export import export
from ._common import parse_knobs


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="export a saved model to ONNX at a fixed budget",
        description="Export a model.safetensors (or a training checkpoint) at a fixed budget: one ONNX graph for "
                    "methods without per-image control flow, a few graphs plus the settings of a small runner for "
                    "the others (DVT's stages, ReViT's assigner and lengths). Run the export with "
                    "dyntok.runtime.load(DIR) or evaluate it with dyntok eval --backend onnxruntime "
                    "(docs/deploy.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="model.safetensors or last.safetensors written by dyntok train")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    parser.add_argument("--out", required=True, help="directory to write the graphs and export.json into")
    parser.add_argument("--budget", action="append", default=[], metavar="KNOB=VALUE",
                        help="the budget to export at, e.g. keep_ratio=0.7 (repeatable; default: the saved one)")
    return parser


def run(args: argparse.Namespace) -> int:
    model = load_model(args.checkpoint).eval()
    card = load_meta(args.checkpoint).get("card")
    out = export(model, args.out, budget=parse_knobs(args.budget), card=card, format=args.format)
    print(f"exported {model.method_name} at {model.get_budget() | parse_knobs(args.budget)} to {out}")
    return 0
