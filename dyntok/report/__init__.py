"""Benchmark reports: the leaderboard, the plots and the README's results table, all from ``results.json``.

``render_report(folder)`` (``dyntok report DIR``) re-renders everything from the folder's ``results.json``,
so a report can be regenerated, or restyled, without measuring anything again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .leaderboard import leaderboard_rows, pareto_front, render_leaderboard, render_table
from .plots import plot_accuracy_vs_gmacs, plot_accuracy_vs_throughput
from .readme import update_readme

__all__ = ["load_results", "render_report", "leaderboard_rows", "pareto_front", "render_leaderboard",
           "render_table", "plot_accuracy_vs_gmacs", "plot_accuracy_vs_throughput", "update_readme"]

GMACS_PLOT = "accuracy_vs_gmacs.png"
SPEED_PLOT = "accuracy_vs_throughput.png"


def load_results(path: str | Path) -> dict[str, Any]:
    """``results.json`` from a report folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json at {path}; run `dyntok bench` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def render_report(folder: str | Path) -> list[Path]:
    """Write ``leaderboard.md`` and both plots into ``folder`` from its ``results.json``; return the paths."""
    folder = Path(folder)
    results = load_results(folder)
    plots = [plot_accuracy_vs_gmacs(results, folder / GMACS_PLOT)]
    if any(point.get("speedup") for entry in results["entries"] for point in entry["points"]):
        plots.append(plot_accuracy_vs_throughput(results, folder / SPEED_PLOT))
    leaderboard = folder / "leaderboard.md"
    leaderboard.write_text(render_leaderboard(results, [plot.name for plot in plots]))
    return [leaderboard, *plots]
