"""The leaderboard: one row per (entry, budget point), as a markdown table.

Columns (docs/benchmark.md, "Reading the leaderboard"):

* top-1 on the test split, marked ``*`` when the point is on the accuracy-vs-GMACs Pareto front;
* mean GMACs per image, as executed;
* MAC reduction = reference GMACs / GMACs;
* speed-up = measured throughput / the reference's throughput, measured interleaved in the same process;
* realised = speed-up / MAC reduction (docs/measurement.md): 1.0 means every MAC saved became time saved;
* b=1 speed-up = the reference's batch-1 latency / this latency (where small extra kernels hurt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["Row", "derived_metrics", "pareto_front", "leaderboard_rows", "render_table", "render_leaderboard",
           "describe_setup"]


def derived_metrics(point: dict[str, Any], reference_gmacs: float) -> dict[str, float | None]:
    """MAC reduction against the reference, and the realised share of it (needs a measured speed-up)."""
    reduction = reference_gmacs / point["mean_gmacs"]
    speedup = point.get("speedup")
    return {"mac_reduction": reduction, "realised_speedup": None if speedup is None else speedup / reduction}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For ``(cost, accuracy)`` pairs, whether each is on the front: no other point is at most as costly and at
    least as accurate while strictly better in one of the two."""
    def dominated(cost: float, accuracy: float) -> bool:
        return any(other_cost <= cost and other_accuracy >= accuracy
                   and (other_cost < cost or other_accuracy > accuracy)
                   for other_cost, other_accuracy in points)
    return [not dominated(cost, accuracy) for cost, accuracy in points]


@dataclass
class Row:
    entry: str
    kind: str  # "reference", "static" or "adaptive"
    knob: str
    top1: float  # percent
    gmacs: float
    mac_reduction: float
    speedup: float | None
    realised: float | None
    latency_speedup: float | None
    pareto: bool


def leaderboard_rows(results: dict[str, Any]) -> list[Row]:
    """Every measured point, entries in spec order, each entry's points from most to least compute."""
    reference = _reference_gmacs(results)
    flat = [(entry, point) for entry in results["entries"]
            for point in sorted(entry["points"], key=lambda p: -p["mean_gmacs"])]
    front = pareto_front([(point["mean_gmacs"], point["top1"]) for _, point in flat])
    rows = []
    for (entry, point), on_front in zip(flat, front):
        derived = derived_metrics(point, reference)
        rows.append(Row(entry=entry["name"], kind=entry.get("kind", "adaptive"), knob=point.get("label", "default"),
                        top1=100 * point["top1"], gmacs=point["mean_gmacs"], mac_reduction=derived["mac_reduction"],
                        speedup=point.get("speedup"), realised=derived["realised_speedup"],
                        latency_speedup=point.get("latency_speedup"), pareto=on_front))
    return rows


def _reference_gmacs(results: dict[str, Any]) -> float:
    for entry in results["entries"]:
        if entry["name"] == results["reference"]:
            return entry["points"][0]["mean_gmacs"]
    raise ValueError(f"results have no entry for the reference {results['reference']!r}")


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def render_table(rows: list[Row]) -> str:
    """The markdown table of ``rows``."""
    lines = ["| entry | knob | top-1 (%) | GMACs | MAC reduction | speed-up | realised | b=1 speed-up |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        name = row.entry if row.kind == "adaptive" else f"{row.entry} ({row.kind})"
        realised = "n/a" if row.realised is None else f"{row.realised:.2f}"
        lines.append(f"| {name} | {row.knob} | {row.top1:.2f}{'*' if row.pareto else ''} | {row.gmacs:.4g} | "
                     f"{_times(row.mac_reduction)} | {_times(row.speedup)} | {realised} | "
                     f"{_times(row.latency_speedup)} |")
    return "\n".join(lines)


COLUMN_NOTES = (
    "`*`: on the Pareto front of accuracy vs GMACs. MAC reduction = reference GMACs / GMACs. "
    "Speed-up = measured throughput / the reference's, measured interleaved in the same process. "
    "Realised = speed-up / MAC reduction (1.00: every MAC saved became time saved). "
    "b=1 speed-up = the reference's batch-1 latency / this latency."
)


def describe_setup(results: dict[str, Any]) -> str:
    """One paragraph: data, backbone, machine, versions and speed settings."""
    env, speed, data = results.get("environment", {}), results.get("speed", {}), results.get("dataset", {})
    machine = env.get("gpu") or f"{env.get('cpu', 'unknown CPU')}, {env.get('cores', '?')} cores"
    return (f"{data.get('name', '?')} ({data.get('source', 'source unknown')}; {data.get('test_images', '?')} test "
            f"images), backbone {results.get('backbone', '?')}. Measured on {env.get('device', '?')} ({machine}) "
            f"with torch {env.get('torch', '?')}, timm {env.get('timm', '?')}, dyntok {env.get('dyntok', '?')}, "
            f"Python {env.get('python', '?')}. Speed: {speed.get('dtype', '?')}, batch {speed.get('batch_size', '?')}"
            f", {speed.get('images', '?')} test images, median of {speed.get('repeats', '?')} repetitions; "
            f"latency over {speed.get('latency_images', '?')} images at batch 1.")


def _training_table(results: dict[str, Any]) -> str:
    lines = ["| entry | model | starts from | epochs | lr | params (M) | train time |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for entry in results["entries"]:
        train = entry.get("train", {})
        seconds = entry.get("train_seconds")
        duration = "?" if seconds is None else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
        params = entry.get("params_m")
        start = "shipped weights" if entry.get("pretrained") else entry.get("init") or "scratch"
        lines.append(f"| {entry['name']} | `{entry.get('model', '?')}` {_kwargs(entry.get('model_kwargs'))}| "
                     f"{start} | {train.get('epochs', '?')} | {train.get('lr', '?')} | "
                     f"{'?' if params is None else f'{params:.2f}'} | {duration} |")
    shipped = [entry for entry in results["entries"] if entry.get("pretrained")]
    if shipped:
        lines += ["", "Entries on shipped weights were trained by `dyntok pretrain` (docs/pretrained.md) and are "
                      "evaluated here without training:"]
        for entry in shipped:
            card = entry["pretrained"]
            minutes = (card.get("train_seconds") or 0) / 60
            lines.append(f"- **{entry['name']}**: `{card.get('command')}` ({card.get('epochs')} epochs, "
                         f"{minutes:.0f} min, test top-1 {100 * (card.get('test_top1') or 0):.2f}% when made)")
    return "\n".join(lines)


def _kwargs(kwargs: dict[str, Any] | None) -> str:
    return "".join(f"{key}={value} " for key, value in (kwargs or {}).items())


def _anytime_table(results: dict[str, Any]) -> str | None:
    """Each exit's top-1 when every image runs to it, for entries with several exits (DVT's stages)."""
    entries = [entry for entry in results["entries"] if len(entry.get("exit_top1") or []) > 1]
    if not entries:
        return None
    width = max(len(entry["exit_top1"]) for entry in entries)
    lines = ["| entry | " + " | ".join(f"exit {k + 1}" for k in range(width)) + " |",
             "| --- |" + " ---: |" * width]
    for entry in entries:
        cells = [f"{100 * top1:.2f}" for top1 in entry["exit_top1"]] + [""] * (width - len(entry["exit_top1"]))
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Share of test images leaving at each exit (%), per budget point:", "",
              "| entry | knob | " + " | ".join(f"exit {k + 1}" for k in range(width)) + " |",
              "| --- | --- |" + " ---: |" * width]
    for entry in entries:
        for point in entry["points"]:
            shares = point.get("exit_shares") or []
            if not shares:  # routed straight to one exit (ReViT's lengths): no cascade to leave
                continue
            cells = [f"{100 * share:.1f}" for share in shares] + [""] * (width - len(shares))
            lines.append(f"| {entry['name']} | {point.get('label', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _oracle_table(results: dict[str, Any]) -> str | None:
    """The oracle curve of entries that route images to exits, beside the best the entry itself reached."""
    entries = [entry for entry in results["entries"] if entry.get("oracle")]
    if not entries:
        return None
    lines = ["| entry | oracle: mean GMACs -> top-1 (%) | the entry's own best: GMACs -> top-1 (%) |",
             "| --- | --- | --- |"]
    for entry in entries:
        curve = ", ".join(f"{p['mean_gmacs']:.4g} -> {100 * p['top1']:.2f}" for p in entry["oracle"])
        best = max(entry["points"], key=lambda point: (point["top1"], -point["mean_gmacs"]))
        lines.append(f"| {entry['name']} | {curve} | {best['mean_gmacs']:.4g} -> {100 * best['top1']:.2f} |")
    return "\n".join(lines)


def _gallery_links(results: dict[str, Any]) -> str | None:
    """One line per entry linking its pictures (written by the benchmark at one budget point)."""
    lines = []
    for entry in results["entries"]:
        gallery = entry.get("gallery")
        if gallery:
            links = " · ".join(f"[{name.replace('_', ' ')}]({path})" for name, path in gallery["figures"].items())
            lines.append(f"- **{entry['name']}** at {gallery['label']}: {links}")
    return "\n".join(lines) or None


def render_leaderboard(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The whole ``leaderboard.md``: setup, leaderboard, training summary and plots."""
    spec = results.get("spec", {})
    parts = [f"# Benchmark `{spec.get('name', '?')}`: {results.get('dataset', {}).get('name', '?')}, "
             f"{results.get('backbone', '?')}", "", describe_setup(results), "",
             render_table(leaderboard_rows(results)), "", COLUMN_NOTES, "", "## Training", "",
             _training_table(results)]
    anytime = _anytime_table(results)
    if anytime:
        parts += ["", "## Anytime accuracy", "", "Top-1 (%) of each exit when every test image runs to it.", "",
                  anytime]
    oracle = _oracle_table(results)
    if oracle:
        parts += ["", "## Oracle routing", "",
                  "The same exits when the router knows the labels: every image goes to the cheapest exit that gets "
                  "it right, the images cheapest to fix first (test labels used on purpose: an upper bound, not a "
                  "result). The gap to the entry's own curve is what its router costs.", "", oracle]


    gallery = _gallery_links(results)
    if gallery:
        parts += ["", "## Gallery", "", "What each entry did with a few test images, at its middle budget point: "
                  "kept or merged patches, exits, token lengths, and GMACs per image and per class.", "", gallery]
    for plot in plots:
        parts += ["", f"![{plot.rsplit('.', 1)[0].replace('_', ' ')}]({plot})"]
    return "\n".join(parts) + "\n"
