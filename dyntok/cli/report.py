"""``dyntok report``: re-render a benchmark report (leaderboard, plots, README table) from results.json."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="re-render a benchmark report from its results.json",
        description="Write leaderboard.md, accuracy_vs_gmacs.png and accuracy_vs_throughput.png into DIR from "
                    "DIR/results.json, without measuring anything; optionally refresh a README's results table.")
    parser.add_argument("folder", type=Path, metavar="DIR", help="a report folder written by `dyntok bench`")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also rewrite this file's results table, between <!-- results:start --> and "
                             "<!-- results:end -->")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..report import load_results, render_report, update_readme

    for path in render_report(args.folder):
        print(f"wrote {path}")
    if args.readme is not None:
        link = Path(os.path.relpath(args.folder / "leaderboard.md", args.readme.resolve().parent)).as_posix()
        update_readme(args.readme, load_results(args.folder), report_link=link)
        print(f"updated the results table in {args.readme}")
    return 0
