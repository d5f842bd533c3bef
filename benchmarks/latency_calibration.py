"""Does a budget in milliseconds land on its target? Every method fitted with ``calibrate_latency``, then re-timed.

For each size, batch size and method, the method's budget sweep is timed first, and targets are set between
its fastest and its slowest budget (``--shares`` of the way), so that every target is one the method can meet
(at small sizes and batch 1 no method is faster than dense: shares of dense latency would be unreachable). The
method is fitted to each target with ``model.calibrate_latency`` (which times its
budget sweep on the fit images and bisects between sweep points), then timed afresh on other images,
interleaved with the dense model (docs/measurement.md). The report gives each fitted budget's latency over
its target: within 10% is the acceptance (the fit keeps the slowest budget under the target, so below 1 is
expected). A target the fit then finds below every budget (the machine's noise) is a row saying so. The sweep
timed first is reported too: every method's latency against its budget (and its mean GMACs), beside dense at
the same batch size, as a table and a plot (``latency_vs_budget.png``).

The micro preset runs the shipped weights on CIFAR-10 (fit on the held-out split, timed on test images);
DeiT-S runs random weights on random images (content then decides nothing real, the timing is what counts).
Run from the repository root:

    python benchmarks/latency_calibration.py                                # micro and DeiT-S, batch 1, 8 and 64
    python benchmarks/latency_calibration.py --sizes deit_small --batch-sizes 1 --images 16
    python benchmarks/latency_calibration.py --sizes vit_cifar_micro --batch-sizes 1 --shares 0.6
    python benchmarks/latency_calibration.py --smoke                        # seconds: checks the script runs

Writes ``results.json``, ``README.md`` and ``latency_vs_budget.png`` into ``--output`` (default
``reports/latency_calibration``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import dyntok
from dyntok.data import DataConfig, DatasetNotFoundError, build_loaders
from dyntok.measure.latency_budget import timed_images, wall_clock_timer
from dyntok.measure.speed import first_images, measure_throughput
from dyntok.models.vit import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_at_scale import budget_text, create_for_timing, environment  # noqa: E402  (a sibling script, not a package)

#: Within this share of the target a fitted budget counts as landed (#26).
TOLERANCE = 0.10
SMOKE = dict(sizes=["vit_cifar_nano"], methods=["dynamicvit", "tome"], batch_sizes=[1], shares=[0.8], images=8,
             repeats=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="vit_cifar_micro,deit_small", help="comma-separated presets or DeiT sizes")
    parser.add_argument("--methods", default=",".join(m for m in dyntok.list_methods() if m != "dense"))
    parser.add_argument("--batch-sizes", default="1,8,64", help="comma-separated batch sizes the targets are for")
    parser.add_argument("--shares", default="0.25,0.75",
                        help="targets, as shares of the way from the method's fastest budget to its slowest")
    parser.add_argument("--images", type=int, default=32, help="images timed when checking a fitted budget")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--output", default="reports/latency_calibration")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works")
    args = parser.parse_args(argv)
    args.sizes, args.methods = args.sizes.split(","), args.methods.split(",")
    args.batch_sizes = [int(value) for value in args.batch_sizes.split(",")]
    args.shares = [float(value) for value in args.shares.split(",")]
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def images_for(size: str, model, count: int) -> tuple[list[tuple[torch.Tensor, None]], torch.Tensor, str]:
    """Fit batches and check images: CIFAR-10 held-out and test images for a CIFAR preset, noise otherwise."""
    if size in PRESETS:
        try:
            loaders = build_loaders(DataConfig(dataset="cifar10", batch_size=64, holdout_size=512))
            fit = first_images(loaders["holdout"], 512)
            return [(chunk, None) for chunk in fit.split(64)], first_images(loaders["test"], count), "CIFAR-10"
        except DatasetNotFoundError as error:
            print(f"{size}: {error}; timing random images instead", file=sys.stderr)
    generator = torch.Generator().manual_seed(0)
    fit = torch.randn(128, *model.input_size, generator=generator)
    return [(chunk, None) for chunk in fit.split(64)], torch.randn(count, *model.input_size, generator=generator), "noise"


def ms_per_batch(models: dict[str, Any], images: torch.Tensor, batch: int, repeats: int) -> dict[str, float]:
    """Milliseconds per batch of ``batch`` images, interleaved, median of ``repeats``."""
    speed = measure_throughput({name: model.predict for name, model in models.items()}, images, batch, repeats,
                               progress=False)
    return {name: 1000 * batch / result.value for name, result in speed.items()}


def time_sweep(model, fit: list, batch: int, repeats: int) -> list[dict[str, Any]]:
    """Every budget of the method's sweep: milliseconds per batch of ``batch`` fit images, and mean GMACs per
    image over the fit images (what the budget costs on them: content decides it for some methods)."""
    model.calibrate(fit)  # what the sweep is built from (DVT's held-out confidences)
    images, batches = torch.cat([images for images, _ in fit]), timed_batches(fit, batch)
    timer, budget = wall_clock_timer(repeats), model.get_budget()
    points = []
    for point in model.budget_sweep():
        model.set_budget(**point)
        with torch.inference_mode():
            gmacs = torch.cat([model.predict(chunk).macs for chunk in images.split(64)]).mean().item() / 1e9
        points.append({"budget": point, "gmacs": gmacs, "ms": timer(model.predict, batches)})
    model.set_budget(**budget)
    return points


def time_dense(dense, fit: list, batch: int, repeats: int) -> dict[str, float]:
    """The dense model on the batches :func:`time_sweep` times: milliseconds per batch and GMACs per image."""
    return {"ms": wall_clock_timer(repeats)(dense.predict, timed_batches(fit, batch)),
            "gmacs": dense.dense_macs() / 1e9}


def timed_batches(fit: list, batch: int) -> list[torch.Tensor]:
    """The fit images a budget is timed on, in batches of ``batch``: as many as ``calibrate_latency`` times."""
    return list(torch.cat([images for images, _ in fit])[:timed_images(batch)].split(batch))


def measure_size(size: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The fitted budgets' rows, and every method's timed sweep at every batch size."""
    dense = create_for_timing("dense", size)
    fit, check, source = images_for(size, dense, max(args.images, 4 * max(args.batch_sizes)))
    rows, sweeps = [], []
    for batch in args.batch_sizes:
        sweeps.append({"size": size, "method": "dense", "batch": batch, "images": source,
                       "points": [time_dense(dense, fit, batch, args.repeats)]})
        for method in args.methods:
            model = create_for_timing(method, size)
            points = time_sweep(model, fit, batch, args.repeats)
            sweeps.append({"size": size, "method": method, "batch": batch, "images": source, "points": points})
            fastest, slowest = min(p["ms"] for p in points), max(p["ms"] for p in points)
            for share in args.shares:
                row = {"size": size, "method": method, "batch": batch, "images": source, "share": share,
                       "fastest_ms": fastest, "slowest_ms": slowest, "target_ms": fastest + share * (slowest - fastest)}
                try:
                    row["budget"] = model.calibrate_latency(fit, row["target_ms"], batch_size=batch)
                except ValueError as error:
                    row["unreachable"] = str(error)
                else:
                    timed = ms_per_batch({"method": model, "dense": dense}, check, batch, args.repeats)
                    row.update(measured_ms=timed["method"], dense_ms=timed["dense"],
                               landed=timed["method"] / row["target_ms"])
                print(_line(row), flush=True)
                rows.append(row)
    return rows, sweeps


def _line(row: dict[str, Any]) -> str:
    head = f"{row['size']:<16} {row['method']:<10} b={row['batch']:<3} target {row['target_ms']:8.2f} ms"
    if "unreachable" in row:
        return f"{head}  unreachable: {row['unreachable']}"
    return f"{head}  measured {row['measured_ms']:8.2f} ms  ({row['landed']:.2f} of target)  {row['budget']}"


def render_markdown(results: dict[str, Any]) -> str:
    env, rows = results["environment"], results["rows"]
    landed = [row for row in rows if "landed" in row]
    within = sum(1 - TOLERANCE <= row["landed"] <= 1 + TOLERANCE for row in landed)
    lines = ["# Budgets in milliseconds: where a latency-calibrated budget lands", "",
             f"`{results['command']}` on {env['cpu']} ({env['device']}, {env['threads']} torch threads), torch "
             f"{env['torch']}, {env['precision']}, {env['date']}.", "",
             "Each target lies between the method's fastest and slowest budget (timed first; **share** of the way). "
             "`calibrate_latency` fits the method to it on fit images; the fitted budget is then timed on other images, interleaved with dense "
             f"(median of {results['settings']['repeats']}). **landed** = measured / target: within "
             f"{TOLERANCE:.0%} is the acceptance.", "",
             f"**{within} of {len(landed)}** fitted budgets landed within {TOLERANCE:.0%} of their target; "
             f"{len(rows) - len(landed)} targets were found unreachable when fitting.", "",
             "| size | images | method | batch | range ms | share | target ms | measured ms | landed | dense ms | fitted budget |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        if "unreachable" in row:
            lines.append(f"| {row['size']} | {row['images']} | {row['method']} | {row['batch']} | {_range(row)} | "
                         f"{row['share']:g} | {row['target_ms']:.2f} | unreachable | | | {row['unreachable']} |")
            continue
        budget = budget_text(row["budget"])
        lines.append(f"| {row['size']} | {row['images']} | {row['method']} | {row['batch']} | {_range(row)} | "
                     f"{row['share']:g} | {row['target_ms']:.2f} | {row['measured_ms']:.2f} | {row['landed']:.2f} | {row['dense_ms']:.2f} | {budget} |")
    return "\n".join(lines + render_sweeps(results)) + "\n"


def render_sweeps(results: dict[str, Any]) -> list[str]:
    """Every method's latency against its budget, per size and batch size, beside dense's."""
    lines = ["", "## Latency against budget", "",
             f"Each method's budget sweep as timed before fitting (median of {results['settings']['repeats']}, on the "
             "fit images): mean GMACs per image on those images, milliseconds per batch, and that latency over dense's "
             "at the same batch size (below 1: faster than dense). Plotted in `latency_vs_budget.png`."]
    for (size, batch), sweeps in _by_size_and_batch(results["sweeps"]).items():
        dense = next(sweep["points"][0] for sweep in sweeps if sweep["method"] == "dense")
        lines += ["", f"### {size}, batch {batch}", "", "| method | budget | GMACs | ms per batch | vs dense |",
                  "| --- | --- | ---: | ---: | ---: |",
                  f"| dense | | {dense['gmacs']:.3f} | {dense['ms']:.2f} | 1.00 |"]
        for sweep in sweeps:
            if sweep["method"] == "dense":
                continue
            for point in sorted(sweep["points"], key=lambda point: point["gmacs"]):
                budget = budget_text(point["budget"])
                lines.append(f"| {sweep['method']} | {budget} | {point['gmacs']:.3f} | {point['ms']:.2f} | "
                             f"{point['ms'] / dense['ms']:.2f} |")
    return lines


def _by_size_and_batch(sweeps: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for sweep in sweeps:
        groups.setdefault((sweep["size"], sweep["batch"]), []).append(sweep)
    return groups


def plot_sweeps(results: dict[str, Any], path: Path) -> Path:
    """One panel per size and batch size: milliseconds per image against mean GMACs, a line per method, dense a
    star (a budget left of and below the star saves both)."""
    from matplotlib.figure import Figure

    groups = _by_size_and_batch(results["sweeps"])
    sizes = list(dict.fromkeys(size for size, _ in groups))
    batches = list(dict.fromkeys(batch for _, batch in groups))
    figure = Figure(figsize=(4.2 * len(batches), 3.6 * len(sizes)), dpi=120, layout="constrained")
    panels = figure.subplots(len(sizes), len(batches), squeeze=False)
    for (size, batch), sweeps in groups.items():
        axes = panels[sizes.index(size)][batches.index(batch)]
        for index, sweep in enumerate(sweeps):
            points = sorted(sweep["points"], key=lambda point: point["gmacs"])
            xs, ys = [p["gmacs"] for p in points], [p["ms"] / batch for p in points]
            if sweep["method"] == "dense":
                axes.scatter(xs, ys, marker="*", s=160, color="black", zorder=4, label="dense")
            else:
                axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, color=f"C{index}", label=sweep["method"])
        axes.set_title(f"{size}, batch {batch}", fontsize=9)
        axes.set_xlabel("mean GMACs per image", fontsize=8)
        axes.set_ylabel("ms per image", fontsize=8)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=6)
    figure.savefig(path)
    return path


def _range(row: dict[str, Any]) -> str:
    return f"{row['fastest_ms']:.2f}-{row['slowest_ms']:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows, sweeps = [], []
    for size in args.sizes:
        size_rows, size_sweeps = measure_size(size, args)
        rows, sweeps = rows + size_rows, sweeps + size_sweeps
    command = "python benchmarks/latency_calibration.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    results = {"command": command, "environment": environment(torch.device("cpu")),
               "settings": {key: value for key, value in vars(args).items() if key != "output"}, "rows": rows,
               "sweeps": sweeps}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "README.md").write_text(render_markdown(results))
    plot_sweeps(results, output / "latency_vs_budget.png")
    return results


if __name__ == "__main__":
    main()
