"""The benchmark's two plots: accuracy vs GMACs and accuracy vs measured speed-up.

Figures are drawn on matplotlib's ``Figure`` directly (Agg canvas, no pyplot), so rendering works headless
and never changes a user's global backend. Every entry gets its own colour: adaptive entries are curves over
their budget points, static baselines hollow markers, the dense reference a black star; the Pareto front over
all points is a dashed line with its points ringed. Entries that route images to exits also get their oracle
curve (dotted) on the compute plot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from matplotlib.figure import Figure

from .leaderboard import pareto_front

__all__ = ["plot_accuracy_vs_gmacs", "plot_accuracy_vs_throughput"]

_STATIC_MARKERS = ("s", "D", "^", "v", "P", "X", "h")
_ADAPTIVE_MARKERS = ("o", "^", "s", "D", "v", "P", "X")


def _title(results: dict[str, Any], what: str) -> str:
    return f"{results.get('dataset', {}).get('name', '?')} · {results.get('backbone', '?')}: {what}"


def _draw(results: dict[str, Any], x_of: Callable[[dict[str, Any]], float], cost_of: Callable[[float], float],
          xlabel: str, title: str, path: Path, oracles: bool = False) -> Path:
    """Scatter every entry's points at ``x_of(point)`` vs top-1; the front minimises ``cost_of(x)``.

    ``oracles``: also draw, dotted in the entry's colour, the oracle curve of entries that route images to
    exits (what the same exits give when the router knows the labels; never part of the front)."""
    figure = Figure(figsize=(7.5, 5.0), dpi=150, layout="constrained")
    axes = figure.add_subplot()
    colours = iter(f"C{index}" for index in range(100))
    static_markers, adaptive_markers = iter(_STATIC_MARKERS * 10), iter(_ADAPTIVE_MARKERS * 10)
    everything = []
    for entry in results["entries"]:
        points = sorted(entry["points"], key=lambda point: point["mean_gmacs"])  # a curve follows its budget
        xs, ys = [x_of(p) for p in points], [100 * p["top1"] for p in points]
        everything += zip(xs, ys)
        kind = entry.get("kind", "adaptive")
        if kind == "reference":
            axes.scatter(xs, ys, marker="*", s=260, color="black", zorder=4, label=f"{entry['name']} (reference)")
        elif kind == "static":
            axes.scatter(xs, ys, marker=next(static_markers), s=70, facecolors="none", linewidths=1.8,
                         edgecolors=next(colours), zorder=3, label=f"{entry['name']} (static)")
        else:
            colour = next(colours)
            axes.plot(xs, ys, marker=next(adaptive_markers), markersize=5, linewidth=1.5, color=colour,
                      zorder=3, label=entry["name"])
            if oracles and entry.get("oracle"):
                oracle = entry["oracle"]
                axes.plot([x_of(p) for p in oracle], [100 * p["top1"] for p in oracle], linestyle=":", linewidth=1.5,
                          color=colour, zorder=2, label=f"{entry['name']} oracle (labels known)")
    front = sorted(point for point, on in zip(everything, pareto_front([(cost_of(x), y) for x, y in everything]))
                   if on)
    if front:
        axes.plot(*zip(*front), linestyle="--", color="0.45", linewidth=1, zorder=2, label="Pareto front")
        axes.scatter(*zip(*front), s=190, facecolors="none", edgecolors="0.45", linewidths=1, zorder=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("top-1 accuracy on the test split (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_accuracy_vs_gmacs(results: dict[str, Any], path: str | Path) -> Path:
    """Top-1 against mean executed GMACs per image; the front keeps the cheapest point per accuracy."""
    return _draw(results, lambda point: point["mean_gmacs"], lambda gmacs: gmacs,
                 "mean GMACs per image (executed multiply-accumulates, 1e9)",
                 _title(results, "accuracy vs compute"), Path(path), oracles=True)


def plot_accuracy_vs_throughput(results: dict[str, Any], path: str | Path) -> Path:
    """Top-1 against measured throughput relative to the reference (the protocol reports speed as a ratio)."""
    speed = results.get("speed", {})
    reference = next((e for e in results["entries"] if e["name"] == results.get("reference")), None)
    absolute = ""
    if reference and reference["points"][0].get("throughput"):
        absolute = f"; reference {reference['points'][0]['throughput']:.0f} images/s"
    xlabel = (f"measured throughput relative to the reference (x)\n{speed.get('dtype', '?')}, batch "
              f"{speed.get('batch_size', '?')} on {speed.get('device', '?')}{absolute}")
    measured = {**results, "entries": [{**entry, "points": [p for p in entry["points"] if p.get("speedup")]}
                                       for entry in results["entries"]]}
    measured["entries"] = [entry for entry in measured["entries"] if entry["points"]]
    return _draw(measured, lambda point: point["speedup"], lambda speedup: -speedup, xlabel,
                 _title(results, "accuracy vs measured throughput"), Path(path))
