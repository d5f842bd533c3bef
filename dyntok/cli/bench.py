"""``dyntok bench``: train and measure every entry of a benchmark spec, then write the report."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

PROFILES = ("cpu", "full", "gpu")


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="benchmark methods against dense and static baselines",
        description="Train every entry of a benchmark spec (cached: a re-run only does what is missing), evaluate "
                    "top-1 and GMACs at each budget point, time each against the dense model, and write "
                    "results.json, leaderboard.md and plots. Without arguments: the CPU default on CIFAR-10 "
                    "(about 30 minutes on 2 cores). See docs/benchmark.md.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--spec", type=Path, default=None, help="a benchmark spec (YAML)")
    source.add_argument("--profile", choices=PROFILES, default="cpu",
                        help="built-in spec: cpu (default, ~30 min on 2 cores), full (hours on CPU), gpu (ImageNet "
                             "scale)")
    parser.add_argument("--output", type=Path, default=None,
                        help="report folder, also holding the cache (default: reports/<profile or spec name>)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where trained models and evaluations are cached (default: OUTPUT/cache); entries are "
                             "keyed by their settings, so specs can share one")
    parser.add_argument("--data-root", default=None, help="where to look for the dataset first")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the spec's)")
    parser.add_argument("--only", action="append", default=[], metavar="ENTRY",
                        help="run only this entry, plus what it needs (repeatable)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train the models the spec takes from dyntok's shipped weights (pretrained: true: references "
                             "and methods) with the recipe that made them, instead of loading them")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimated time, run nothing")
    parser.add_argument("--speed-images", type=int, default=None, metavar="N",
                        help="test images per throughput measurement (default: the spec's)")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed repetitions per speed measurement, median reported (default: the spec's)")
    return parser


def _spec_from_args(args: argparse.Namespace):
    from ..bench.spec import builtin_spec_path, load_spec, with_references_from_scratch

    spec = load_spec(args.spec if args.spec is not None else builtin_spec_path(args.profile))
    if args.from_scratch:
        spec = with_references_from_scratch(spec)
    speed = {key: value for key, value in (("images", args.speed_images), ("repeats", args.repeats))
             if value is not None}
    for key, value in speed.items():
        if value < 1:
            raise ValueError(f"--{'speed-images' if key == 'images' else key} must be at least 1, got {value}")
    data = dataclasses.replace(spec.data, data_root=args.data_root or spec.data.data_root)
    return dataclasses.replace(spec, data=data, device=args.device or spec.device,
                               speed=dataclasses.replace(spec.speed, **speed))


def run(args: argparse.Namespace) -> int:
    from ..bench.runner import prepare, run_benchmark
    from ..fileio import check_writable_folder

    spec = _spec_from_args(args)
    output = args.output or Path("reports") / (spec.name if args.spec is not None else args.profile)
    if args.dry_run:
        plan, _ = prepare(spec, output, args.only, args.cache_dir)
        print(plan.describe(output))
        return 0
    # Before any data is read or entry trained: a folder that cannot be written fails now, named by its option.
    check_writable_folder(output, "--output")
    if args.cache_dir is not None:
        check_writable_folder(args.cache_dir, "--cache-dir")
    results = run_benchmark(spec, output, args.only, cache_dir=args.cache_dir)
    print(f"{len(results['entries'])} entries measured in {results['seconds'] / 60:.1f} min; "
          f"report: {output / 'leaderboard.md'}")
    return 0
