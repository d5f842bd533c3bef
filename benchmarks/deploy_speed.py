"""Does an ONNX export keep what the method saves? Eager PyTorch against onnxruntime, every registered method.

For each backbone size and each method's ``speed_budgets(images)`` (as in ``speed_at_scale.py``: the paper's
budget first, content-dependent shares forced; the shipped weights on a dyntok preset, random weights at DeiT
sizes), the model is exported with
``dyntok.export`` and loaded with ``dyntok.runtime.load``, and four predictors are timed interleaved in one
process (docs/measurement.md): the dense model and the method, each eager and under onnxruntime, all with
``explain = False`` (no extras recorded: what a deployment runs). Throughput at ``--batch`` and latency at
batch 1 are reported, with each method's realised speed-up over dense *inside* each backend. onnxruntime gets
as many threads as torch. A method that cannot be exported gets a row saying why. Run from the repository root:

    python benchmarks/deploy_speed.py                                     # micro and DeiT-S, CPU, float32
    python benchmarks/deploy_speed.py --sizes deit_small --methods dense,dvt,dynamicvit --repeats 3
    python benchmarks/deploy_speed.py --smoke                             # seconds: checks the script runs

Writes ``results.json`` and ``README.md`` into ``--output`` (default ``reports/deploy_speed``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import dyntok
from dyntok.deploy.export import ExportError
from dyntok.measure.speed import measure_latency, measure_throughput

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_at_scale import create_for_timing, environment  # noqa: E402  (a sibling script, not a package)

DEFAULT_SIZES = ("vit_cifar_micro", "deit_small")
#: A run of seconds that exercises every path of the script (CI-sized, numbers meaningless).
SMOKE = dict(sizes=["vit_cifar_nano"], methods=["dense", "dynamicvit", "dvt", "revit", "adavit"], batch=4, images=8,
             latency_images=2, repeats=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated presets or DeiT sizes")
    parser.add_argument("--methods", default=",".join(dyntok.list_methods()), help="comma-separated methods")
    parser.add_argument("--batch", type=int, default=64, help="throughput batch size")
    parser.add_argument("--images", type=int, default=256, help="images timed for throughput")
    parser.add_argument("--latency-images", type=int, default=32, help="images timed one at a time")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--output", default="reports/deploy_speed", help="directory for results.json and README.md")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works")
    args = parser.parse_args(argv)
    args.sizes, args.methods = args.sizes.split(","), args.methods.split(",")
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def timed(predictors: dict[str, Any], images: torch.Tensor, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    throughput = measure_throughput(predictors, images, args.batch, args.repeats, progress=False)
    latency = measure_latency(predictors, images[:args.latency_images], args.repeats, progress=False)
    return {name: {"images_per_s": throughput[name].value, "latency_ms": latency[name].value} for name in predictors}


def exported(model, directory: Path):
    return dyntok.runtime.load(dyntok.export(model, directory), threads=torch.get_num_threads())


def measure_size(size: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    dense = create_for_timing("dense", size)
    images = torch.randn(args.images, *dense.input_size, generator=torch.Generator().manual_seed(0))
    dense_onnx = exported(dense, workdir / f"{size}-dense")
    rows = []
    for method in args.methods:
        model = dense if method == "dense" else create_for_timing(method, size)
        for label, budget in model.speed_budgets(images).items():
            model.set_budget(**budget)
            row = {"size": size, "method": method, "budget_label": label, "budget": model.get_budget()}
            try:
                onnx_model = exported(model, workdir / f"{size}-{method}-{len(rows)}")
            except ExportError as error:
                rows.append({**row, "export_refused": str(error)})
                print(f"{size} {method} {label}: not exported ({error})", flush=True)
                continue
            times = timed({"dense eager": dense.predict, "eager": model.predict, "dense onnxruntime": dense_onnx.predict,
                           "onnxruntime": onnx_model.predict}, images, args)
            row.update(times=times, mac_reduction=dense.dense_macs() / model.predict(images).macs.mean().item(),
                       **ratios(times))
            rows.append(row)
            print(f"{size} {method} {label}: {json.dumps(ratios(times))}", flush=True)
    return rows


def ratios(times: dict[str, dict[str, float]]) -> dict[str, float]:
    """Speed-ups over dense inside each backend, and onnxruntime over eager for the method itself."""
    return {
        "eager_speedup": times["eager"]["images_per_s"] / times["dense eager"]["images_per_s"],
        "onnx_speedup": times["onnxruntime"]["images_per_s"] / times["dense onnxruntime"]["images_per_s"],
        "eager_b1_speedup": times["dense eager"]["latency_ms"] / times["eager"]["latency_ms"],
        "onnx_b1_speedup": times["dense onnxruntime"]["latency_ms"] / times["onnxruntime"]["latency_ms"],
        "onnx_over_eager_throughput": times["onnxruntime"]["images_per_s"] / times["eager"]["images_per_s"],
        "onnx_over_eager_b1": times["eager"]["latency_ms"] / times["onnxruntime"]["latency_ms"],
    }


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    lines = ["# Eager PyTorch against onnxruntime", "", f"`{command}` on {env['cpu']} ({env['threads']} threads), "
             f"torch {env['torch']}, {env['date']}. Speed-ups are over the dense model on the same backend; "
             "b1 = batch-1 latency.", "",
             "| size | method | budget | MAC reduction | eager speed-up | onnx speed-up | eager b1 | onnx b1 | "
             "onnx/eager thr. | onnx/eager b1 |", "|" + " --- |" * 10]
    for row in rows:
        if "export_refused" in row:
            lines.append(f"| {row['size']} | {row['method']} | {row['budget_label']} | not exported: "
                         f"{row['export_refused'][:120]} |||||||")
            continue
        values = [row[key] for key in ("mac_reduction", "eager_speedup", "onnx_speedup", "eager_b1_speedup",
                                       "onnx_b1_speedup", "onnx_over_eager_throughput", "onnx_over_eager_b1")]
        lines.append(f"| {row['size']} | {row['method']} | {row['budget_label']} | "
                     + " | ".join(f"{value:.2f}x" for value in values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/deploy_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = environment(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="dyntok-deploy-speed-") as workdir:
        rows = [row for size in args.sizes for row in measure_size(size, args, Path(workdir))]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps({"command": command, "environment": env, "rows": rows},
                                                    indent=2) + "\n")
    (output / "README.md").write_text(markdown(rows, env, command))
    print(markdown(rows, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
