"""``dyntok eval``: accuracy, per-image GMACs, throughput and batch-1 latency of a saved model."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..data import build_loaders
from ..data.recorded_split import calibration_split, check_training_set
from ..deploy import runtime
from ..deploy.export import export
from ..evaluation import evaluate
from ..fileio import load_meta
from ..measure.latency_budget import wall_clock_timer
from ..measure.speed import compare_speed, first_images, inference_context
from ..methods import create_model_from_config, load_model
from ..training.distributed import select_device
from ._common import RECORDED_HOLDOUT_HELP, add_data_arguments, data_config, parse_knobs


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="evaluate a saved model: top-1, GMACs, speed",
        description="Evaluate a model.safetensors (or a training checkpoint) on the test split: top-1, mean and "
                    "per-image GMACs, then throughput and batch-1 latency measured interleaved with the dense "
                    "backbone of the same shape (speed-ups are ratios to it, as docs/measurement.md says).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="model.safetensors or last.safetensors written by dyntok train")
    parser.add_argument("--budget", action="append", default=[], metavar="KNOB=VALUE",
                        help="set a budget knob before evaluating, e.g. keep_ratio=0.7 (repeatable)")
    parser.add_argument("--calibrate-gmacs", type=float, default=None,
                        help="fit the budget knobs on the held-out split to this mean GMACs first")
    parser.add_argument("--calibrate-latency", type=milliseconds, default=None, metavar="MS",
                        help="fit the budget knobs to this latency per batch of --batch-size images, timed on this "
                             "machine (e.g. 5ms); the eager model is timed, whatever the backend")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                        help="evaluate the eager model, or its ONNX export (made at the final budget) run by "
                             "onnxruntime on CPU; the dense reference runs on the same backend")
    add_data_arguments(parser, holdout_help=RECORDED_HOLDOUT_HELP)
    speed = parser.add_argument_group("speed")
    speed.add_argument("--no-speed", action="store_true", help="skip throughput and latency")
    speed.add_argument("--speed-batch-size", type=int, default=None, help="default: 64 on CPU, 256 on GPU")
    speed.add_argument("--speed-images", type=int, default=1024, help="test images timed for throughput")
    speed.add_argument("--latency-images", type=int, default=64, help="test images timed one by one")
    speed.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--output", default=None, help="write the results as JSON here (default: print only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def milliseconds(text: str) -> float:
    """``"5ms"`` or ``"5"`` -> 5.0."""
    value = float(text.strip().removesuffix("ms"))
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a latency target must be positive, got {text!r}")
    return value


def dense_reference(model):
    """The dense backbone of the same shape; its speed does not depend on its weights."""
    config = dict(model.config, method="dense", method_kwargs={})
    return create_model_from_config(config)


def speed_report(model, dense, images: torch.Tensor, device: torch.device, args: argparse.Namespace) -> dict:
    """The model against its dense backbone, as the benchmark compares them (``dense_throughput``...)."""
    batch_size = args.speed_batch_size or (256 if device.type == "cuda" else 64)
    speed = compare_speed(dense.predict, model.predict, images[:args.speed_images], batch_size, args.latency_images,
                          args.repeats, device=device, progress=not args.no_progress, baseline_name="dense")
    return {"batch_size": batch_size, **speed}


def on_onnxruntime(model, dense, device: torch.device, card: dict[str, Any] | None):
    """The model and the dense reference exported at their budgets and loaded back with onnxruntime."""
    if device.type != "cpu":
        raise ValueError("--backend onnxruntime runs on CPU: pass --device cpu")
    with tempfile.TemporaryDirectory(prefix="dyntok-eval-") as exports:  # sessions hold the graphs once loaded
        return (runtime.load(export(model, Path(exports) / "model", card=card)),
                runtime.load(export(dense, Path(exports) / "dense")))


def run(args: argparse.Namespace) -> int:
    device = select_device(args.device)
    model = load_model(args.checkpoint, map_location=device).eval()
    image_size = model.backbone_spec.resolved_kwargs()[1].get("img_size")
    # The held-out split only matters for calibration, which must use the model's own.
    calibrating = args.calibrate_gmacs is not None or args.calibrate_latency is not None
    split = calibration_split(args.checkpoint, args.holdout_size) if calibrating else {"holdout_size": 0, "seed": 0}
    # Feed the model what it saw in training (its normalisation and evaluation crop), or for a converted
    # official checkpoint what the official evaluation fed it (DeiT's: crop 0.875).
    seen = load_meta(args.checkpoint).get("eval_transform", {})
    loaders = build_loaders(data_config(args, image_size=image_size, holdout_size=split["holdout_size"],
                                        seed=split["seed"], **seen))
    check_training_set(split.get("fingerprint"), loaders["fingerprint"], args.checkpoint, args.dataset)
    if loaders["num_classes"] != model.num_classes:
        raise ValueError(f"{args.checkpoint} predicts {model.num_classes} classes but {args.dataset} has "
                         f"{loaders['num_classes']}: evaluate it on the dataset it was trained for")
    if args.budget:
        model.set_budget(**parse_knobs(args.budget))
    if args.calibrate_gmacs is not None:
        with inference_context(device):  # fit the thresholds in the arithmetic the model is evaluated and timed in
            model.calibrate(loaders["holdout"], gmacs=args.calibrate_gmacs)
    if args.calibrate_latency is not None:
        model.calibrate_latency(loaders["holdout"], args.calibrate_latency, batch_size=args.batch_size,
                                timer=wall_clock_timer(device=device))
    # Savings are against the dense ViT of the same backbone, whatever the method runs internally.
    dense = dense_reference(model).to(device).eval()
    if args.backend == "onnxruntime":
        model, dense = on_onnxruntime(model, dense, device, load_meta(args.checkpoint).get("card"))
    result = evaluate(model, loaders["test"], device, progress=not args.no_progress)
    dense_gmacs = dense.dense_macs() / 1e9
    report = {"checkpoint": args.checkpoint, "backend": args.backend, "config": model.config,
              "budget": model.get_budget(),
              **result.summary(), "dense_gmacs": dense_gmacs, "mac_reduction": dense_gmacs / result.mean_gmacs}
    if not args.no_speed:
        images = first_images(loaders["test"], max(args.speed_images, args.latency_images))
        report["speed"] = speed_report(model, dense, images, device, args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0
