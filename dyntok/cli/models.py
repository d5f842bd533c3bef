"""``dyntok models``: list the model names ``create_model`` and ``--model`` accept."""
from __future__ import annotations

import argparse

from ..measure.macs import vit_macs
from ..methods import list_methods, list_models
from ..models import PRESETS, create_backbone
from ..pretrained import available, model_card, shipped_presets


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help="list methods, presets and model names",
                                   description="List registered methods and CIFAR presets with their size.")
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'dvt_*'")
    parser.add_argument("--timm", action="store_true", help="also list timm's plain-ViT names")
    return parser


def run(args: argparse.Namespace) -> int:
    print("methods:", ", ".join(list_methods()))
    width = max(map(len, PRESETS)) + 2
    print(f"{'preset':<{width}}{'params (M)':>12}{'GMACs':>10}  shipped weights (test top-1)")
    for preset in PRESETS:
        vit = create_backbone(preset)
        params = sum(p.numel() for p in vit.parameters()) / 1e6
        shipped = f"{100 * model_card(preset)['test_top1']:.2f}%" if available(preset) else "-"
        print(f"{preset:<{width}}{params:>12.2f}{vit_macs(vit) / 1e9:>10.4f}  {shipped}")
    methods = [name for name in shipped_presets() if name not in PRESETS]
    if methods:
        print("\nshipped method weights (create_model(NAME, pretrained=True)):")
        for name in methods:
            card = model_card(name)
            budget = " ".join(f"{key}={value}" for key, value in card.get("budget", {}).items())
            print(f"  {name}: {100 * card['test_top1']:.2f}% test top-1 at {budget or 'its budget'}")
    print("\nmodels:")
    for model_name in list_models(args.pattern, include_timm=args.timm):
        print(" ", model_name)
    return 0
