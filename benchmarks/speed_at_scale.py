"""Saved MACs become saved time? Every registered method timed against the dense ViT at real model sizes.

With the budget pinned, cost does not depend on the weights, so no training is needed: each DeiT shape
(``<size>_patch16_224``) is built with random weights for every method in ``dyntok.list_methods()``, and each
of the method's ``speed_budgets(images)`` (its paper's budget first; methods whose cost follows the content
force their exit, length or skip shares there) is timed against the dense model, interleaved in one process
(docs/measurement.md). CPU: float32, batch 64; GPU: bf16 autocast, batch 256. Run from the repository root:

    python benchmarks/speed_at_scale.py                                  # CPU, DeiT-Ti/S/B, about an hour on 2 cores
    python benchmarks/speed_at_scale.py --sizes deit_small --repeats 3   # the issue's targets only
    python benchmarks/speed_at_scale.py --device cuda                    # GPU: bf16, batch 256
    python benchmarks/speed_at_scale.py --compile --output reports/speed_compile   # does torch.compile pay?

``--compile`` also times ``torch.compile(predict)`` of the dense model and of each method, all four
interleaved, and reports what compiling gains each one and the compiled ratios to the compiled dense model.

Writes ``results.json`` and ``README.md`` (the report) into ``--output``; ``--append`` replaces only the
sizes and methods measured now (each row names its run, each run its command, machine and settings).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

import dyntok
from dyntok.measure.speed import inference_context, measure_latency, measure_throughput, precision
from dyntok.models.vit import PRESETS
from dyntok.pretrained import REFERENCE, packaged_file
from dyntok.training.distributed import select_device

DEFAULT_SIZES = ("deit_tiny", "deit_small", "deit_base")


def backbone_name(size: str) -> str:
    """``deit_small`` -> ``deit_small_patch16_224``; a dyntok preset or a full timm name is kept as it is."""
    return size if size in PRESETS or "patch" in size else f"{size}_patch16_224"


def create_for_timing(method: str, size: str, **overrides: Any):
    """``method`` on ``size`` in eval mode with ``explain`` off (what a deployment runs).

    A dyntok preset gets the weights dyntok ships: the method's own where it was trained and shipped, else the
    method started from the preset's dense reference. A DeiT size gets random weights (seed 0): with the budget
    pinned, cost does not depend on them.
    """
    backbone = backbone_name(size)
    name = backbone if method == "dense" else f"{method}_{backbone}"
    torch.manual_seed(0)
    if backbone in PRESETS and not overrides:
        model = dyntok.create_model(name, pretrained=True if packaged_file(name).is_file() else REFERENCE)
    else:
        model = dyntok.create_model(name, **overrides)
    model.eval().explain = False
    return model


def budget_text(budget: dict[str, Any]) -> str:
    """A budget as the reports' tables show it: ``knob=value`` pairs, numbers to 3 significant digits."""
    return ", ".join(f"{knob}={_short(value)}" for knob, value in budget.items())


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(_short, value)) + "]"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures depend on: the processor (or GPU), torch and its threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "device": str(device), "precision": precision(device),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def measure_size(size: str, args: argparse.Namespace, device: torch.device,
                 overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, speed budget), each timed interleaved with the dense model of the same shape."""
    backbone = backbone_name(size)
    torch.manual_seed(0)
    dense = dyntok.create_model(backbone, **overrides).to(device).eval()
    images = torch.randn(args.images or args.batch, *dense.input_size, generator=torch.Generator().manual_seed(0))
    latency_images = images[:args.latency_images]
    dense_macs = dense.dense_macs()
    # The first timed passes of a process pay one-off costs (allocator growth, oneDNN kernel selection) that a
    # per-measurement warm-up does not cover: the first row of an unwarmed run timed dense 1.5x against itself.
    measure_throughput({"dense": dense.predict}, images, args.batch, repeats=2, device=device, progress=False)
    measure_latency({"dense": dense.predict}, latency_images, repeats=2, device=device, progress=False)
    compiled_dense = torch.compile(dense.predict) if args.compile else None
    rows = []
    for method in dyntok.list_methods():
        if args.methods and method not in args.methods:
            continue
        torch.manual_seed(0)
        model = dyntok.create_model(f"{method}_{backbone}", **overrides).to(device).eval()
        with torch.inference_mode(), inference_context(device):
            budgets = model.speed_budgets(images.to(device))
        compiled_model = torch.compile(model.predict) if args.compile else None
        for label, knobs in budgets.items():
            model.set_budget(**knobs)
            with torch.inference_mode(), inference_context(device):
                macs = float(model.predict(images.to(device)).macs.double().mean())
                latency_macs = float(model.predict(latency_images.to(device)).macs.double().mean())
            predictors = {"dense": dense.predict, "model": model.predict}
            if args.compile:  # the warm-up pass of each measurement compiles (untimed)
                predictors.update(dense_compiled=compiled_dense, model_compiled=compiled_model)
            throughput = measure_throughput(predictors, images, args.batch, args.repeats, device=device,
                                            progress=False)
            latency = measure_latency(predictors, latency_images, args.repeats, device=device, progress=False)
            reduction = dense_macs / macs
            speedup = throughput["model"].value / throughput["dense"].value
            latency_ratio = latency["model"].value / latency["dense"].value
            rows.append({"size": size, "backbone": backbone, "method": method, "budget": label,
                         "knobs": knobs, "dense_gmacs": dense_macs / 1e9, "gmacs": macs / 1e9,
                         "mac_reduction": reduction, "speedup": speedup, "realised": speedup / reduction,
                         "latency_ratio": latency_ratio,
                         # the latency images' own MACs: content-dependent shares differ on a few images
                         "latency_realised": (1 / latency_ratio) / (dense_macs / latency_macs),
                         "dense_images_per_s": throughput["dense"].value,
                         "images_per_s": throughput["model"].value,
                         "dense_latency_ms": latency["dense"].value, "latency_ms": latency["model"].value})
            if args.compile:
                rows[-1].update(compile_columns(throughput, latency))
            print(_row_line(rows[-1]), flush=True)
        del model
    return rows


def compile_columns(throughput: dict[str, Any], latency: dict[str, Any]) -> dict[str, float]:
    """What ``torch.compile`` gains the method and the dense model (compiled / eager, > 1 is faster), and the
    method's ratios to the dense model when both are compiled."""
    return {"compile_gain": throughput["model_compiled"].value / throughput["model"].value,
            "dense_compile_gain": throughput["dense_compiled"].value / throughput["dense"].value,
            "compiled_speedup": throughput["model_compiled"].value / throughput["dense_compiled"].value,
            "compile_latency_gain": latency["model"].value / latency["model_compiled"].value,
            "dense_compile_latency_gain": latency["dense"].value / latency["dense_compiled"].value,
            "compiled_latency_ratio": latency["model_compiled"].value / latency["dense_compiled"].value}


def _row_line(row: dict[str, Any]) -> str:
    return (f"{row['size']:<16}{row['method']:<11}{row['budget']:<32}{row['gmacs']:>8.3f}"
            f"{row['mac_reduction']:>8.2f}x{row['speedup']:>8.2f}x{row['realised']:>9.2f}"
            f"{row['latency_ratio']:>8.2f}{row['latency_realised']:>9.2f}")


def render_markdown(results: dict[str, Any]) -> str:
    """The report: how it was measured, then one table per model size."""
    runs = results["runs"]
    lines = ["# Speed at real model sizes", "",
             "Every registered method on DeiT shapes at 224 px with random weights, each budget timed against the "
             "dense model of the same shape, interleaved in one process (docs/measurement.md).", ""]
    lines += [f"- {_run_label(index, runs)}{_describe_run(run)}" for index, run in enumerate(runs)]
    lines += ["- **MAC red.** = dense MACs / MACs the method reported executing (`Prediction.macs`); **speed-up** = "
              "throughput / dense throughput; **realised** = speed-up / MAC reduction (1.0: every saved MAC became "
              "saved time); **b=1 latency** = latency / dense latency (< 1 is faster); **b=1 realised** = the "
              "latency speed-up over the MAC reduction of the latency images themselves (few images: their exit or "
              "length shares differ from the throughput images')", ""]
    run_column = len(runs) > 1
    for size in dict.fromkeys(row["size"] for row in results["rows"]):
        rows = [row for row in results["rows"] if row["size"] == size]
        lines += [f"## {rows[0]['backbone']} (dense {rows[0]['dense_gmacs']:.2f} GMACs, "
                  f"{rows[0]['dense_images_per_s']:.1f} img/s)", "",
                  "| method | budget | GMACs | MAC red. | speed-up | realised | b=1 latency | b=1 realised |"
                  + (" run |" if run_column else ""),
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if run_column else "")]
        lines += [f"| {row['method']} | {row['budget']} | {row['gmacs']:.3f} | {row['mac_reduction']:.2f}x | "
                  f"{row['speedup']:.2f}x | {row['realised']:.2f} | {row['latency_ratio']:.2f} | "
                  f"{row['latency_realised']:.2f} |" + (f" {row['run'] + 1} |" if run_column else "")
                  for row in rows]
        lines.append("")
        compiled = [row for row in rows if "compile_gain" in row]
        if compiled:
            lines += _compile_table(compiled)
    return "\n".join(lines)


def _run_label(index: int, runs: list[dict[str, Any]]) -> str:
    return f"run {index + 1}: " if len(runs) > 1 else ""


def _describe_run(run: dict[str, Any]) -> str:
    """The command, machine and settings of one run of this script."""
    env, settings = run["environment"], run["settings"]
    machine = env.get("gpu") or env["cpu"]
    compiled = ", eager and `torch.compile`" if settings.get("compile") else ""
    command = " ".join(["python benchmarks/speed_at_scale.py", *run["argv"]])
    return (f"`{command}` on {machine} ({env['device']}, {env['cpu_count']} CPUs, {env['threads']} torch "
            f"threads), torch {env['torch']}, {env['precision']}{compiled}, {env['date']}: throughput at batch {settings['batch']} "
            f"over {settings['images']} images, batch-1 latency over {settings['latency_images']} images, median "
            f"of {settings['repeats']} repetitions")


def merge_results(previous: dict[str, Any], run: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``previous`` results with this run's rows in place of the (size, method) pairs it measured again.

    Runs that no longer own a row are dropped; a report written before runs were recorded is one run.
    """
    if "runs" not in previous:
        previous = {"runs": [{key: previous[key] for key in ("argv", "environment", "settings")}],
                    "rows": [dict(row, run=0) for row in previous["rows"]]}
    measured = {(row["size"], row["method"]) for row in rows}
    kept = [row for row in previous["rows"] if (row["size"], row["method"]) not in measured]
    used = sorted({row["run"] for row in kept})
    renumber = {old: new for new, old in enumerate(used)}
    runs = [previous["runs"][old] for old in used] + [run]
    merged = [dict(row, run=renumber[row["run"]]) for row in kept] + [dict(row, run=len(used)) for row in rows]
    sizes = list(dict.fromkeys(row["size"] for row in merged))  # sections keep their first order
    return {"runs": runs, "rows": sorted(merged, key=lambda row: sizes.index(row["size"]))}


def _compile_table(rows: list[dict[str, Any]]) -> list[str]:
    """The ``--compile`` columns of one size: gains of compiling, and ratios between compiled models."""
    lines = ["`torch.compile(predict)` against eager, all four timed interleaved: **gain** = compiled / eager "
             "throughput (b=1: eager / compiled latency) of the method and of dense; **compiled speed-up** and "
             "**compiled b=1 latency** = the compiled method against the compiled dense model.", "",
             "| method | budget | gain | dense gain | compiled speed-up | b=1 gain | dense b=1 gain | "
             "compiled b=1 latency |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {row['method']} | {row['budget']} | {row['compile_gain']:.2f}x | {row['dense_compile_gain']:.2f}x | "
              f"{row['compiled_speedup']:.2f}x | {row['compile_latency_gain']:.2f}x | "
              f"{row['dense_compile_latency_gain']:.2f}x | {row['compiled_latency_ratio']:.2f} |" for row in rows]
    return lines + [""]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                        help="comma-separated: deit_tiny, deit_small, deit_base (or any timm ViT / dyntok preset)")
    parser.add_argument("--methods", default="", help="comma-separated subset of the registered methods (all)")
    parser.add_argument("--batch", type=int, default=None, help="throughput batch (CPU 64, GPU 256)")
    parser.add_argument("--images", type=int, default=None, help="images per throughput pass (default: one batch)")
    parser.add_argument("--latency-images", type=int, default=8, help="images timed one by one for latency")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(predict) of dense and of each method (compiling takes minutes)")
    parser.add_argument("--output", default="reports/speed_at_scale")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in OUTPUT/results.json except the (size, method) pairs "
                             "measured now: one size or method re-measured without redoing the report")
    args = parser.parse_args(argv)
    args.methods = [name for name in args.methods.split(",") if name]
    unknown = sorted(set(args.methods) - set(dyntok.list_methods()))
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {dyntok.list_methods()}")
    return args


def main(argv: Sequence[str] | None = None, backbone_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the benchmark and write the report; ``backbone_overrides`` shrink the models (tests)."""
    args = parse_args(argv)
    device = select_device(args.device)
    if args.batch is None:
        args.batch = 256 if device.type == "cuda" else 64
    print(f"{'size':<16}{'method':<11}{'budget':<32}{'GMACs':>8}{'MAC red':>9}{'speedup':>9}{'realised':>9}"
          f"{'b=1':>8}{'b=1 real':>9}", flush=True)
    rows = [row for size in args.sizes.split(",") if size
            for row in measure_size(size, args, device, dict(backbone_overrides or {}))]
    run = {"argv": list(sys.argv[1:] if argv is None else argv), "environment": environment(device),
           "settings": {"batch": args.batch, "images": args.images or args.batch,
                        "latency_images": args.latency_images, "repeats": args.repeats, "compile": args.compile}}
    output = Path(args.output)
    if args.append and (output / "results.json").is_file():
        results = merge_results(json.loads((output / "results.json").read_text()), run, rows)
    else:
        results = {"runs": [run], "rows": [dict(row, run=0) for row in rows]}
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    (output / "README.md").write_text(render_markdown(results))
    print(f"wrote {output / 'results.json'} and {output / 'README.md'}")
    return results


if __name__ == "__main__":
    main()
