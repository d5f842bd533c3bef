"""Saved MACs become saved time? Every registered method timed against the dense ViT at real model sizes.

With the budget pinned, cost does not depend on the weights, so no training is needed: each DeiT shape
(``<size>_patch16_224``) is built with random weights for every method in ``dyntok.list_methods()``, and each
of the method's ``speed_budgets(images)`` (its paper's budget first; methods whose cost follows the content
force their exit, length or skip shares there) is timed against the dense model, interleaved in one process
(docs/measurement.md). CPU: float32, batch 64; GPU: bf16 autocast, batch 256. Run from the repository root:

    python benchmarks/speed_at_scale.py                                  # CPU, DeiT-Ti/S/B, about an hour on 2 cores
    python benchmarks/speed_at_scale.py --sizes deit_small --repeats 3   # the issue's targets only
    python benchmarks/speed_at_scale.py --device cuda                    # GPU: bf16, batch 256

Writes ``results.json`` and ``README.md`` (the report) into ``--output``.
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
from dyntok.training.distributed import select_device

DEFAULT_SIZES = ("deit_tiny", "deit_small", "deit_base")


def backbone_name(size: str) -> str:
    """``deit_small`` -> ``deit_small_patch16_224``; a dyntok preset or a full timm name is kept as it is."""
    return size if size in PRESETS or "patch" in size else f"{size}_patch16_224"


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
    with torch.inference_mode(), inference_context(device):
        measure_throughput({"dense": dense.predict}, images, args.batch, repeats=2, device=device, progress=False)
        measure_latency({"dense": dense.predict}, images[:args.latency_images], repeats=2, device=device,
                        progress=False)
    rows = []
    for method in dyntok.list_methods():
        if args.methods and method not in args.methods:
            continue
        torch.manual_seed(0)
        model = dyntok.create_model(f"{method}_{backbone}", **overrides).to(device).eval()
        with torch.inference_mode(), inference_context(device):
            budgets = model.speed_budgets(images.to(device))
        for label, knobs in budgets.items():
            model.set_budget(**knobs)
            with torch.inference_mode(), inference_context(device):
                macs = float(model.predict(images.to(device)).macs.double().mean())
                latency_macs = float(model.predict(latency_images.to(device)).macs.double().mean())
            predictors = {"dense": dense.predict, "model": model.predict}
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
            print(_row_line(rows[-1]), flush=True)
        del model
    return rows


def _row_line(row: dict[str, Any]) -> str:
    return (f"{row['size']:<16}{row['method']:<11}{row['budget']:<32}{row['gmacs']:>8.3f}"
            f"{row['mac_reduction']:>8.2f}x{row['speedup']:>8.2f}x{row['realised']:>9.2f}"
            f"{row['latency_ratio']:>8.2f}{row['latency_realised']:>9.2f}")


def render_markdown(results: dict[str, Any]) -> str:
    """The report: how it was measured, then one table per model size."""
    env, settings = results["environment"], results["settings"]
    machine = env.get("gpu") or env["cpu"]
    lines = ["# Speed at real model sizes", "",
             "Every registered method on DeiT shapes at 224 px with random weights, each budget timed against the "
             "dense model of the same shape, interleaved in one process (docs/measurement.md). Produced by "
             f"`python benchmarks/speed_at_scale.py {' '.join(results['argv'])}`.".rstrip() + "", "",
             f"- machine: {machine} ({env['device']}, {env['cpu_count']} CPUs, {env['threads']} torch threads), "
             f"torch {env['torch']}, {env['precision']}, {env['date']}",
             f"- throughput at batch {settings['batch']} over {settings['images']} images, batch-1 latency over "
             f"{settings['latency_images']} images; median of {settings['repeats']} repetitions",
             "- **MAC red.** = dense MACs / MACs the method reported executing (`Prediction.macs`); **speed-up** = "
             "throughput / dense throughput; **realised** = speed-up / MAC reduction (1.0: every saved MAC became "
             "saved time); **b=1 latency** = latency / dense latency (< 1 is faster); **b=1 realised** = the latency "
             "speed-up over the MAC reduction of the latency images themselves (few images: their exit or length "
             "shares differ from the throughput images')", ""]
    for size in dict.fromkeys(row["size"] for row in results["rows"]):
        rows = [row for row in results["rows"] if row["size"] == size]
        lines += [f"## {rows[0]['backbone']} (dense {rows[0]['dense_gmacs']:.2f} GMACs, "
                  f"{rows[0]['dense_images_per_s']:.1f} img/s)", "",
                  "| method | budget | GMACs | MAC red. | speed-up | realised | b=1 latency | b=1 realised |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['method']} | {row['budget']} | {row['gmacs']:.3f} | {row['mac_reduction']:.2f}x | "
                  f"{row['speedup']:.2f}x | {row['realised']:.2f} | {row['latency_ratio']:.2f} | "
                  f"{row['latency_realised']:.2f} |"
                  for row in rows]
        lines.append("")
    return "\n".join(lines)


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
    parser.add_argument("--output", default="reports/speed_at_scale")
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
    results = {"argv": list(sys.argv[1:] if argv is None else argv), "environment": environment(device),
               "settings": {"batch": args.batch, "images": args.images or args.batch,
                            "latency_images": args.latency_images, "repeats": args.repeats},
               "rows": rows}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    (output / "README.md").write_text(render_markdown(results))
    print(f"wrote {output / 'results.json'} and {output / 'README.md'}")
    return results


if __name__ == "__main__":
    main()
