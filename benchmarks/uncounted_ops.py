"""What the MAC counts leave out: norms, softmax, GELU and interpolation as a share of the counted MACs.

    python benchmarks/uncounted_ops.py [--backbone vit_cifar_micro]

One image through each method's ``predict`` (DVT running all three stages, DynamicViT at keep ratio 0.7);
prints a markdown table for docs/measurement.md. Costs per element are those of
``dyntok.measure.macs.UNCOUNTED_OP_COSTS``.
"""
from __future__ import annotations

import argparse

import torch

import dyntok
from dyntok.measure.macs import UNCOUNTED_OP_COSTS, count_uncounted_ops

#: (label, method, budget): every DVT stage runs when no threshold lets an image leave.
MODELS = (("dense", "dense", {}), ("DynamicViT, keep 0.7", "dynamicvit", {"keep_ratio": 0.7}),
          ("DVT, all 3 stages", "dvt", {"thresholds": [2.0, 2.0]}))


def shares(backbone: str) -> list[tuple[str, float, dict[str, float]]]:
    rows = []
    for label, method, budget in MODELS:
        torch.manual_seed(0)
        model = dyntok.create_model(backbone if method == "dense" else f"{method}_{backbone}").eval()
        model.set_budget(**budget)
        images = torch.randn(1, *model.input_size)
        with torch.no_grad():
            macs = model.predict(images).macs.item()
            uncounted = count_uncounted_ops(model.predict, images)
        rows.append((label, macs, {kind: ops / macs for kind, ops in uncounted.items()}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_cifar_micro")
    backbone = parser.parse_args().backbone
    kinds = list(UNCOUNTED_OP_COSTS)
    print(f"| {backbone} | counted MACs | " + " | ".join(kinds) + " | all four |")
    print("| --- | --- |" + " --- |" * (len(kinds) + 1))
    for label, macs, share in shares(backbone):
        cells = " | ".join(f"{share[kind]:.2%}" for kind in kinds)
        print(f"| {label} | {macs / 1e6:.2f} M | {cells} | {sum(share.values()):.2%} |")


if __name__ == "__main__":
    main()
