"""``dyntok train``: one loop that trains any method through the method contract.

The loop never asks which method it trains: it calls ``forward``, ``compute_loss``, ``param_groups`` and
``training_phases`` and nothing else. Training state (weights, EMA, optimiser, RNG, position in the
schedule) is written atomically to ``last.safetensors`` after every epoch (and every ``save_every`` steps),
so ``--resume`` continues exactly where a killed run stopped: same batches, same augmentation, same
dropout draws, same final weights.

A method that trains in phases (DynamicViT: predictors alone, then everything) still follows one schedule:
one warm-up and one cosine over the whole run, the step counter running on across phases. Each phase gets
an optimiser for its own parameter groups, and the parameters it shares with the phase before keep their
AdamW moments and step counts, as if one optimiser had held every parameter all along.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..fileio import check_writable_folder, load_tensors, prefixed, save_tensors, tensors_under
from ..data import DataConfig, build_loaders
from ..evaluation import evaluate
from ..methods import AdaptiveViT, create_model
from ..methods.registry import config_mismatch, load_model, save_model, weight_mismatch
from .distributed import init_distributed, stop_cleanly
from .lock import claim_output_dir
from .schedule import warmup_cosine
from .state import check_dense_init, optimizer_state_from_tensors, optimizer_state_to_tensors
from .validation import check_model_settings, check_train_settings

__all__ = ["TrainConfig", "TrainResult", "train", "PRETRAINED_INIT"]

#: ``init`` value that starts a method from its backbone's shipped reference (``--init pretrained``).
PRETRAINED_INIT = "pretrained"

log = logging.getLogger(__name__)

#: Steps in a row whose loss or gradients are not finite (each one skipped) after which training stops.
MAX_NONFINITE_STEPS = 5


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved beside the checkpoints as ``train_config.json``."""

    model: str = "vit_cifar_tiny"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "runs/vit_cifar_tiny"
    epochs: float = 10.0
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1  # the loss's; folded into mixup's soft targets when mixup is on
    clip_grad: float | None = 1.0
    ema_decay: float | None = None
    init: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    compile: bool = False
    save_every: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_train_settings(self)
        check_model_settings(self.model, self.model_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        values = dict(values)
        values["data"] = DataConfig.from_dict(values.get("data", {}))
        return cls(**values)


@dataclass
class TrainResult:
    output_dir: Path
    model_path: Path
    metrics: dict[str, Any]


#: Written into training checkpoints: the step counter runs over the whole run, not restarting per phase.
_SCHEDULE = "whole-run"


@dataclass
class _Progress:
    """Where training stands; enough to resume exactly. ``step`` counts over the whole run, ``epoch`` and
    ``batch`` within the current phase."""

    phase: int = 0
    epoch: int = 0
    batch: int = 0
    step: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Trainer:
    """Trains one model on one (or, under torchrun, every) rank. Use :func:`train`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.ctx, self.device = init_distributed(config.device)
        self.loaders = build_loaders(_per_rank(config.data, self.ctx.world_size), rank=self.ctx.rank,
                                     world_size=self.ctx.world_size, label_smoothing=config.label_smoothing)
        _require_a_full_batch(self.loaders["train"], self.ctx.world_size)
        torch.manual_seed(config.seed)
        model_kwargs = {"num_classes": self.loaders["num_classes"], **config.model_kwargs}
        self.model: AdaptiveViT = create_model(config.model, **model_kwargs).to(self.device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if config.data.mixup else config.label_smoothing)
        self.amp = config.amp if config.amp is not None else self.device.type == "cuda"
        self.ema = None
        self.progress = _Progress()
        self._nonfinite_steps = 0
        self._start_from_dense()
        if config.epochs > 0:
            # Before the optimiser, the EMA copy and a resumed run's config check: all see the trained form.
            self.model.begin_training()

    # ------------------------------------------------------------------ setup
    def _start_from_dense(self) -> None:
        if not self.config.init:
            if self.model.wants_teacher and self.ctx.is_main:
                log.warning("%s learns from a teacher; without --init it trains without distillation",
                            self.config.model)
            return
        dense = self._load_init().to(self.device)
        check_dense_init(dense, self.model, self.config.init)
        self.model.init_from_dense(dense.state_dict())
        if self.model.wants_teacher:
            self.model.attach_teacher(dense)

    def _load_init(self) -> AdaptiveViT:
        """The dense model named by ``init``: a model file, or ``pretrained`` for the backbone's shipped reference."""
        if self.config.init != PRETRAINED_INIT:
            return load_model(self.config.init)
        backbone = self.model.backbone_spec
        overrides = {key: value for key, value in backbone.overrides.items() if key != "num_classes"}
        return create_model(backbone.name, pretrained=True, **overrides, num_classes=self.model.num_classes)

    def _phase_steps(self) -> list[int]:
        """Optimiser steps of each phase: its share of the run (at least one)."""
        per_epoch = len(self.loaders["train"])
        return [max(1, round(self.config.epochs * phase.epoch_share * per_epoch))
                for phase in self.model.training_phases()]

    def _make_optimizer(self, previous: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
        """AdamW over the current phase's groups, taking over ``previous``'s state for the parameters it shares."""
        groups = self.model.param_groups(self.config.weight_decay)
        for group in groups:
            group["lr"] = self.config.lr * group["lr_scale"]
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr, betas=(0.9, 0.999))
        if previous is not None:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param in previous.state:
                        optimizer.state[param] = previous.state[param]
        return optimizer

    def _wrap(self) -> nn.Module:
        """What the forward goes through: DDP across ranks, optionally compiled."""
        module: nn.Module = self.model
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids)
        if self.config.compile:
            module = torch.compile(module)
        return module

    def _make_ema(self):
        if self.config.ema_decay is None:
            return None
        from timm.utils import ModelEmaV3

        return ModelEmaV3(self.model, decay=self.config.ema_decay)

    # ------------------------------------------------------------------ checkpoints
    def _save_state(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.ctx.is_main:
            return
        optim_tensors, optim_meta = optimizer_state_to_tensors(optimizer.state_dict())
        tensors = {**prefixed(self.model.state_dict(), "model."), **prefixed(optim_tensors, "optim.")}
        if self.ema is not None:
            tensors.update(prefixed(self.ema.module.state_dict(), "ema."))
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"kind": "training", "config": self.model.config, "budget": self.model.get_budget(),
                "train_config": self.config.to_dict(), "progress": self.progress.as_dict(),
                "schedule": _SCHEDULE, "optimizer": optim_meta, "holdout_split": self._holdout_record()}
        save_tensors(self.out / "last.safetensors", tensors, meta)

    def _holdout_record(self) -> dict[str, Any]:
        """What rebuilds the held-out split, and the training set's fingerprint that tells it is the same set."""
        return {**self.config.data.holdout_split(), "fingerprint": self.loaders["fingerprint"]}

    def _restore_state(self) -> dict[str, torch.Tensor]:
        """Load weights, RNG and position from ``last.safetensors``; returns its tensors for the optimiser."""
        tensors, meta = load_tensors(self.out / "last.safetensors")
        if meta.get("kind") != "training" or meta["config"] != self.model.config:
            differences = config_mismatch(meta.get("config", {}), self.model.config) or "not a training checkpoint"
            raise ValueError(f"{self.out}/last.safetensors was written for a different model ({differences}); "
                             f"use another --output-dir or drop --resume")
        if meta["progress"]["phase"] > 0 and meta.get("schedule") != _SCHEDULE:
            raise ValueError(f"{self.out}/last.safetensors stopped in a later training phase of a run whose "
                             f"learning-rate schedule restarted at each phase (older dyntok); it cannot be "
                             f"continued exactly: drop --resume to train again")
        weights = tensors_under(tensors, "model.")
        problems = weight_mismatch(self.model.state_dict(), weights)
        if problems:
            raise ValueError(f"{self.out}/last.safetensors: the weights do not fit the model ({problems}); the file "
                             f"is damaged or was edited: use another --output-dir or drop --resume")
        self.model.load_state_dict(weights)
        torch.set_rng_state(tensors["rng.torch"])
        self.progress = _Progress(**meta["progress"])
        self._optimizer_meta = meta["optimizer"]
        return tensors

    def _restore_optimizer_and_ema(self, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
        optimizer.load_state_dict(optimizer_state_from_tensors(tensors_under(tensors, "optim."), self._optimizer_meta))
        if self.ema is not None:
            self.ema.module.load_state_dict(tensors_under(tensors, "ema."))

    # ------------------------------------------------------------------ the loop
    def _train_step(self, module: nn.Module, optimizer: torch.optim.Optimizer, images, targets) -> dict:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            output = module(images)
            loss = self.model.compute_loss(output, targets, self.criterion)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        # Backward runs even for a NaN loss so that DDP's gradient all-reduce stays in step on every rank.
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad or math.inf)
        if not self._step_is_finite(loss.total, grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return {}
        optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.step)
        return loss.terms

    def _share_done(self) -> float:
        """Share of all training steps (every phase) already taken: what method schedules follow."""
        # The step counter runs on across phases (one schedule for the whole run).
        return self.progress.step / sum(self._phase_steps())

    def _step_is_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """False (skip the step) when the loss or the gradients are NaN/inf on any rank; stop when it repeats."""
        finite = self.ctx.all_true(bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)))
        if finite:
            self._nonfinite_steps = 0
            return True
        self._nonfinite_steps += 1
        if self.ctx.is_main:
            log.warning("step %d: loss %s, gradient norm %s: step skipped, weights unchanged (%d in a row)",
                        self.progress.step, loss.item(), grad_norm.item(), self._nonfinite_steps)
        if self._nonfinite_steps >= MAX_NONFINITE_STEPS:
            checkpoint = self.out / "last.safetensors"
            kept = (f"the last checkpoint {checkpoint} is intact (resume it with --resume)" if checkpoint.exists()
                    else "no checkpoint was written yet")
            raise FloatingPointError(
                f"the loss or its gradients were not finite for {self._nonfinite_steps} steps in a row (up to step "
                f"{self.progress.step}); training stopped and {kept}. Lower --lr, keep --clip-grad on, turn off "
                f"--amp, or check the data for broken images")
        return False

    def _set_lr(self, optimizer: torch.optim.Optimizer, total_steps: int) -> float:
        warmup = round(self.config.warmup_epochs / max(self.config.epochs, 1e-9) * total_steps)
        lr = warmup_cosine(self.progress.step, total_steps, self.config.lr, warmup, self.config.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _run_epoch(self, module, optimizer, phase_end: int, total_steps: int, epoch_offset: int) -> dict[str, float]:
        """Train until the loader runs out or the phase ends at step ``phase_end`` (of ``total_steps``)."""
        loader = self.loaders["train"]
        loader.set_epoch(epoch_offset + self.progress.epoch)
        remaining = min(len(loader) - self.progress.batch, phase_end - self.progress.step)
        bar = tqdm(total=remaining, disable=not (self.config.progress and self.ctx.is_main),
                   desc=f"{self.model.phase} epoch {self.progress.epoch + 1}", leave=False)
        sums: dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        for images, targets in loader.iterate(start_batch=self.progress.batch):
            if self.progress.step >= phase_end:
                break
            lr = self._set_lr(optimizer, total_steps)
            self.model.set_training_progress(self._share_done())
            terms = self._train_step(module, optimizer, images.to(self.device), targets.to(self.device))
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
            seen += 1
            self.progress.step += 1
            self.progress.batch += 1
            speed = seen * images.shape[0] * self.ctx.world_size / (time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(terms.values()):.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
            if self.config.save_every and self.progress.step % self.config.save_every == 0:
                self._save_state(optimizer)
        bar.close()
        return {key: value / max(seen, 1) for key, value in sums.items()}

    def _write_log(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with open(self.out / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _holdout_metrics(self) -> dict[str, float]:
        """Top-1 and GMACs on the held-out split (rank 0; empty without one), to follow a run epoch by epoch."""
        holdout = self.loaders["holdout"]
        if holdout is None or not self.ctx.is_main:
            return {}
        # Evaluation draws no random numbers, so it leaves the RNG stream (and exact resume) untouched.
        result = evaluate(self.model, holdout, self.device, progress=False)
        return {"holdout_top1": round(result.top1, 5), "holdout_gmacs": round(result.mean_gmacs, 6)}

    def _train_phase(self, phase_index: int, previous: torch.optim.Optimizer | None,
                     resume_tensors: dict | None) -> torch.optim.Optimizer:
        """Train one phase; returns its optimiser, whose state the next phase takes over."""
        self.model.set_phase(self.model.training_phases()[phase_index].name)
        optimizer = self._make_optimizer(previous)
        if self.ema is None:
            self.ema = self._make_ema()
        if resume_tensors is not None:
            self._restore_optimizer_and_ema(optimizer, resume_tensors)
        module = self._wrap()
        phase_steps, per_epoch = self._phase_steps(), len(self.loaders["train"])
        epochs = math.ceil(phase_steps[phase_index] / per_epoch)
        epoch_offset = sum(math.ceil(steps / per_epoch) for steps in phase_steps[:phase_index])
        phase_end = sum(phase_steps[:phase_index + 1])
        while self.progress.epoch < epochs:
            module.train()
            started = time.perf_counter()
            terms = self._run_epoch(module, optimizer, phase_end, sum(phase_steps), epoch_offset)
            self.progress.epoch += 1
            self.progress.batch = 0
            self._save_state(optimizer)
            self._write_log({"phase": self.model.phase, "epoch": self.progress.epoch, "step": self.progress.step,
                             "seconds": round(time.perf_counter() - started, 2),
                             **{f"train_{k}": round(self.ctx.mean(v), 5) for k, v in terms.items()},
                             **self._holdout_metrics()})
        return optimizer

    def fit(self) -> TrainResult:
        """Train (or resume) to the end. Use :func:`train`, which locks the output folder first."""
        resume_tensors = None
        if self.config.resume and (self.out / "last.safetensors").exists():
            resume_tensors = self._restore_state()
        elif (self.out / "last.safetensors").exists() and self.ctx.is_main:
            log.warning("%s already holds a checkpoint; starting over (pass --resume to continue it)", self.out)
        if self.ctx.is_main:
            (self.out / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        # Zero epochs: the model as built (or as --init gave it) is saved and evaluated; nothing is trained.
        phases, optimizer = (self.model.training_phases() if self.config.epochs > 0 else []), None
        for phase_index in range(self.progress.phase, len(phases)):
            optimizer = self._train_phase(phase_index, optimizer, resume_tensors)
            resume_tensors = None
            if phase_index + 1 < len(phases):
                self.progress = _Progress(phase=phase_index + 1, step=self.progress.step)
        return self._finish()

    def _finish(self) -> TrainResult:
        final = self.ema.module if self.ema is not None else self.model
        model_path = self.out / "model.safetensors"
        metrics: dict[str, Any] = {}
        if self.ctx.is_main:
            save_model(final, model_path, extra={"holdout_split": self._holdout_record()})
            result = evaluate(final, self.loaders["test"], self.device, progress=self.config.progress,
                              desc="test")
            metrics = {"test": result.summary(), "steps": self.progress.step}
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self.ctx.barrier()
        return TrainResult(self.out, model_path, metrics)


def _per_rank(data: DataConfig, world_size: int) -> DataConfig:
    """``batch_size`` is global: each of ``world_size`` ranks loads its share of every batch."""
    if data.batch_size % world_size:
        raise ValueError(f"batch size {data.batch_size} does not split evenly over {world_size} processes")
    return dataclasses.replace(data, batch_size=data.batch_size // world_size)


def _require_a_full_batch(loader, world_size: int) -> None:
    """A clear error instead of a training loop with nothing to iterate over."""
    if len(loader) == 0:
        raise ValueError(f"batch_size (--batch-size) is larger than the training data: {loader.batch_size} per "
                         f"process, but each of the {world_size} process(es) gets {loader.num_samples} of the "
                         f"{len(loader.dataset)} training images left after the held-out split; lower "
                         f"--batch-size or --holdout-size")


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` and return where its weights and metrics were written.

    The output folder is checked and locked against a second run before any data is read, so a read-only
    or busy folder fails at once; SIGTERM and Ctrl-C stop the run naming the intact checkpoint.
    """
    out, rank = Path(config.output_dir), int(os.environ.get("RANK", "0"))
    if rank == 0:
        check_writable_folder(out, "--output-dir")
    with claim_output_dir(out, enabled=rank == 0), \
            stop_cleanly(out / "last.safetensors", rank, resumes=config.resume):
        return Trainer(config).fit()
