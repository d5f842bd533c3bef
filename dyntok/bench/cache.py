"""What the benchmark keeps between runs, so a re-run only does the missing work.

Each trained entry owns a folder ``<root>/<entry>-<key>``, where the key hashes everything its weights
depend on: the model and its options, the training settings, the data settings and, for an entry that
starts from another one, that entry's key (retraining the dense model invalidates every model built on it).
The folder is the trainer's output folder, so it holds ``last.safetensors`` while training is under way
(an interrupted entry resumes from it) and ``model.safetensors`` plus the ``done.json`` marker once finished.

Evaluation results are kept beside the weights, one small JSON file per budget point, keyed by the knobs
that were set; the resolved budget points themselves (which may have needed a calibration) are kept in
``points.json``. Speed is not cached: timings are re-measured on every run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import atomic_write
from ..training.trainer import TrainConfig

__all__ = ["EntryCache", "training_key", "digest", "CACHE_VERSION"]

#: Bump when what a cached folder holds changes meaning, so old folders are not reused by mistake.
#: 2: multi-phase methods train under one schedule over the whole run; DVT's reuse widths scale with D.
CACHE_VERSION = 2

#: TrainConfig fields that say where or how a run happens, not what it learns.
_RUN_FIELDS = frozenset({"output_dir", "init", "resume", "progress", "device", "save_every", "compile"})
#: DataConfig fields that say where data is found or how it is evaluated, not what is trained on.
_LOCATION_FIELDS = frozenset({"data_root", "download", "cache_dir", "eval_batch_size"})


def digest(values: Any) -> str:
    """SHA-256 of the canonical JSON of ``values``."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def training_key(config: TrainConfig, init_key: str | None = None) -> str:
    """Hash of the training-relevant settings of ``config`` plus the key of the model it starts from."""
    values = {key: value for key, value in config.to_dict().items() if key not in _RUN_FIELDS}
    values["data"] = {key: value for key, value in values["data"].items() if key not in _LOCATION_FIELDS}
    # Keys made while DataConfig held the smoothing folded into mixup's targets had it here; keeping that
    # entry (the same value) keeps every earlier cache valid.
    values["data"]["label_smoothing"] = config.label_smoothing if config.data.mixup else 0.0
    values["init"] = init_key
    values["cache_version"] = CACHE_VERSION
    return digest(values)


def _write_json(path: Path, values: Any) -> None:
    """Write atomically: an interrupted run never leaves a half-written record behind."""
    with atomic_write(path) as tmp, open(tmp, "w") as handle:
        json.dump(values, handle, indent=2)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class EntryCache:
    """The cached state of one entry: its training folder, done marker, budget points and evaluations."""

    folder: Path
    key: str

    @classmethod
    def at(cls, root: str | Path, name: str, key: str) -> "EntryCache":
        return cls(Path(root) / f"{name}-{key[:12]}", key)

    # ------------------------------------------------------------------ training
    @property
    def model_path(self) -> Path:
        return self.folder / "model.safetensors"

    @property
    def is_done(self) -> bool:
        """Finished training: final weights written and the marker (for this very key) in place."""
        record = self.done_record()
        return self.model_path.is_file() and record is not None and record.get("key") == self.key

    @property
    def is_started(self) -> bool:
        """An interrupted training run left a checkpoint to resume from."""
        return (self.folder / "last.safetensors").is_file()

    def done_record(self) -> dict[str, Any] | None:
        return _read_json(self.folder / "done.json")

    def mark_done(self, record: dict[str, Any]) -> None:
        _write_json(self.folder / "done.json", {"key": self.key, **record})

    # ------------------------------------------------------------------ budget points and evaluations
    def load_points(self, sweep_key: str) -> list[dict[str, Any]] | None:
        """The budget points resolved for this sweep spec (labels and knobs), if resolved before."""
        record = _read_json(self.folder / "points.json")
        if record is None or record.get("sweep_key") != sweep_key:
            return None
        return record["points"]

    def save_points(self, sweep_key: str, points: list[dict[str, Any]]) -> None:
        _write_json(self.folder / "points.json", {"sweep_key": sweep_key, "points": points})

    def load_anytime(self) -> dict[str, Any] | None:
        """Top-1 of each exit on the test split and the oracle curve (``exit_top1``, ``oracle``), if measured."""
        return _read_json(self.folder / "anytime.json")

    def save_anytime(self, record: dict[str, Any]) -> None:
        _write_json(self.folder / "anytime.json", record)

    def _eval_path(self, knobs: dict[str, Any]) -> Path:
        return self.folder / "evals" / f"{digest(knobs)[:16]}.json"

    def load_eval(self, knobs: dict[str, Any]) -> dict[str, Any] | None:
        record = _read_json(self._eval_path(knobs))
        return record if record is not None and record.get("knobs") == knobs else None

    def save_eval(self, knobs: dict[str, Any], record: dict[str, Any]) -> None:
        _write_json(self._eval_path(knobs), {"knobs": knobs, **record})
