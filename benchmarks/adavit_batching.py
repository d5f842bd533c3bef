"""How AdaViT's inference should batch attention over images that made different decisions.

Times ``AdaViT.predict`` at batch 64 on CPU with each strategy of ``ATTENTION_BATCHING`` against the dense
model, interleaved in one process (docs/measurement.md), on randomly initialised CIFAR presets whose fresh
decision modules use about half of the patches, heads and sub-blocks. Prints, per preset and strategy, the
median time relative to dense, the mean GMACs charged (padding included) and the realised speed-up.

    OMP_NUM_THREADS=2 nice python benchmarks/adavit_batching.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import dyntok
from dyntok.methods.adavit import ATTENTION_BATCHING


def median_seconds(fn, images: torch.Tensor, repeats: int) -> float:
    fn(images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(preset: str, batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    dense = dyntok.create_model(preset).eval()
    model = dyntok.create_model(f"adavit_{preset}").eval()
    model.init_from_dense(dense.state_dict())
    images = torch.randn(batch, *model.input_size)
    dense_macs = dense.dense_macs()
    print(f"\n{preset}: dense {dense_macs / 1e9:.4f} GMACs/image, batch {batch}")
    print(f"{'strategy':<10} {'time/dense':>10} {'GMACs':>8} {'MAC cut':>8} {'realised':>8}")
    for strategy in ATTENTION_BATCHING:
        model.attention_batching = strategy
        dense_time = median_seconds(dense.predict, images, repeats)
        method_time = median_seconds(model.predict, images, repeats)
        macs = model.predict(images).macs.mean().item()
        speedup, cut = dense_time / method_time, dense_macs / macs
        print(f"{strategy:<10} {method_time / dense_time:>10.2f} {macs / 1e9:>8.4f} {cut:>7.2f}x "
              f"{speedup / cut:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["vit_cifar_micro", "vit_cifar_tiny"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with torch.inference_mode():
        for preset in args.presets:
            measure(preset, args.batch, args.repeats)


if __name__ == "__main__":
    main()
