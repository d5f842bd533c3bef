"""What a benchmark run will do, and roughly how long it will take on this machine.

The plan lists, for each entry, whether its weights are cached, half-trained (resumed) or still to train,
how many budget points it has and an estimate of its training and evaluation time. Estimates come from a
short probe: two training steps and two inference passes of each model on a real batch, scaled by the steps
per epoch and the images each stage handles. They weight the stages of the overall progress bar and are
what ``dyntok bench --dry-run`` prints.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import file_sha256
from ..measure.speed import inference_context, synchronize
from ..methods import AdaptiveViT, create_model
from ..pretrained import resolve_weights
from ..training.trainer import PRETRAINED_INIT, TrainConfig
from .cache import EntryCache, digest, training_key
from .spec import BenchSpec, Entry

__all__ = ["EntryPlan", "Plan", "select_entries", "entry_caches", "train_config", "sweep_key", "make_plan",
           "format_duration"]


def train_config(spec: BenchSpec, entry: Entry, output_dir: str | Path = "", init: str | Path | None = None,
                 device: str = "auto", progress: bool = True) -> TrainConfig:
    """The trainer's config for ``entry``: resumable, so an interrupted entry continues where it stopped."""
    if entry.pretrained:
        # The runner takes shipped files as they are and never trains them; this init only names where the
        # weights come from in the entry's cache key (kept, so existing caches stay valid).
        init = PRETRAINED_INIT
    return TrainConfig(model=entry.model, model_kwargs=dict(entry.model_kwargs), data=spec.data,
                       output_dir=str(output_dir), init=None if init is None else str(init), device=device,
                       resume=True, progress=progress, **entry.train)


def select_entries(spec: BenchSpec, only: list[str] | tuple[str, ...] = ()) -> list[Entry]:
    """The entries to run: all of them, or those in ``only`` plus what they need.

    An entry needs the entry it starts from (recursively) and the reference every speed is measured against.
    """
    if not only:
        return list(spec.entries)
    known = {entry.name: entry for entry in spec.entries}
    wanted = set()
    for name in only:
        if name not in known:
            raise ValueError(f"--only {name!r}: no such entry; entries: {', '.join(known)}")
        while name is not None and name not in wanted:
            wanted.add(name)
            name = known[name].init
    wanted.add(spec.reference)
    return [entry for entry in spec.entries if entry.name in wanted]


def entry_caches(spec: BenchSpec, entries: list[Entry], root: str | Path) -> dict[str, EntryCache]:
    """Each entry's cache folder; an entry's key includes the key of the entry it starts from."""
    caches: dict[str, EntryCache] = {}
    for entry in entries:
        init_key = caches[entry.init].key if entry.init else None
        if entry.pretrained:  # new shipped weights are a new entry
            init_key = file_sha256(resolve_weights(entry.model))
        caches[entry.name] = EntryCache.at(root, entry.name, training_key(train_config(spec, entry), init_key))
    return caches


def sweep_key(entry: Entry) -> str:
    """What the resolved budget points of an entry depend on besides its weights."""
    budgets = None if entry.budgets is None else [point.to_dict() for point in entry.budgets]
    return digest({"budgets": budgets, "calibrate": entry.calibrate})


# ------------------------------------------------------------------------------------------ cost probe
@dataclass
class ModelCost:
    """Seconds per training step, per image at the evaluation batch size, and per image at batch 1."""

    train_step: float
    infer_image: float
    latency_image: float
    points: int


def _seconds(fn, device: torch.device, repeats: int = 2) -> float:
    """Best of ``repeats`` timed calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _default_point_count(model: AdaptiveViT, entry: Entry, images: torch.Tensor) -> int:
    """How many points the model's own sweep has (calibrating on one batch first, if the entry does)."""
    if entry.budgets is not None:
        return len(entry.budgets)
    model.calibrate([(images, torch.zeros(len(images), dtype=torch.long))], **(entry.calibrate or {}))
    return len(model.budget_sweep())


def probe_cost(spec: BenchSpec, entry: Entry, batch: tuple[torch.Tensor, torch.Tensor], num_classes: int,
               device: torch.device, train: bool) -> ModelCost:
    """Time a freshly built model of ``entry`` on a real batch (weights do not change the cost much)."""
    def build(entry: Entry) -> AdaptiveViT:
        # Like the trainer, take the number of classes from the data unless the entry sets it.
        return create_model(entry.model, **{"num_classes": num_classes, **entry.model_kwargs}).to(device)

    torch.manual_seed(0)
    model = build(entry)
    images, targets = batch[0].to(device), batch[1].to(device)
    train_step = 0.0
    if train:
        if entry.init and model.wants_teacher:
            model.attach_teacher(build(spec.entry(entry.init)))
        criterion = nn.CrossEntropyLoss()
        amp = entry.train.get("amp")
        amp = device.type == "cuda" if amp is None else amp  # the trainer's default
        model.train()

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model.compute_loss(model(images), targets, criterion).total
            loss.backward()
            model.zero_grad(set_to_none=True)

        train_step = _seconds(step, device)
    model.eval()
    with torch.inference_mode():
        with inference_context(device):
            infer = _seconds(lambda: model.predict(images), device) / len(images)
            latency = _seconds(lambda: model.predict(images[:1]), device)
        points = _default_point_count(model, entry, images)
    return ModelCost(train_step, infer, latency, points)


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class EntryPlan:
    entry: Entry
    cache: EntryCache
    status: str  # "cached", "resume" or "train"
    points: int
    train_seconds: float
    calibrate_seconds: float  # fitting knobs on the held-out split (0 when the points are cached)
    point_seconds: float  # evaluation (unless cached) and speed of one budget point

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.calibrate_seconds + self.points * self.point_seconds


@dataclass
class Plan:
    spec: BenchSpec
    entries: list[EntryPlan]
    steps_per_epoch: int
    device: torch.device

    @property
    def seconds(self) -> float:
        return sum(item.seconds for item in self.entries)

    def entry(self, name: str) -> EntryPlan:
        return next(item for item in self.entries if item.entry.name == name)

    def describe(self, output: str | Path) -> str:
        """A table of what will run, for ``--dry-run`` and the log."""
        spec = self.spec
        lines = [f"benchmark {spec.name!r} ({spec.source or 'inline spec'}): {spec.data.dataset}, backbone "
                 f"{spec.backbone}, device {self.device}, {torch.get_num_threads()} threads",
                 f"output: {output}", ""]
        # Columns as wide as their longest value, so long entry and model names stay aligned.
        name_width = max([len("entry")] + [len(entry.name) for entry in spec.entries]) + 2
        model_width = max([len("model")] + [len(entry.model) for entry in spec.entries]) + 2
        init_width = max([len("init")] + [len(entry.init or "-") for entry in spec.entries]) + 2
        lines.append(f"{'entry':<{name_width}}{'model':<{model_width}}{'init':<{init_width}}{'epochs':>7}  "
                     f"{'status':<8}{'train':>9}{'points':>8}{'eval+speed':>12}")
        for item in self.entries:
            entry = item.entry
            lines.append(f"{entry.name:<{name_width}}{entry.model:<{model_width}}{entry.init or '-':<{init_width}}"
                         f"{entry.train['epochs']:>7g}  {item.status:<8}{format_duration(item.train_seconds):>9}"
                         f"{item.points:>8}{format_duration(item.calibrate_seconds + item.points * item.point_seconds):>12}")
        lines += ["", f"{self.steps_per_epoch} training steps per epoch at batch size {spec.data.batch_size}; "
                      f"estimated total: {format_duration(self.seconds)} (from a short probe of each model "
                      f"on this machine)"]
        return "\n".join(lines)


def make_plan(spec: BenchSpec, entries: list[Entry], caches: dict[str, EntryCache], loaders: dict[str, Any],
              device: torch.device) -> Plan:
    """Probe every entry that has work left and estimate its stages."""
    batch = next(iter(loaders["train"]))
    steps = len(loaders["train"])
    test_images = len(loaders["test"].dataset)
    holdout_images = len(loaders["holdout"].dataset) if loaders["holdout"] is not None else 0
    speed = spec.speed
    classes = loaders["num_classes"]
    reference = probe_cost(spec, spec.entry(spec.reference), batch, classes, device, train=False)
    items = []
    for entry in entries:
        cache = caches[entry.name]
        status = "cached" if cache.is_done else "resume" if cache.is_started else "train"
        cost = probe_cost(spec, entry, batch, classes, device, train=status != "cached")
        train_seconds = 0.0
        if status != "cached":
            # The trainer ends with one pass over the test split.
            train_seconds = entry.train["epochs"] * steps * cost.train_step + test_images * cost.infer_image
        cached = _points_cached(entry, cache)
        calibrate = 0.0 if cached else _calibrations(entry) * holdout_images * cost.infer_image
        evaluate = 0.0 if cached else test_images * cost.infer_image
        passes = speed.warmup + speed.repeats
        timing = passes * (speed.images * (cost.infer_image + reference.infer_image)
                           + speed.latency_images * (cost.latency_image + reference.latency_image))
        items.append(EntryPlan(entry, cache, status, cost.points, train_seconds, calibrate, evaluate + timing))
    return Plan(spec, items, steps, device)


def _calibrations(entry: Entry) -> int:
    """Passes over the held-out split an entry's sweep needs."""
    points = [point for point in entry.budgets or () if point.calibrate is not None]
    return len(points) + (entry.calibrate is not None or entry.budgets is None)


def _points_cached(entry: Entry, cache: EntryCache) -> bool:
    points = cache.load_points(sweep_key(entry)) if cache.is_done else None
    return points is not None and all(cache.load_eval(point["knobs"]) is not None for point in points)


def format_duration(seconds: float) -> str:
    """``95`` -> ``1m35s``; ``4000`` -> ``1h06m``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
