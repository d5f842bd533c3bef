"""Run a benchmark: train every entry once, evaluate each budget point, time it against the dense model.

The runner only talks to models through the method contract (``calibrate``, ``budget_sweep``,
``set_budget``, ``predict``, ``dense_macs``); what differs between entries is in the spec, never in code.
Training and evaluation are cached (see :mod:`.cache`); speed is measured afresh on every run, each budget
point interleaved with the reference model in this process, on real test images (docs/measurement.md).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator

import timm
import torch
from ..progress import progress_bar

from .._versions import __version__
from ..data import build_loaders
from ..evaluation import evaluate
from ..measure.oracle import collect_exit_correctness, oracle_curve
from ..measure.speed import compare_speed, first_images, inference_context, precision
from ..methods import AdaptiveViT, create_model, load_model, save_model
from ..methods.budget import format_knobs
from ..pretrained import model_card
from ..report import render_report
from ..report.gallery import entry_gallery
from ..report.leaderboard import derived_metrics
from ..training import distributed
from ..training.trainer import train
from .cache import EntryCache
from .plan import EntryPlan, Plan, entry_caches, make_plan, select_entries, sweep_key, train_config
from .spec import TRAIN_FIELDS, BenchSpec, Entry

__all__ = ["run_benchmark", "prepare", "RESULTS_FORMAT"]

log = logging.getLogger(__name__)

RESULTS_FORMAT = "dyntok-bench/1"


# ------------------------------------------------------------------------------------------ progress
class StageBar:
    """One progress bar over the whole run; each stage advances it by its estimated seconds.

    tqdm's remaining-time estimate then scales the plan's estimates by how fast the run really goes.
    """

    def __init__(self, total_seconds: float, enabled: bool) -> None:
        self.bar = progress_bar(total=max(total_seconds, 1.0), disable=not enabled, desc="bench",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    @contextlib.contextmanager
    def stage(self, label: str, seconds: float) -> Iterator[None]:
        self.bar.set_description_str(label)
        self.bar.refresh()
        yield
        self.bar.update(min(seconds, self.bar.total - self.bar.n))

    def finish(self) -> None:
        """Fill the bar: the estimates never add up exactly to what ran."""
        self.bar.set_description_str("done")
        self.bar.update(self.bar.total - self.bar.n)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------ stages
def _train_entry(spec: BenchSpec, plan: Plan, item: EntryPlan, progress: bool) -> None:
    entry = item.entry
    if entry.pretrained:
        _take_shipped(entry, item.cache)
        return
    init = plan.entry(entry.init).cache.model_path if entry.init else None
    device = plan.device
    config = train_config(spec, entry, item.cache.folder, init, device=str(device), progress=progress)
    started = time.perf_counter()
    result = train(config)
    item.cache.mark_done({"entry": entry.name, "model": entry.model, "train_seconds": time.perf_counter() - started,
                          "metrics": result.metrics})


def _take_shipped(entry: Entry, cache: EntryCache) -> None:
    """A ``pretrained`` entry is the file dyntok ships for its model, evaluated as it is: nothing is trained."""
    save_model(create_model(entry.model, pretrained=True), cache.model_path)
    cache.mark_done({"entry": entry.name, "model": entry.model, "train_seconds": 0.0, "metrics": None})


def _jsonable(knobs: dict[str, Any]) -> dict[str, Any]:
    """Knobs as plain JSON values (tensors to lists), exactly as they read back from a cache file."""
    def plain(value: Any) -> Any:
        return value.tolist() if isinstance(value, torch.Tensor) else value
    return json.loads(json.dumps({key: plain(value) for key, value in knobs.items()}))


def resolve_points(entry: Entry, model: AdaptiveViT, holdout, cache: EntryCache) -> list[dict[str, Any]]:
    """The entry's budget points as ``{"label", "knobs"}``, calibrating on the held-out split where asked."""
    key = sweep_key(entry)
    cached = cache.load_points(key)
    if cached is not None:
        return cached
    needs_holdout = entry.calibrate is not None or any(p.calibrate is not None for p in entry.budgets or ())
    if needs_holdout and holdout is None:
        raise ValueError(f"entry {entry.name!r} calibrates on the held-out split, but data.holdout_size is 0")
    # A sweep may be derived from the held-out data (DVT's thresholds), so calibrate before asking for it;
    # for methods whose knobs are set directly, calibrate() changes nothing.
    if entry.calibrate is not None or (entry.budgets is None and holdout is not None):
        model.calibrate(holdout, **(entry.calibrate or {}))
    if entry.budgets is None:
        points = [{"label": format_knobs(knobs), "knobs": _jsonable(knobs)} for knobs in model.budget_sweep()]
    else:
        points = []
        for point in entry.budgets:
            knobs = model.calibrate(holdout, **point.calibrate) if point.calibrate is not None else point.knobs
            points.append({"label": point.label, "knobs": _jsonable(knobs)})
    for point in points:
        try:
            model.set_budget(**point["knobs"])
        except ValueError as error:
            raise ValueError(f"entry {entry.name!r}, budget point {point['label']}: {error}") from None
    cache.save_points(key, points)
    return points


def _evaluate_point(model: AdaptiveViT, knobs: dict[str, Any], loader, cache: EntryCache,
                    device: torch.device) -> dict[str, Any]:
    model.set_budget(**knobs)
    record = cache.load_eval(knobs)
    if record is None:
        result = evaluate(model, loader, device, progress=False)
        extras = {key: value.double().mean().item() for key, value in result.extras.items()
                  if value.ndim == 1 and not value.is_complex()}
        record = {**result.summary(), "extras_mean": extras}
        if "exit_stage" in result.extras:
            record["exit_shares"] = _exit_shares(result.extras["exit_stage"])
        cache.save_eval(knobs, record)
    return {key: value for key, value in record.items() if key != "knobs"}


def anytime_accuracy(model: AdaptiveViT, loader, cache: EntryCache, device: torch.device) -> dict[str, Any]:
    """Test top-1 of every exit when every image runs to it (one value for single-exit models) and, where an
    image can be routed straight to an exit (``model.exit_macs()``), the oracle curve: the best routing that
    knows the labels, next to which the method's own routing is plotted."""
    cached = cache.load_anytime()
    if cached is not None and "oracle" in cached:
        return cached
    with inference_context(device):
        correct = collect_exit_correctness(model, loader, device)
    exit_macs = model.exit_macs()
    record = {"exit_top1": correct.double().mean(dim=0).tolist(),
              "oracle": oracle_curve(correct, exit_macs) if exit_macs is not None and len(exit_macs) > 1 else None}
    cache.save_anytime(record)
    return record


def _exit_shares(exit_stage: torch.Tensor) -> list[float]:
    """The share of images that left at each exit."""
    counts = torch.bincount(exit_stage.long())
    return (counts.double() / counts.sum()).tolist()


def _measure_speed(reference: AdaptiveViT, model: AdaptiveViT | None, images: torch.Tensor, spec: BenchSpec,
                   device: torch.device) -> dict[str, float]:
    """Throughput and batch-1 latency of ``model`` and the reference, interleaved (reference alone if None)."""
    settings = spec.speed
    # The run's one progress bar already names this stage; no nested bars.
    return compare_speed(reference.predict, None if model is None else model.predict, images, settings.batch_size,
                         settings.latency_images, settings.repeats, settings.warmup, device)


# ------------------------------------------------------------------------------------------ environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Package versions and the machine, so a number can be traced to where it was measured."""
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "dyntok": __version__, "platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


# ------------------------------------------------------------------------------------------ the run
def prepare(spec: BenchSpec, output: str | Path, only: list[str] | tuple[str, ...] = (),
            cache_dir: str | Path | None = None) -> tuple[Plan, dict[str, Any]]:
    """Load the data, find what is cached and estimate the rest (what ``--dry-run`` shows); returns the plan
    and the data loaders."""
    entries = select_entries(spec, only)
    device = distributed.select_device(spec.device)
    loaders = build_loaders(spec.data)
    # Cache folders are content-addressed, so several specs can share one (an ablation reusing a run's models).
    caches = entry_caches(spec, entries, Path(cache_dir) if cache_dir else Path(output) / "cache")
    return make_plan(spec, entries, caches, loaders, device), loaders


def run_benchmark(spec: BenchSpec, output: str | Path, only: list[str] | tuple[str, ...] = (),
                  progress: bool = True, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Run (or finish) the benchmark; write ``results.json`` and the report into ``output``; return the results."""
    output = Path(output)
    started = datetime.datetime.now(datetime.timezone.utc)
    plan, loaders = prepare(spec, output, only, cache_dir)
    device = plan.device
    bar = StageBar(plan.seconds, progress)
    try:
        for item in plan.entries:
            if item.status != "cached":
                with bar.stage(f"train {item.entry.name}", item.train_seconds):
                    _train_entry(spec, plan, item, progress)
        records = _measure_entries(spec, plan, loaders, bar, output)
        bar.finish()
    finally:
        bar.close()
    results = {
        "format": RESULTS_FORMAT,
        "spec": spec.to_dict(),
        "dataset": _dataset_record(spec, loaders),
        "backbone": spec.backbone,
        "reference": spec.reference,
        "speed": {**spec.to_dict()["speed"], "device": str(device),
                  "dtype": precision(device)},
        "environment": environment(device),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "entries": records,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    render_report(output)
    return results


def _dataset_record(spec: BenchSpec, loaders: dict[str, Any]) -> dict[str, Any]:
    holdout = loaders["holdout"]
    return {"name": Path(spec.data.dataset).name, "source": loaders["source"], "num_classes": loaders["num_classes"],
            "train_images": len(loaders["train"].dataset), "holdout_images": len(holdout.dataset) if holdout else 0,
            "test_images": len(loaders["test"].dataset)}


def _measure_entries(spec: BenchSpec, plan: Plan, loaders: dict[str, Any], bar: StageBar,
                     output: Path) -> list[dict[str, Any]]:
    device = plan.device
    reference = load_model(plan.entry(spec.reference).cache.model_path, map_location=device).eval()
    images = first_images(loaders["test"], spec.speed.images)
    records = []
    for item in plan.entries:
        entry = item.entry
        model = load_model(item.cache.model_path, map_location=device).eval()
        with bar.stage(f"calibrate {entry.name}" if item.calibrate_seconds else f"load {entry.name}",
                       item.calibrate_seconds), inference_context(device):
            # Thresholds are fitted in the arithmetic the model is then evaluated and timed in.
            points = resolve_points(entry, model, loaders["holdout"], item.cache)
        with bar.stage(f"anytime accuracy {entry.name}", 0):
            anytime = anytime_accuracy(model, loaders["test"], item.cache, device)
        candidate = None if entry.name == spec.reference else model  # the reference is timed on its own
        measured = []
        for point in points:
            with bar.stage(f"eval {entry.name} {point['label']}", item.point_seconds):
                accuracy = _evaluate_point(model, point["knobs"], loaders["test"], item.cache, device)
                speed = _measure_speed(reference, candidate, images, spec, device)
            measured.append({**point, **accuracy, **speed})
        with bar.stage(f"gallery {entry.name}", 0):
            gallery = entry_gallery(model, measured, loaders["test"], output, entry.name)
        records.append({**_entry_record(spec, entry, item.cache, model, measured), **anytime, "gallery": gallery})
    reference_gmacs = next(r for r in records if r["name"] == spec.reference)["points"][0]["mean_gmacs"]
    for record in records:
        for point in record["points"]:
            point.update(derived_metrics(point, reference_gmacs))
    return records


def _entry_record(spec: BenchSpec, entry: Entry, cache: EntryCache, model: AdaptiveViT,
                  points: list[dict[str, Any]]) -> dict[str, Any]:
    done = cache.done_record() or {}
    # A model without budget knobs spends the same on every image: a static baseline.
    kind = "reference" if entry.name == spec.reference else "adaptive" if model.get_budget() else "static"
    config = train_config(spec, entry).to_dict()
    return {"name": entry.name, "model": entry.model, "method": entry.method, "kind": kind, "init": entry.init,
            "model_kwargs": entry.model_kwargs, "train": {key: config[key] for key in TRAIN_FIELDS},
            "key": cache.key, "cache": cache.folder.name,  # its name in --cache-dir: no path of this machine
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "dense_gmacs": model.dense_macs() / 1e9,
            "train_seconds": done.get("train_seconds"), "train_metrics": done.get("metrics"), "points": points,
            "pretrained": _shipped_reference(entry) if entry.pretrained else None}


def _shipped_reference(entry: Entry) -> dict[str, Any]:
    """How the shipped weights an entry starts from were made (from their model card)."""
    card = model_card(entry.model)
    return {"test_top1": card.get("test_top1"), "epochs": card.get("epochs"), "command": card.get("command"),
            "train_seconds": card.get("train_seconds"), "versions": card.get("versions")}
