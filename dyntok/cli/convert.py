"""``dyntok convert``: an officially released checkpoint as a dyntok checkpoint (docs/byo.md)."""
from __future__ import annotations

import argparse
import json

from ..convert import CONVERTERS, convert
from ._common import parse_knobs


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="convert an official checkpoint (DynamicViT, EViT...) to a dyntok checkpoint",
        description="Read an officially released checkpoint without running code (weights only), map its "
                    "weights and write a dyntok checkpoint configured as the official evaluation ran it.")
    parser.add_argument("--from", dest="source", required=True, choices=sorted(CONVERTERS),
                        help="the official repository the file comes from")
    parser.add_argument("official", help="the official .pth file")
    parser.add_argument("out", help="the dyntok .safetensors file to write")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="the release's settings where the file does not record them, e.g. keep_rate=0.5 "
                             "or fuse=false (repeatable; see docs/byo.md)")
    return parser


def run(args: argparse.Namespace) -> int:
    model = convert(args.source, args.official, args.out, **parse_knobs(args.option))
    print(json.dumps({"written": args.out, "config": model.config, "budget": model.get_budget(),
                      "gmacs": model.dense_macs() / 1e9}, indent=2))
    return 0
