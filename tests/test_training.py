"""Training: exact resume after an interruption, checkpoints, and torchrun/DDP on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dyntok.fileio import CheckpointError
from dyntok.methods import load_model
from dyntok.data import DataConfig
from dyntok.training import TrainConfig, train
from dyntok.training.trainer import Trainer

from .conftest import REPO_ROOT, TINY

TINY_MODEL = {k: v for k, v in TINY.items() if k != "num_classes"}


def tiny_config(dataset, out, model="vit_cifar_tiny", **overrides) -> TrainConfig:
    data = DataConfig(dataset=str(dataset), batch_size=8, holdout_size=0, cache_dir=str(out / "cache"))
    values = dict(model=model, model_kwargs=dict(TINY_MODEL), data=data, output_dir=str(out / "run"), epochs=2,
                  warmup_epochs=0.5, lr=1e-3, progress=False, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def weights(path):
    return load_file(str(path))


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, steps: int) -> None:
    """Make the trainer die like a killed process after ``steps`` optimiser steps."""
    original = Trainer._train_step
    calls = {"n": 0}

    def step(self, *args):
        if calls["n"] == steps:
            raise Interrupt
        calls["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", step)


@pytest.mark.parametrize("model", ["vit_cifar_tiny", "dynamicvit_vit_cifar_tiny"])
def test_resume_mid_epoch_gives_the_same_final_weights(image_folder, tmp_path, monkeypatch, model):
    # 24 images / batch 8 = 3 steps an epoch; interrupt in the middle of the second epoch.
    reference = train(tiny_config(image_folder, tmp_path / "a", model=model))
    with monkeypatch.context() as patch:
        interrupt_after(patch, 4)
        with pytest.raises(Interrupt):
            train(tiny_config(image_folder, tmp_path / "b", model=model))
    resumed = train(tiny_config(image_folder, tmp_path / "b", model=model, resume=True))
    expected, actual = weights(reference.model_path), weights(resumed.model_path)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


PHASED = {**TINY_MODEL, "predictor_warmup": 0.5}  # DynamicViT: 6 steps predictors only, then 6 with the backbone


@pytest.mark.parametrize("steps_before_kill", [2, 8], ids=["in-first-phase", "in-second-phase"])
def test_resume_in_either_phase_gives_the_same_final_weights(image_folder, tmp_path, monkeypatch, steps_before_kill):
    config = dict(model="dynamicvit_vit_cifar_tiny", model_kwargs=PHASED, epochs=4, save_every=1)
    reference = train(tiny_config(image_folder, tmp_path / "a", **config))
    with monkeypatch.context() as patch:
        interrupt_after(patch, steps_before_kill)
        with pytest.raises(Interrupt):
            train(tiny_config(image_folder, tmp_path / "b", **config))
    resumed = train(tiny_config(image_folder, tmp_path / "b", resume=True, **config))
    expected, actual = weights(reference.model_path), weights(resumed.model_path)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_a_two_phase_run_follows_one_schedule_and_keeps_the_optimiser_state(image_folder, tmp_path, monkeypatch):
    from dyntok.training.schedule import warmup_cosine

    steps = []
    original = Trainer._train_step

    def record(self, module, optimizer, images, targets):
        predictor = next(self.model.predictors.parameters())
        steps.append({"phase": self.model.phase,
                      "lr": {group["lr_scale"]: group["lr"] for group in optimizer.param_groups},
                      "predictor_updates": int(optimizer.state[predictor]["step"]) if predictor in optimizer.state
                      else 0})
        return original(self, module, optimizer, images, targets)

    monkeypatch.setattr(Trainer, "_train_step", record)
    # 3 steps an epoch, 4 epochs: 12 steps, the first 3 warming up, the first 6 training the predictors only.
    train(tiny_config(image_folder, tmp_path, model="dynamicvit_vit_cifar_tiny", model_kwargs=PHASED, epochs=4,
                      warmup_epochs=1, lr=1e-3, min_lr=1e-5))
    assert [step["phase"] for step in steps] == ["warmup"] * 6 + ["main"] * 6
    predictor_lr = [step["lr"][1.0] for step in steps]
    assert predictor_lr == pytest.approx([warmup_cosine(s, 12, 1e-3, 3, 1e-5) for s in range(12)])
    peak = predictor_lr.index(max(predictor_lr))
    assert all(a < b for a, b in zip(predictor_lr[:peak], predictor_lr[1:peak + 1]))  # one warm-up...
    assert all(a >= b for a, b in zip(predictor_lr[peak:], predictor_lr[peak + 1:]))  # ...then one decay
    assert all(set(step["lr"]) == {1.0} for step in steps[:6])  # backbone frozen first
    assert all(step["lr"][0.01] == pytest.approx(0.01 * step["lr"][1.0]) for step in steps[6:])
    # AdamW's moments carry over: the predictors' update count runs on across the phase switch.
    assert [step["predictor_updates"] for step in steps] == list(range(12))


def test_run_writes_checkpoints_logs_and_metrics(image_folder, tmp_path):
    result = train(tiny_config(image_folder, tmp_path, ema_decay=0.9))
    run = result.output_dir
    for name in ("model.safetensors", "last.safetensors", "log.jsonl", "metrics.json", "train_config.json"):
        assert (run / name).is_file(), name
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in epochs] == [1, 2]
    assert 0.0 <= result.metrics["test"]["top1"] <= 1.0
    model = load_model(result.model_path)
    assert model.config["backbone"]["overrides"]["num_classes"] == 3
    # The training checkpoint also loads as a model.
    assert load_model(run / "last.safetensors").config == model.config


def test_resume_refuses_a_checkpoint_of_another_model(image_folder, tmp_path):
    train(tiny_config(image_folder, tmp_path, epochs=1))
    with pytest.raises(ValueError, match="different model"):
        train(tiny_config(image_folder, tmp_path, epochs=1, resume=True, model_kwargs={**TINY_MODEL, "depth": 3}))


def test_pickled_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(path)


def test_batch_size_must_split_over_processes(image_folder, tmp_path):
    from dyntok.training.trainer import _per_rank

    with pytest.raises(ValueError, match="split evenly"):
        _per_rank(DataConfig(batch_size=9), 2)


DDP_SCRIPT = """
import json, sys
from dyntok.training import TrainConfig, train
train(TrainConfig.from_dict(json.loads(sys.argv[1])))
"""


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(image_folder, tmp_path):
    def config(out):
        cfg = tiny_config(image_folder, out, epochs=2, clip_grad=None)
        cfg.data.crop_padding, cfg.data.hflip = 0, False  # same pixels whatever the rank
        return json.dumps(cfg.to_dict())

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-c", DDP_SCRIPT, config(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--no-python",
                             sys.executable, "-c", DDP_SCRIPT, config(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    # Compare what the weights compute, not the weights: the key bias gets no gradient in exact arithmetic
    # (softmax ignores a per-query shift), so Adam turns its float noise into arbitrary, harmless steps.
    one, two = (load_model(tmp_path / run / "run" / "model.safetensors").eval() for run in ("one", "two"))
    images = torch.randn(8, 3, TINY["img_size"], TINY["img_size"])
    torch.testing.assert_close(two.predict(images).logits, one.predict(images).logits, rtol=1e-3, atol=1e-4)
    losses = [[json.loads(line)["train_task"] for line in (tmp_path / run / "run" / "log.jsonl").open()]
              for run in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.slow
def test_resume_after_a_real_sigkill_gives_the_same_final_weights(image_folder, tmp_path):
    import signal
    import time

    def command(out, *extra):
        return [sys.executable, "-m", "dyntok", "train", "--dataset", str(image_folder), "--batch-size", "8",
                "--holdout-size", "0", "--epochs", "30", "--warmup-epochs", "1", "--seed", "3", "--no-progress",
                "--output-dir", str(out), "--model-arg", "img_size=16", "--model-arg", "depth=2",
                "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", *extra]

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", DYNTOK_CACHE=str(tmp_path / "cache"))
    reference = subprocess.run(command(tmp_path / "a"), env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    victim = subprocess.Popen(command(tmp_path / "b", "--save-every", "2"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "b" / "last.safetensors"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    if (tmp_path / "b" / "model.safetensors").exists():
        pytest.skip("the run finished before it could be killed")
    resumed = subprocess.run(command(tmp_path / "b", "--save-every", "2", "--resume"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, actual = weights(tmp_path / "a" / "model.safetensors"), weights(tmp_path / "b" / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_resume_refuses_a_later_phase_of_a_run_whose_schedule_restarted(image_folder, tmp_path):
    from dyntok.fileio import load_tensors, save_tensors

    config = dict(model="dynamicvit_vit_cifar_tiny", model_kwargs=PHASED, epochs=4)
    train(tiny_config(image_folder, tmp_path, **config))
    checkpoint = tmp_path / "run" / "last.safetensors"
    tensors, meta = load_tensors(checkpoint)
    assert meta["progress"]["phase"] == 1
    del meta["schedule"]  # as written before the schedule ran over the whole run
    save_tensors(checkpoint, tensors, meta)
    with pytest.raises(ValueError, match="restarted at each phase"):
        train(tiny_config(image_folder, tmp_path, resume=True, **config))
