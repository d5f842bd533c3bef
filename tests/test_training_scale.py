"""Training at scale on CPU: the streaming path, gradient accumulation, torchrun with workers, and resuming a
2-process run on 1 process."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from dyntok.fileio import load_meta
from dyntok.methods import load_model
from dyntok.training import train

from .conftest import REPO_ROOT, TINY
from .test_training import assert_resume_is_exact, tiny_config

#: Streamed, with timm's RandAugment and random erasing, decoded by 2 worker processes.
STREAMED = dict(data_path="stream", image_size=TINY["img_size"], num_workers=2, randaugment=(2, 9),
                random_erasing=0.25, crop_pct=0.875)


def streamed_config(folder, out, **overrides):
    config = tiny_config(folder, out, **overrides)
    config.data = dataclasses.replace(config.data, **STREAMED)
    return config


def same_function(path_a, path_b, atol=1e-4):
    """Compare what two models compute, not their weights: the attention key bias gets no gradient in exact
    arithmetic, so Adam turns its float noise into arbitrary, harmless steps."""
    one, two = (load_model(path).eval() for path in (path_a, path_b))
    images = torch.randn(8, 3, TINY["img_size"], TINY["img_size"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(two.predict(images).logits, one.predict(images).logits, rtol=1e-3, atol=atol)


def test_streamed_training_resumes_mid_epoch_exactly_with_accumulation(image_folder, tmp_path, monkeypatch):
    # 24 images, batch 8 in 2 micro-batches of 4: 3 steps an epoch; killed after step 4, checkpointed each step.
    assert_resume_is_exact(lambda out, **extra: streamed_config(image_folder, out, accum_steps=2, save_every=1,
                                                                **extra), tmp_path, monkeypatch, steps_before_kill=4)


def test_accumulated_micro_batches_train_like_one_batch(image_folder, tmp_path):
    # Streamed augmentation is keyed by each image's place in the epoch, so both runs see the same pixels.
    whole = train(streamed_config(image_folder, tmp_path / "whole", clip_grad=None))
    halves = train(streamed_config(image_folder, tmp_path / "halves", clip_grad=None, accum_steps=2))
    same_function(whole.model_path, halves.model_path)
    # The model records how it was evaluated, for `dyntok eval` to feed it the same.
    assert load_meta(whole.model_path)["eval_transform"] == {"mean": [0.4914, 0.4822, 0.4465],
                                                             "std": [0.247, 0.2435, 0.2616], "crop_pct": 0.875}


def test_the_global_batch_must_split_into_micro_batches(image_folder, tmp_path):
    with pytest.raises(ValueError, match="accumulation steps"):
        train(streamed_config(image_folder, tmp_path, accum_steps=3))


SCRIPT = """
import json, sys
from dyntok.training import TrainConfig, train
from dyntok.training.trainer import Trainer

config = TrainConfig.from_dict(json.loads(sys.argv[1]))
stop_after = int(sys.argv[2]) if len(sys.argv) > 2 else None
if stop_after is not None:  # die like a preempted job once `stop_after` steps are checkpointed
    original = Trainer._train_step
    def step(self, *args):
        if self.progress.step == stop_after:
            self.ctx.barrier()  # rank 0 has written the checkpoint of step `stop_after`
            raise SystemExit(3)
        return original(self, *args)
    Trainer._train_step = step
train(config)
"""


def run_script(config, processes: int, *extra: str):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    launcher = [sys.executable]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--no-python", sys.executable]
    return subprocess.run([*launcher, "-c", SCRIPT, json.dumps(config.to_dict()), *extra], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_streaming_processes_with_workers_match_one(image_folder, tmp_path):
    def config(out):
        return streamed_config(image_folder, out, clip_grad=None)

    single = run_script(config(tmp_path / "one"), 1)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_script(config(tmp_path / "two"), 2)
    assert double.returncode == 0, double.stderr[-3000:]
    same_function(tmp_path / "one" / "run" / "model.safetensors", tmp_path / "two" / "run" / "model.safetensors")
    losses = [[json.loads(line)["train_task"] for line in (tmp_path / run / "run" / "log.jsonl").open()]
              for run in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(image_folder, tmp_path):
    """Preempted mid-epoch on 2 processes, continued on 1: the run ends where an uninterrupted 1-process run
    does (the checkpoint counts optimiser steps, and the data of a step is the same on any process count)."""
    def config(out, **extra):
        return streamed_config(image_folder, out, clip_grad=None, save_every=1, **extra)

    reference = run_script(config(tmp_path / "ref"), 1)
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = run_script(config(tmp_path / "moved"), 2, "4")
    assert stopped.returncode != 0 and (tmp_path / "moved" / "run" / "last.safetensors").exists()
    assert not (tmp_path / "moved" / "run" / "model.safetensors").exists()
    resumed = run_script(config(tmp_path / "moved", resume=True), 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_function(tmp_path / "ref" / "run" / "model.safetensors", tmp_path / "moved" / "run" / "model.safetensors")
