"""The command line: every --help works, train then eval end to end, and user errors are one clear line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dyntok.cli import SUBCOMMANDS, main
from dyntok.training import TrainConfig

from .conftest import REPO_ROOT

TINY_ARGS = ["--model-arg", "img_size=16", "--model-arg", "depth=2", "--model-arg", "embed_dim=32",
             "--model-arg", "num_heads=2"]


def test_top_level_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "dyntok", "--help"], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0
    for command in SUBCOMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: dyntok " + command in capsys.readouterr().out


def test_train_then_eval(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", str(image_folder), "--batch-size", "8", "--holdout-size", "0",
                 "--epochs", "1", "--output-dir", str(out), "--no-progress", *TINY_ARGS])
    assert code == 0 and (out / "model.safetensors").is_file()
    capsys.readouterr()
    report = tmp_path / "eval.json"
    code = main(["eval", str(out / "model.safetensors"), "--dataset", str(image_folder), "--holdout-size", "0",
                 "--batch-size", "8", "--repeats", "1", "--speed-images", "8", "--latency-images", "2",
                 "--no-progress", "--output", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    assert result["num_images"] == 24 and 0 <= result["top1"] <= 1
    assert result["mean_gmacs"] > 0 and result["mac_reduction"] == pytest.approx(1.0)
    assert result["speed"]["throughput"] > 0 and result["speed"]["dense_throughput"] > 0


def test_train_seed_seeds_data_order_and_augmentation(image_folder, tmp_path, monkeypatch):
    from dyntok.cli import build_parser
    from dyntok.cli.train import config_from_args
    from dyntok.data import build_loaders

    monkeypatch.setenv("DYNTOK_CACHE", str(tmp_path / "cache"))

    def first_epoch(seed: int):
        args = build_parser().parse_args(["train", "--dataset", str(image_folder), "--batch-size", "8",
                                          "--holdout-size", "0", "--seed", str(seed)])
        loader = build_loaders(config_from_args(args).data)["train"]
        loader.set_epoch(0)
        return loader.shard_indices(), next(iter(loader))[0]

    (order, pixels), (same_order, same_pixels), (other_order, _) = first_epoch(3), first_epoch(3), first_epoch(4)
    assert torch.equal(order, same_order) and torch.equal(pixels, same_pixels)
    assert not torch.equal(order, other_order)


@pytest.fixture
def dvt_run(image_folder, tmp_path, monkeypatch):
    """A DVT trained beside 6 held-out images (seed 3): its folder and the loaders it was trained with."""
    from dyntok.data import build_loaders

    monkeypatch.setenv("DYNTOK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--method", "dvt", "--dataset", str(image_folder), "--batch-size", "8",
                 "--holdout-size", "6", "--seed", "3", "--epochs", "1", "--output-dir", str(out), "--no-progress",
                 *TINY_ARGS]) == 0
    return out, build_loaders(TrainConfig.from_dict(json.loads((out / "train_config.json").read_text())).data)


def record_loaders(monkeypatch, module) -> list:
    """Every ``build_loaders`` result of ``module``, in order."""
    from dyntok.data import build_loaders

    seen = []

    def recording(config, *args, **kwargs):
        seen.append(build_loaders(config, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, "build_loaders", recording)
    return seen


def test_calibration_uses_the_held_out_split_the_model_was_trained_beside(dvt_run, image_folder, capsys,
                                                                          monkeypatch):
    from dyntok.cli import evaluate as evaluate_command

    out, trained_on = dvt_run
    seen = record_loaders(monkeypatch, evaluate_command)
    for checkpoint in ("model.safetensors", "last.safetensors"):
        capsys.readouterr()
        code = main(["eval", str(out / checkpoint), "--dataset", str(image_folder), "--batch-size", "8",
                     "--calibrate-gmacs", "1", "--no-speed", "--no-progress"])
        assert code == 0, capsys.readouterr().err
        held_out = seen[-1]["holdout"].dataset.indices
        assert torch.equal(held_out, trained_on["holdout"].dataset.indices)
        assert not set(held_out.tolist()) & set(trained_on["train"].dataset.indices.tolist())
    # Asking for another split is refused: it would hold images the model was trained on.
    code = main(["eval", str(out / "model.safetensors"), "--dataset", str(image_folder), "--holdout-size", "9",
                 "--calibrate-gmacs", "1", "--no-speed", "--no-progress"])
    assert code == 2 and "trained beside a held-out split of 6 images (seed 3)" in capsys.readouterr().err


def test_show_calibrates_on_the_recorded_split_and_another_training_set_is_refused(dvt_run, image_folder, tmp_path,
                                                                                    capsys, monkeypatch):
    from dyntok.fileio import load_meta
    from dyntok.report import gallery

    from .conftest import make_image_folder

    out, trained_on = dvt_run
    for checkpoint in ("model.safetensors", "last.safetensors"):
        assert load_meta(out / checkpoint)["holdout_split"]["fingerprint"] == trained_on["fingerprint"]
    seen = record_loaders(monkeypatch, gallery)
    show = ["show", str(out / "model.safetensors"), "--dataset", str(image_folder), "--calibrate-gmacs", "1",
            "--n", "2", "--out", str(tmp_path / "pictures")]
    assert main(show) == 0, capsys.readouterr().err
    assert torch.equal(seen[-1]["holdout"].dataset.indices, trained_on["holdout"].dataset.indices)
    capsys.readouterr()
    assert main([*show, "--holdout-size", "9"]) == 2
    assert "trained beside a held-out split of 6 images (seed 3)" in capsys.readouterr().err
    # Another training set (other labels) with the same split settings is not the model's held-out split.
    other = make_image_folder(tmp_path / "other", classes=3, per_class=9)
    for command in (["show", *show[1:2], "--dataset", str(other), *show[4:]],
                    ["eval", str(out / "model.safetensors"), "--dataset", str(other), "--calibrate-gmacs", "1",
                     "--no-speed", "--no-progress"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"--dataset {other} is not the training set" in err and "Traceback" not in err


def test_show_writes_the_figures_of_a_saved_model(image_folder, tmp_path, capsys):
    import dyntok

    model = dyntok.create_model("dvt_vit_cifar_tiny", img_size=16, depth=2, embed_dim=32, num_heads=2, num_classes=3)
    dyntok.save_model(model, tmp_path / "model.safetensors")
    code = main(["show", str(tmp_path / "model.safetensors"), "--images", str(image_folder / "test"), "--n", "4",
                 "--budget", "thresholds=[0.0,0.0]", "--out", str(tmp_path / "pictures"), "--device", "cpu"])
    assert code == 0
    assert sorted(path.name for path in (tmp_path / "pictures").iterdir()) == ["exits.png", "gmacs.png"]
    assert "wrote" in capsys.readouterr().out


def test_missing_data_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DYNTOK_DATA", str(tmp_path / "nowhere"))
    code = main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "empty"), "--epochs", "1",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "dyntok train: error:" in err and "--data-root" in err and str(tmp_path / "empty") in err


def test_bad_budget_knob_is_one_clear_error(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--dataset", str(image_folder), "--batch-size", "8", "--holdout-size", "0", "--epochs", "1",
          "--output-dir", str(out), "--no-progress", *TINY_ARGS])
    code = main(["eval", str(out / "model.safetensors"), "--dataset", str(image_folder), "--holdout-size", "0",
                 "--budget", "keep_ratio=0.5", "--no-speed", "--no-progress"])
    assert code == 2 and "no budget knobs" in capsys.readouterr().err


def test_eval_reports_savings_against_the_dense_backbone(image_folder, tmp_path, capsys):
    import dyntok

    model = dyntok.create_model("dynamicvit_vit_cifar_tiny", img_size=16, depth=4, embed_dim=32, num_heads=2,
                                num_classes=3, keep_ratio=0.5)
    dyntok.save_model(model, tmp_path / "model.safetensors")
    dense = dyntok.create_model("vit_cifar_tiny", img_size=16, depth=4, embed_dim=32, num_heads=2, num_classes=3)
    report = tmp_path / "eval.json"
    code = main(["eval", str(tmp_path / "model.safetensors"), "--dataset", str(image_folder), "--holdout-size",
                 "0", "--no-speed", "--no-progress", "--output", str(report)])
    result = json.loads(report.read_text())
    assert code == 0 and result["budget"] == {"keep_ratio": 0.5}
    assert result["dense_gmacs"] == pytest.approx(dense.dense_macs() / 1e9)
    assert result["mac_reduction"] == pytest.approx(result["dense_gmacs"] / result["mean_gmacs"]) and \
        result["mac_reduction"] > 1.2


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`dyntok models --timm | head -1`: the closed pipe is the reader's choice, not an error worth a line."""
    fcntl = pytest.importorskip("fcntl")
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # the listing cannot fit: writes block
    process = subprocess.Popen([sys.executable, "-m", "dyntok", "models", "--timm"], stdout=write_end,
                               stderr=subprocess.PIPE, cwd=REPO_ROOT)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        reader.readline()
    assert process.wait(timeout=120) == 0
    assert process.stderr.read() == b""
