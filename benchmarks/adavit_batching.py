"""How AdaViT's inference should batch attention over images that made different decisions.

Times ``AdaViT.predict`` at batch 64 on CPU with each strategy of ``ATTENTION_BATCHING`` against the dense
model, interleaved in one process (docs/measurement.md), on randomly initialised CIFAR presets whose fresh
decision modules use about half of the patches, heads and sub-blocks. Prints, per preset and strategy, the
median (and fastest) time relative to dense, the mean GMACs charged (padding included) and the realised
speed-up (from the medians).

    nice python benchmarks/adavit_batching.py --repeats 7 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import dyntok
from dyntok.methods.adavit import ATTENTION_BATCHING


def seconds(fn, images: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(images)
    return time.perf_counter() - start


def measure(preset: str, batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    dense = dyntok.create_model(preset).eval()
    model = dyntok.create_model(f"adavit_{preset}").eval()
    model.init_from_dense(dense.state_dict())
    images = torch.randn(batch, *model.input_size)

    def with_batching(strategy: str):
        def run(x: torch.Tensor):
            model.attention_batching = strategy
            return model.predict(x)
        return run

    candidates = {"dense": dense.predict, **{strategy: with_batching(strategy) for strategy in ATTENTION_BATCHING}}
    times = {name: [] for name in candidates}
    for name, fn in candidates.items():  # warm-up
        fn(images)
    for _ in range(repeats):  # interleaved, so that load on a shared machine hits every candidate alike
        for name, fn in candidates.items():
            times[name].append(seconds(fn, images))
    dense_macs = dense.dense_macs()
    print(f"\n{preset}: dense {dense_macs / 1e9:.4f} GMACs/image, batch {batch}, {repeats} interleaved repeats")
    print(f"{'strategy':<10} {'time/dense (median)':>20} {'(min)':>6} {'GMACs':>8} {'MAC cut':>8} {'realised':>9}")
    for strategy in ATTENTION_BATCHING:
        median = statistics.median(times[strategy]) / statistics.median(times["dense"])
        fastest = min(times[strategy]) / min(times["dense"])
        macs = candidates[strategy](images).macs.mean().item()
        cut = dense_macs / macs
        realised = 1 / median / cut
        print(f"{strategy:<10} {median:>20.2f} {fastest:>6.2f} {macs / 1e9:>8.4f} {cut:>7.2f}x {realised:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["vit_cifar_micro", "vit_cifar_tiny"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        for preset in args.presets:
            measure(preset, args.batch, args.repeats)


if __name__ == "__main__":
    main()
