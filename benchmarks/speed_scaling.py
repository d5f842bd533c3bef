"""How much of the adaptive methods' saved compute becomes saved time, as the backbone grows.

With the budget pinned, cost does not depend on the weights, so this needs no training: each backbone is
built with random weights and timed against its dense self, interleaved in one process
(docs/measurement.md). DynamicViT runs at a fixed keep ratio; DVT with every threshold at 0, so that every
image leaves after the first (coarsest) stage: the best case of its early exit. Run from the repository root:

    python benchmarks/speed_scaling.py                       # CPU presets, keep ratio 0.7, batch 64
    python benchmarks/speed_scaling.py --backbones vit_cifar_tiny deit_small_patch16_224 --device cuda

Prints one row per (backbone, method): GMACs, MAC reduction, measured speed-up, realised speed-up and the
batch-1 latency ratio.
"""
from __future__ import annotations

import argparse
import json

import torch

import dyntok
from dyntok.measure.speed import measure_latency, measure_throughput
from dyntok.training.distributed import select_device


def adaptive_models(backbone: str, keep_ratio: float) -> dict[str, dyntok.AdaptiveViT]:
    dynamicvit = dyntok.create_model(f"dynamicvit_{backbone}", keep_ratio=keep_ratio)
    dvt = dyntok.create_model(f"dvt_{backbone}")
    dvt.set_budget(thresholds=[0.0] * (len(dvt.grids) - 1))
    return {f"dynamicvit keep {keep_ratio}": dynamicvit, "dvt all exit at 1": dvt}


def measure(backbone: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per adaptive model, each timed interleaved with the dense backbone."""
    dense = dyntok.create_model(backbone).to(device).eval()
    channels, height, width = dense.input_size
    images = torch.randn(args.images, channels, height, width, device=device)
    rows = []
    for label, model in adaptive_models(backbone, args.keep_ratio).items():
        model = model.to(device).eval()
        predictors = {"dense": dense.predict, label: model.predict}
        throughput = measure_throughput(predictors, images, args.batch_size, args.repeats, device=device,
                                        progress=False)
        latency = measure_latency(predictors, images[:args.latency_images], args.repeats, device=device,
                                  progress=False)
        reduction = dense.dense_macs() / model.predict(images[:1]).macs.item()
        speedup = throughput[label].value / throughput["dense"].value
        rows.append({"backbone": backbone, "method": label, "dense_gmacs": dense.dense_macs() / 1e9,
                     "mac_reduction": reduction, "speedup": speedup, "realised": speedup / reduction,
                     "latency_speedup": latency["dense"].value / latency[label].value,
                     "dense_images_per_s": throughput["dense"].value})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+",
                        default=["vit_cifar_micro", "vit_cifar_tiny", "vit_cifar_small", "vit_cifar_base"])
    parser.add_argument("--keep-ratio", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--latency-images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = select_device(args.device)
    rows = [row for backbone in args.backbones for row in measure(backbone, args, device)]
    print(f"{'backbone':<24}{'method':<22}{'GMACs':>8}{'MAC red.':>10}{'speed-up':>10}{'realised':>10}{'b=1':>8}")
    for row in rows:
        print(f"{row['backbone']:<24}{row['method']:<22}{row['dense_gmacs']:>8.4f}{row['mac_reduction']:>9.2f}x"
              f"{row['speedup']:>9.2f}x{row['realised']:>10.2f}{row['latency_speedup']:>7.2f}x")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
