"""Held-out top-1 against training epochs for every shipped method, from the model cards (no training).

    python benchmarks/training_curves.py                  # writes reports/training_curves/{README.md,curves.png}

Where a shipped method misses its paper's target, this tells "needs more training" (still rising at the last
epoch) from "does not work at this scale" (flat).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dyntok import pretrained
from dyntok.methods.registry import split_model_name
from dyntok.report.curves import curves_table, epoch_curve, plot_training_curves


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="reports/training_curves")
    args = parser.parse_args(argv)
    shipped = pretrained.shipped_presets()
    cards = {name: pretrained.model_card(name) for name in shipped if split_model_name(name)[0] != "dense"}
    backbones = {split_model_name(name)[1] for name in cards}
    reference = None
    if len(backbones) == 1 and (backbone := backbones.pop()) in shipped:
        reference = (f"{backbone} (the reference)", epoch_curve(pretrained.model_card(backbone))[-1][1])
    out = Path(args.output)
    plot_training_curves(cards, out / "curves.png", reference)
    lines = ["# Shipped methods: held-out top-1 during training", "",
             "Read from each shipped file's model card (`dyntok pretrain` logs the held-out split after every "
             "epoch, at the budget the model is saved with). `python benchmarks/training_curves.py` regenerates "
             "this page.", ""]
    if reference:
        lines += [f"The reference {reference[0].split()[0]}: {reference[1]:.2f}% held-out at the end of its own "
                  f"training.", ""]
    lines += curves_table(cards) + ["", "![held-out top-1 against epochs](curves.png)", ""]
    (out / "README.md").write_text("\n".join(lines))
    print(f"wrote {out / 'README.md'} and {out / 'curves.png'}")
    return out


if __name__ == "__main__":
    main()
