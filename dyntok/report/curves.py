"""Held-out top-1 against training epochs, read from the model cards of shipped weights.

A method that misses its paper's accuracy after a short schedule may need more training or may not work at
this scale; the per-epoch log in each card (``dyntok pretrain`` writes it) tells which: a curve still rising
at its last epoch asks for more epochs, a flat one does not. Drawn on matplotlib's ``Figure`` directly (Agg
canvas, no pyplot), like the benchmark plots.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

__all__ = ["epoch_curve", "plot_training_curves", "curves_table"]


def epoch_curve(card: dict[str, Any]) -> list[tuple[float, float]]:
    """(epochs trained, held-out top-1 %) after each logged epoch of a card, over all training phases.

    Phases restart their epoch count and may end mid-epoch, so the x axis is the step count over the run
    divided by the steps of one whole epoch: the largest step gain between two records (or the first one)."""
    log = [record for record in card.get("log", []) if "holdout_top1" in record]
    if not log:
        return []
    steps = [record["step"] for record in log]
    per_epoch = max([steps[0]] + [later - earlier for earlier, later in zip(steps, steps[1:])])
    return [(record["step"] / per_epoch, 100 * record["holdout_top1"]) for record in log]


def plot_training_curves(cards: dict[str, dict[str, Any]], path: str | Path,
                         reference: tuple[str, float] | None = None) -> Path:
    """One curve per card (name -> card); ``reference`` (label, held-out top-1 %) as a horizontal line."""
    figure = Figure(figsize=(7.5, 4.5), dpi=150, layout="constrained")
    axes = figure.add_subplot()
    for index, (name, card) in enumerate(cards.items()):
        curve = epoch_curve(card)
        if curve:
            axes.plot(*zip(*curve), marker="o", markersize=3, color=f"C{index}", label=name)
    if reference is not None:
        axes.axhline(reference[1], color="black", linestyle="--", linewidth=1, label=reference[0])
    axes.set_xlabel("epochs of training from the reference")
    axes.set_ylabel("held-out top-1 (%)")
    axes.set_title("Shipped methods: held-out accuracy during training")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def curves_table(cards: dict[str, dict[str, Any]], epochs: Sequence[int] = (1, 2, 4, 6, 8, 10)) -> list[str]:
    """Markdown rows: each card's held-out top-1 at the logged epoch nearest each of ``epochs``, and the gain
    of its last two epochs (still rising, or flat)."""
    lines = ["| model | " + " | ".join(f"epoch {epoch}" for epoch in epochs) + " | last 2 epochs |",
             "| --- |" + " ---: |" * (len(epochs) + 1)]
    for name, card in cards.items():
        curve = epoch_curve(card)
        if not curve:
            continue
        cells = []
        for epoch in epochs:
            x, top1 = min(curve, key=lambda point: abs(point[0] - epoch))
            cells.append(f"{top1:.2f}" if abs(x - epoch) <= 0.5 else "")
        recent = [top1 for x, top1 in curve if x >= curve[-1][0] - 2 - 1e-9]
        cells.append(f"{recent[-1] - recent[0]:+.2f}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines
