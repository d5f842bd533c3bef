"""Benchmark specs: the data, the backbone, the training budget and the entries to compare.

A spec is a YAML file (see docs/benchmark.md for every field)::

    name: cpu
    data: {dataset: cifar10, batch_size: 128, holdout_size: 5000}
    backbone: vit_cifar_micro
    train: {epochs: 3, lr: 1.0e-3}            # defaults for every entry
    speed: {batch_size: 64, images: 1024}
    entries:
      - name: dense
        model: "{backbone}"
      - name: dynamicvit
        model: dynamicvit_{backbone}
        init: dense                           # start from the dense entry's weights (and use it as teacher)
        train: {epochs: 1}
        budgets: [{keep_ratio: 0.5}, {keep_ratio: 0.7}]
      - name: dvt
        model: dvt_{backbone}                 # no budgets: calibrate on the held-out split, then budget_sweep()

Parsing checks everything that can be checked without training: field names and types, model names,
method keyword arguments, and references between entries. Errors name the field, e.g.
``entries[2].train.epochs: expected a number >= 0, got 'ten'``.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import timm
import yaml

from ..data import DataConfig
from ..data.config import DATA_RANGES, OPTIONAL_DATA
from ..methods import AdaptiveViT
from ..methods.budget import format_knobs
from ..methods.registry import check_model, list_methods, split_model_name
from ..models.vit import PRESETS
from ..ranges import Interval
from ..training.recipes import RECIPES
from ..training.validation import OPTIONAL_SETTINGS, TRAIN_RANGES

__all__ = ["SpecError", "BudgetPoint", "Entry", "SpeedSettings", "BenchSpec", "PROFILES", "load_spec",
           "parse_spec", "builtin_spec_path", "TRAIN_FIELDS"]

#: Built-in specs, by ``--profile`` name.
PROFILES = {"cpu": "cpu.yaml", "full": "cpu_full.yaml", "gpu": "gpu.yaml"}

#: Placeholder in an entry's ``model`` replaced by the spec's ``backbone``.
BACKBONE_PLACEHOLDER = "{backbone}"


class SpecError(ValueError):
    """A benchmark spec that does not parse; the message starts with the offending field."""


# ------------------------------------------------------------------------------------------ value checks
def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def _as_number(value: Any, where: str, what: str) -> float:
    """A YAML number; strings that read as numbers count too (YAML 1.1 reads ``1e-3`` as a string)."""
    if isinstance(value, bool):
        raise SpecError(f"{where}: expected {what}, got {_describe(value)}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise SpecError(f"{where}: expected {what}, got {_describe(value)}") from None
    if not isinstance(value, (int, float)):
        raise SpecError(f"{where}: expected {what}, got {_describe(value)}")
    return value


def ranged(accepted: Interval) -> Callable[[Any, str], Any]:
    """The check of a setting declared once as ``accepted`` (:mod:`dyntok.ranges`), in the spec's words.

    A number is returned as written (``3`` stays an int, ``3.0`` a float), so cache keys do not depend on how
    it was checked; a whole number as an int.
    """
    def check(value: Any, where: str) -> Any:
        if isinstance(value, str) and not accepted.integer:
            value = _as_number(value, where, accepted.describe())
        try:
            checked = accepted.check(where, value)
        except ValueError:
            raise SpecError(f"{where}: expected {accepted.describe()}, got {_describe(value)}") from None
        return checked if accepted.integer else value
    return check


def fraction(value: Any, where: str) -> float:
    number = _as_number(value, where, "a number in [0, 1)")
    if not 0 <= number < 1:
        raise SpecError(f"{where}: expected a number in [0, 1), got {_describe(value)}")
    return number


def count_or_fraction(value: Any, where: str) -> int | float:
    """An image count (integer) or a share (a number in [0, 1))."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return fraction(value, where)


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: expected true or false, got {_describe(value)}")
    return value


def text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: expected a non-empty string, got {_describe(value)}")
    return value


def optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """``check`` that also accepts ``null``."""
    def check_or_none(value: Any, where: str) -> Any:
        return None if value is None else check(value, where)
    return check_or_none


def mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a mapping (key: value), got {_describe(value)}")
    return dict(value)


def _check_keys(values: Mapping[str, Any], known: Mapping[str, Any] | list[str], where: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SpecError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"known keys: {', '.join(sorted(known))}")


def _validated(values: Mapping[str, Any], checks: Mapping[str, Callable[[Any, str], Any]], where: str
               ) -> dict[str, Any]:
    _check_keys(values, checks, where)
    return {key: checks[key](value, f"{where}.{key}") for key, value in values.items()}


def _json_value(value: Any, where: str) -> Any:
    """Knobs and targets end up in cache keys and results.json, so they must be plain JSON values."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise SpecError(f"{where}: expected plain numbers, strings or lists, got {_describe(value)}") from None
    return value


# ------------------------------------------------------------------------------------------ sections
#: Training settings a spec may set (globally under ``train:`` or per entry), with their checks.
#: Everything else in ``TrainConfig`` is the benchmark's business (model, data, output folder, init, device).
#: The ranges are ``TrainConfig``'s own (:data:`~dyntok.training.validation.TRAIN_RANGES`), so a spec accepts
#: exactly the values training does. Epochs 0 evaluate the entry's init as is (training-free methods: ToMe).
TRAIN_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    **{name: optional(ranged(TRAIN_RANGES[name])) if name in OPTIONAL_SETTINGS else ranged(TRAIN_RANGES[name])
       for name in ("epochs", "lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing", "clip_grad",
                    "ema_decay", "seed")},
    "amp": optional(boolean),
    "compile": boolean,
}

#: Checks for the ``DataConfig`` fields whose type matters before loading; the others are passed through.
_DATA_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "dataset": text,
    **{name: optional(ranged(DATA_RANGES[name])) if name in OPTIONAL_DATA else ranged(DATA_RANGES[name])
       for name in ("batch_size", "eval_batch_size", "image_size", "seed")},
    "holdout_size": count_or_fraction,
}


@dataclass(frozen=True)
class SpeedSettings:
    """How speed is measured (docs/measurement.md): batch size, how many real test images, repetitions."""

    batch_size: int = 64
    images: int = 1024
    latency_images: int = 64
    repeats: int = 5
    warmup: int = 1


_SPEED_CHECKS = {**{name: ranged(Interval(1, integer=True))
                    for name in ("batch_size", "images", "latency_images", "repeats")},
                 "warmup": ranged(Interval(0, integer=True))}


@dataclass(frozen=True)
class BudgetPoint:
    """One point of an entry's sweep: knobs to set, or targets to calibrate for on the held-out split."""

    knobs: dict[str, Any] | None = None
    calibrate: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """How the point appears in the leaderboard: ``keep_ratio=0.7``, ``q=0.5 (calibrated)``."""
        if self.calibrate is not None:
            return f"{format_knobs(self.calibrate)} (calibrated)" if self.calibrate else "calibrated"
        return format_knobs(self.knobs or {})

    def to_dict(self) -> dict[str, Any]:
        return {"calibrate": self.calibrate} if self.calibrate is not None else dict(self.knobs or {})


@dataclass(frozen=True)
class Entry:
    """One contender: a model trained with its settings, then evaluated at each budget point.

    ``train`` holds the spec's training defaults with the entry's own settings on top. ``budgets`` is None
    when the model's own ``budget_sweep()`` decides the points, after a calibration on the held-out split
    (with the ``calibrate`` targets, if given).
    ``pretrained`` entries are dyntok's shipped reference of their preset, evaluated without training
    (``dyntok bench --from-scratch`` trains them with the recipe that made the shipped weights instead).
    """

    name: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    budgets: tuple[BudgetPoint, ...] | None = None
    calibrate: dict[str, Any] | None = None
    pretrained: bool = False

    @property
    def method(self) -> str:
        return split_model_name(self.model)[0]

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["budgets"] = None if self.budgets is None else [point.to_dict() for point in self.budgets]
        return values


_ENTRY_KEYS = ("name", "model", "model_kwargs", "init", "train", "budgets", "calibrate", "pretrained")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class BenchSpec:
    """A parsed, checked benchmark spec."""

    name: str
    data: DataConfig
    backbone: str
    entries: tuple[Entry, ...]
    reference: str = "dense"
    description: str = ""
    device: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    source: str = ""

    def entry(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"no entry {name!r}; entries: {', '.join(e.name for e in self.entries)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "data": self.data.to_dict(), "backbone": self.backbone, "reference": self.reference,
                "device": self.device, "train": dict(self.train), "speed": dataclasses.asdict(self.speed),
                "entries": [entry.to_dict() for entry in self.entries]}


_TOP_LEVEL_KEYS = ("name", "description", "data", "backbone", "reference", "device", "train", "speed", "entries")


# ------------------------------------------------------------------------------------------ parsing
def builtin_spec_path(profile: str) -> Path:
    """The YAML file of a built-in profile (``cpu``, ``full``, ``gpu``)."""
    if profile not in PROFILES:
        raise SpecError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    return Path(str(resources.files("dyntok.bench").joinpath("specs", PROFILES[profile])))


def _spec_name(path: Path) -> str:
    """How results name a spec: a built-in one by its place in the package, any other by its file name."""
    builtin = builtin_spec_path("cpu").parent
    return f"dyntok/bench/specs/{path.name}" if path.resolve().parent == builtin.resolve() else path.name


def load_spec(path: str | Path) -> BenchSpec:
    """Read and check a spec file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark spec at {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {error}") from None
    except RecursionError:
        raise SpecError(f"{path} is nested too deeply to be a benchmark spec") from None
    try:
        return parse_spec(values, source=_spec_name(path))
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None


def parse_spec(values: Any, source: str = "") -> BenchSpec:
    """Check a spec given as a dict (e.g. ``yaml.safe_load`` output) and build a :class:`BenchSpec`."""
    values = mapping(values, "spec")
    _check_keys(values, _TOP_LEVEL_KEYS, "spec")
    for required in ("name", "backbone", "entries"):
        if required not in values:
            raise SpecError(f"{required}: missing; a spec needs name, backbone and entries")
    backbone = text(values["backbone"], "backbone")
    if not _is_backbone(backbone):
        raise SpecError(f"backbone: unknown backbone {backbone!r}; use a dyntok preset ({', '.join(PRESETS)}) "
                        f"or a timm plain-ViT name such as 'deit_small_patch16_224'")
    defaults = _validated(mapping(values.get("train"), "train"), TRAIN_FIELDS, "train")
    entries = _parse_entries(values["entries"], backbone, defaults)
    reference = text(values.get("reference", "dense"), "reference")
    by_name = {entry.name: entry for entry in entries}
    if reference not in by_name:
        raise SpecError(f"reference: no entry named {reference!r}; entries: {', '.join(by_name)}")
    return BenchSpec(
        name=text(values["name"], "name"), description=str(values.get("description") or ""),
        data=_parse_data(values.get("data")), backbone=backbone, entries=tuple(entries), reference=reference,
        device=text(values.get("device", "auto"), "device"), train=defaults,
        speed=SpeedSettings(**_validated(mapping(values.get("speed"), "speed"), _SPEED_CHECKS, "speed")),
        source=source)


def _parse_data(values: Any) -> DataConfig:
    values = mapping(values, "data")
    known = [f.name for f in dataclasses.fields(DataConfig)]
    _check_keys(values, known, "data")
    checked = {key: _DATA_CHECKS[key](value, f"data.{key}") if key in _DATA_CHECKS else value
               for key, value in values.items()}
    try:
        return DataConfig(**checked)
    except (TypeError, ValueError) as error:
        raise SpecError(f"data: {error}") from None


def _parse_entries(values: Any, backbone: str, defaults: dict[str, Any]) -> list[Entry]:
    if not isinstance(values, list) or not values:
        raise SpecError(f"entries: expected a non-empty list of entries, got {_describe(values)}")
    entries: list[Entry] = []
    for index, raw in enumerate(values):
        entry = _parse_entry(raw, f"entries[{index}]", backbone, defaults, {e.name: e for e in entries})
        entries.append(entry)
    return entries


def _parse_entry(raw: Any, where: str, backbone: str, defaults: dict[str, Any], earlier: dict[str, Entry]
                 ) -> Entry:
    raw = mapping(raw, where)
    _check_keys(raw, _ENTRY_KEYS, where)
    for required in ("name", "model"):
        if required not in raw:
            raise SpecError(f"{where}.{required}: missing; an entry needs at least name and model")
    name = text(raw["name"], f"{where}.name")
    if not _NAME_PATTERN.match(name):
        raise SpecError(f"{where}.name: {name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
    if name in earlier:
        raise SpecError(f"{where}.name: {name!r} is used by an earlier entry")
    model = text(raw["model"], f"{where}.model").replace(BACKBONE_PLACEHOLDER, backbone)
    _check_model_name(model, f"{where}.model")
    model_kwargs = _json_value(mapping(raw.get("model_kwargs"), f"{where}.model_kwargs"), f"{where}.model_kwargs")
    shapes = _shapes_only(model, model_kwargs, f"{where}.model_kwargs")
    init = optional(text)(raw.get("init"), f"{where}.init")
    if init is not None and init not in earlier:
        raise SpecError(f"{where}.init: {init!r} is not an earlier entry; entries it may start from: "
                        f"{', '.join(earlier) or 'none'}")
    pretrained = boolean(raw.get("pretrained", False), f"{where}.pretrained")
    if pretrained:
        _check_shipped_reference(model, model_kwargs, init, where)
    train = {**defaults, **_validated(mapping(raw.get("train"), f"{where}.train"), TRAIN_FIELDS, f"{where}.train")}
    if pretrained:
        train["epochs"] = 0  # the shipped weights are evaluated as they are
    if "epochs" not in train:
        raise SpecError(f"{where}.train.epochs: missing, and the spec's train section sets no default")
    if train["epochs"] == 0 and init is None and not pretrained:
        raise SpecError(f"{where}.train.epochs: 0 trains nothing, so the entry needs init: (the entry whose "
                        f"weights it evaluates)")
    return Entry(name=name, model=model, model_kwargs=model_kwargs, train=train, init=init,
                 budgets=_parse_budgets(raw.get("budgets"), f"{where}.budgets", shapes),
                 calibrate=_parse_targets(raw.get("calibrate"), f"{where}.calibrate", shapes), pretrained=pretrained)


def _check_shipped_reference(model: str, model_kwargs: dict[str, Any], init: str | None, where: str) -> None:
    """A ``pretrained`` entry is a model with a recipe, as it is: exactly what ``dyntok pretrain`` ships."""
    if model not in RECIPES or model_kwargs or init is not None:
        raise SpecError(f"{where}.pretrained: only a model with shipped weights and no model_kwargs or init "
                        f"can be pretrained ({', '.join(RECIPES)}); got {model!r}")


def with_references_from_scratch(spec: BenchSpec) -> BenchSpec:
    """The same spec with every ``pretrained`` entry trained by the recipe of its shipped weights.

    A reference trains from scratch; a method starts from the entry that holds its backbone's reference (which
    was itself retrained), as its recipe starts from the shipped one. The recipe's data settings (augmentation,
    held-out split) are the spec's ``data`` section, so a spec meant to reproduce the shipped files sets them as
    the recipes do (the built-in ``cpu`` spec does).
    """
    entries: list[Entry] = []
    for entry in spec.entries:
        if entry.pretrained:
            recipe = RECIPES[entry.model]
            init = _reference_entry(entries, entry) if recipe.init else None
            entry = dataclasses.replace(entry, pretrained=False, init=init, model_kwargs=dict(recipe.model_kwargs),
                                        train={**entry.train, **recipe.train_fields()})
        entries.append(entry)
    return dataclasses.replace(spec, entries=tuple(entries))


def _reference_entry(earlier: list[Entry], entry: Entry) -> str:
    """The earlier entry holding the dense model ``entry``'s recipe starts from."""
    backbone = split_model_name(entry.model)[1]
    for candidate in earlier:
        if candidate.model == backbone:
            return candidate.name
    raise SpecError(f"entry {entry.name!r}: its recipe starts from the dense {backbone}, and no earlier entry "
                    f"trains it; add one before it (model: {backbone}, pretrained: true)")


def _parse_budgets(values: Any, where: str, model: AdaptiveViT) -> tuple[BudgetPoint, ...] | None:
    """The budget points, each checked against ``model.budget_space()`` (or its calibration targets)."""
    if values is None:
        return None
    if not isinstance(values, list) or not values:
        raise SpecError(f"{where}: expected a non-empty list of budget points (or leave it out to use the "
                        f"model's budget_sweep()), got {_describe(values)}")
    points = []
    for index, value in enumerate(values):
        point_where = f"{where}[{index}]"
        value = mapping(value, point_where)
        if not value:
            raise SpecError(f"{point_where}: empty budget point; give knobs (keep_ratio: 0.7) or "
                            f"calibrate: {{targets}}")
        if "calibrate" in value:
            _check_keys(value, ["calibrate"], point_where)
            points.append(BudgetPoint(calibrate=_parse_targets(value["calibrate"], f"{point_where}.calibrate",
                                                               model)))
        else:
            knobs = _json_value(value, point_where)
            try:
                model.checked_budget(knobs)
            except ValueError as error:
                raise SpecError(f"{point_where}: {error}") from None
            points.append(BudgetPoint(knobs=knobs))
    return tuple(points)


def _parse_targets(value: Any, where: str, model: AdaptiveViT) -> dict[str, Any] | None:
    """Calibration targets: positive numbers, named as ``model.calibrate`` takes them."""
    if value is None:
        return None
    targets = _json_value(mapping(value, where), where)
    try:
        inspect.signature(model.calibrate).bind(None, **targets)
    except TypeError:
        accepted = [name for name in inspect.signature(model.calibrate).parameters if name != "loader"]
        raise SpecError(f"{where}: {type(model).__name__}.calibrate takes {', '.join(accepted) or 'no targets'}; "
                        f"got {', '.join(map(repr, targets))}") from None
    for name, target in targets.items():
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
            raise SpecError(f"{where}.{name}: expected a positive number, got {_describe(target)}")
    return targets


def _is_backbone(name: str) -> bool:
    return name in PRESETS or timm.is_model(name)


def _check_model_name(model: str, where: str) -> None:
    """A :class:`SpecError` for a name that is no model: a typo in the method or the backbone part."""
    _, backbone = split_model_name(model)
    if _is_backbone(backbone):
        return
    prefix, _, rest = model.partition("_")
    if rest and _is_backbone(rest):
        raise SpecError(f"{where}: unknown method {prefix!r} in {model!r}; methods: {', '.join(list_methods())}")
    raise SpecError(f"{where}: unknown model {model!r}; a model is <method>_<backbone> or a bare backbone, with "
                    f"methods {', '.join(list_methods())} and backbones {', '.join(PRESETS)} or a timm ViT name")


def _shapes_only(model: str, kwargs: dict[str, Any], where: str) -> AdaptiveViT:
    """The entry's model built on the meta device: its options, size and budget space checked for free."""
    try:
        return check_model(model, kwargs)
    except ValueError as error:
        raise SpecError(f"{where}: {error}") from None
