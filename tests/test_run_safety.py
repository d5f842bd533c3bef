"""Runs on shared machines: bad settings fail before any work, one run per folder, interruptions at any point
resume to the same result, non-finite steps are skipped then stop the run, and a dead DDP worker ends the run."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dyntok import fileio
from dyntok.fileio import load_tensors
from dyntok.cli import main
from dyntok.data import DataConfig
from dyntok.methods import LossOutput
from dyntok.methods.dense import DenseViT
from dyntok.training import train
from dyntok.training.lock import LOCK_NAME, RunLockedError, claim_output_dir
from dyntok.training.trainer import MAX_NONFINITE_STEPS

from .conftest import REPO_ROOT, make_image_folder
from .test_training import Interrupt, interrupt_after, tiny_config

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


# ------------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize("option, value, expected", [
    ("--lr", "nan", "lr (--lr) must be a number > 0; got nan"),
    ("--epochs", "-1", "epochs (--epochs) must be a number >= 0"),
    ("--label-smoothing", "1", "label_smoothing (--label-smoothing) must be a number in [0, 1)"),
    ("--ema-decay", "1.5", "ema_decay (--ema-decay) must be a number in (0, 1)"),
    ("--clip-grad", "-1", "clip_grad (--clip-grad) must be a number > 0"),
    ("--warmup-epochs", "inf", "warmup_epochs (--warmup-epochs) must be a number >= 0; got inf"),
    ("--batch-size", "0", "batch_size (--batch-size) must be a whole number >= 1"),
    ("--mixup", "-0.5", "mixup_alpha (--mixup) must be a number >= 0"),
])
def test_bad_settings_are_refused_before_any_data_is_read(option, value, expected, tmp_path, capsys):
    # The dataset does not exist: reaching it would give a different error, so the check came first.
    code = main(["train", "--dataset", str(tmp_path / "missing"), option, value, "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert not (tmp_path / "r").exists()


def test_a_batch_larger_than_the_data_says_so(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) is larger than the training data: 32"):
        train(tiny_config(image_folder, tmp_path, data=DataConfig(dataset=str(image_folder), batch_size=32,
                                                                   holdout_size=0, cache_dir=str(tmp_path))))


def test_impossible_method_options_name_the_option(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"keep_ratio must be a number in \(0, 1\]; got 1.5"):
        train(tiny_config(image_folder, tmp_path, model="dynamicvit_vit_cifar_tiny",
                          model_kwargs={"img_size": 16, "depth": 2, "keep_ratio": 1.5}))
    with pytest.raises(ValueError, match=r"grids must be .* each in \[1, 16\] for 16px images; got \[4, 32\]"):
        train(tiny_config(image_folder, tmp_path, model="dvt_vit_cifar_tiny",
                          model_kwargs={"img_size": 16, "depth": 2, "grids": [4, 32]}))


# ------------------------------------------------------------------------------------------ one run per folder
HOLD_LOCK = """
import sys, time
from dyntok.training.lock import claim_output_dir
with claim_output_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(folder) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_in_a_busy_folder_is_refused_and_changes_nothing(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path, epochs=1)
    holder = hold_lock(config.output_dir)
    try:
        with pytest.raises(RunLockedError, match=f"another run \\(pid {holder.pid} on .*\\) is writing to"):
            train(config)
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(config.output_dir) == [LOCK_NAME]


def test_the_lock_of_a_killed_run_is_taken_over(image_folder, tmp_path, caplog):
    config = tiny_config(image_folder, tmp_path, epochs=1)
    holder = hold_lock(config.output_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="dyntok.training.lock"):
        train(config)
    assert f"pid {holder.pid}" in caplog.text and "no longer alive" in caplog.text
    with claim_output_dir(config.output_dir):  # released at the end of the run
        pass


# ------------------------------------------------------------------------------------------ interruptions
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    folder = make_image_folder(root / "tiny")
    return folder, load_file(str(train(tiny_config(folder, root, save_every=2)).model_path))


def interrupt_the_checkpoint_write(patch, writes: int) -> None:
    """Die between writing the temporary file and moving it into place, on the ``writes``-th checkpoint."""
    calls = {"n": 0}

    class DiesOnReplace:
        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, source, target):
            calls["n"] += 1
            if calls["n"] == writes:
                raise Interrupt
            return os.replace(source, target)

    patch.setattr(fileio, "os", DiesOnReplace())


@pytest.mark.parametrize("where", ["step-1", "step-3", "step-5", "checkpoint-write-2"])
def test_interrupted_anywhere_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, monkeypatch, where):
    # 3 steps an epoch, 2 epochs, a checkpoint every 2 steps and after each epoch.
    folder, expected = uninterrupted
    config = tiny_config(folder, tmp_path, save_every=2)
    kind, point = where.rsplit("-", 1)
    with monkeypatch.context() as patch:
        if kind == "step":
            interrupt_after(patch, int(point))
        else:
            interrupt_the_checkpoint_write(patch, int(point))
        with pytest.raises(Interrupt):
            train(config)
    if (tmp_path / "run" / "last.safetensors").exists():
        load_tensors(tmp_path / "run" / "last.safetensors")  # whatever was on disk is a complete checkpoint
    config.resume = True
    actual = load_file(str(train(config).model_path))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


# ------------------------------------------------------------------------------------------ non-finite steps
def poison_steps(patch, bad_calls) -> None:
    """Make the loss NaN on the given compute_loss calls (0-based)."""
    original, calls = DenseViT.compute_loss, {"n": 0}

    def compute_loss(self, output, target, criterion):
        loss = original(self, output, target, criterion)
        calls["n"] += 1
        if calls["n"] - 1 in bad_calls:
            return LossOutput(loss.total * float("nan"), loss.terms)
        return loss

    patch.setattr(DenseViT, "compute_loss", compute_loss)


def test_a_non_finite_step_is_skipped_and_reported(image_folder, tmp_path, monkeypatch, caplog):
    poison_steps(monkeypatch, {1, 2})
    with caplog.at_level(logging.WARNING, logger="dyntok.training.trainer"):
        result = train(tiny_config(image_folder, tmp_path, epochs=1))
    assert caplog.text.count("step skipped, weights unchanged") == 2
    assert result.metrics["steps"] == 3
    assert all(torch.isfinite(t).all() for t in load_file(str(result.model_path)).values())


def test_repeated_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint(image_folder, tmp_path, monkeypatch):
    poison_steps(monkeypatch, set(range(3, 100)))  # fine for the first epoch (3 steps), NaN from then on
    with pytest.raises(FloatingPointError, match=f"not finite for {MAX_NONFINITE_STEPS} steps in a row.*"
                                                 "last checkpoint .*last.safetensors is intact"):
        train(tiny_config(image_folder, tmp_path, epochs=4))
    tensors, meta = load_tensors(tmp_path / "run" / "last.safetensors")
    assert meta["progress"]["step"] == 6 and all(torch.isfinite(t).all() for t in tensors.values())


# ------------------------------------------------------------------------------------------ SIGTERM and DDP
def long_run_command(folder, out, *extra):
    return [sys.executable, "-m", "dyntok", "train", "--dataset", str(folder), "--batch-size", "8", "--holdout-size",
            "0", "--epochs", "500", "--no-progress", "--save-every", "2", "--output-dir", str(out),
            "--model-arg", "img_size=16", "--model-arg", "depth=1", "--model-arg", "embed_dim=32",
            "--model-arg", "num_heads=2", *extra]


def wait_for(path, process, seconds=120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), "the run never wrote a checkpoint"


@pytest.mark.slow
def test_sigterm_says_which_checkpoint_is_intact(image_folder, tmp_path):
    run = subprocess.Popen(long_run_command(image_folder, tmp_path / "run"), env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "run" / "last.safetensors", run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "last.safetensors is intact" in err and "--resume" in err
    assert "torchrun" not in err  # one process alone: no talk of failed workers
    load_tensors(tmp_path / "run" / "last.safetensors")


DDP_RUN = """
import os, sys
from dyntok.cli import main
open(os.path.join(sys.argv[1], "pid" + os.environ["RANK"]), "w").write(str(os.getpid()))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_dead_ddp_worker_ends_the_run_clearly_and_resume_finishes_it(image_folder, tmp_path):
    def torchrun(*extra):
        command = long_run_command(image_folder, tmp_path / "run", "--epochs", "40", *extra)[3:]  # after "-m dyntok"
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--no-python",
                                 sys.executable, "-c", DDP_RUN, str(tmp_path), *command],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    run = torchrun()
    wait_for(tmp_path / "run" / "last.safetensors", run)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
    output, _ = run.communicate(timeout=60)  # a hang fails here, after a minute
    assert run.returncode != 0
    assert "rank      : 1" in output and "SIGKILL" in output  # torchrun names the worker that died
    assert "dyntok: rank 0" in output and "last.safetensors is intact" in output  # the survivor says how to go on
    resumed = torchrun("--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 40 * 24 // 8


# ------------------------------------------------------------------------------------------ the benchmark
def points(results) -> dict[str, list[tuple[float, float]]]:
    """What a benchmark measured that does not depend on timing: accuracy and GMACs of every point."""
    return {entry["name"]: [(point["top1"], point["mean_gmacs"]) for point in entry["points"]]
            for entry in results["entries"]}


@pytest.fixture(scope="module")
def bench_reference(tmp_path_factory):
    from dyntok.bench import runner
    from dyntok.bench.spec import parse_spec

    from .test_bench_cache import tiny_spec

    root = tmp_path_factory.mktemp("bench")
    dataset = make_image_folder(root / "tiny", per_class=8)
    spec = parse_spec(tiny_spec(dataset, root / "decoded"))
    return dataset, points(runner.run_benchmark(spec, root / "report", progress=False))


@pytest.mark.parametrize("where", ["training-step-2", "evaluation-2"])
def test_an_interrupted_benchmark_finishes_with_the_uninterrupted_results(bench_reference, tmp_path, monkeypatch,
                                                                         where):
    from dyntok.bench import runner
    from dyntok.bench.spec import parse_spec

    from .test_bench_cache import tiny_spec

    dataset, expected = bench_reference
    spec = parse_spec(tiny_spec(dataset, tmp_path / "decoded"))
    with monkeypatch.context() as patch:
        if where.startswith("training"):
            interrupt_after(patch, 2)  # inside the second entry (DynamicViT trains after dense)
        else:
            original, calls = runner._evaluate_point, {"n": 0}

            def evaluate_point(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise Interrupt
                return original(*args, **kwargs)

            patch.setattr(runner, "_evaluate_point", evaluate_point)
        with pytest.raises(Interrupt):
            runner.run_benchmark(spec, tmp_path / "report", progress=False)
    assert points(runner.run_benchmark(spec, tmp_path / "report", progress=False)) == expected
