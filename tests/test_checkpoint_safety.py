"""Checkpoints from elsewhere: code hidden in a file never runs, damaged files and mismatches get a clear error,
and a failed write leaves the previous checkpoint as it was."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import dyntok
from dyntok import fileio
from dyntok.fileio import CheckpointError, CheckpointWriteError, load_tensors, save_tensors
from dyntok.methods import load_model, save_model
from dyntok.training.state import check_dense_init
from dyntok.cli import main
from dyntok.training import train

from .conftest import REPO_ROOT, tiny_model
from .test_training import TINY_MODEL, tiny_config

EVIL_PICKLE = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"state_dict": {"vit.cls_token": torch.zeros(1)}, "payload": Payload()}, sys.argv[1])
"""


@pytest.fixture
def evil_pickle(tmp_path):
    """A torch file that runs ``touch <marker>`` when unpickled without ``weights_only``."""
    path, marker = tmp_path / "model.pth", tmp_path / "code-ran"
    subprocess.run([sys.executable, "-c", EVIL_PICKLE, str(path), str(marker)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    return path, marker


def test_code_in_a_pickled_file_never_runs(evil_pickle, image_folder, tmp_path):
    path, marker = evil_pickle
    with pytest.raises(CheckpointError, match="pickled .pt/.pth files are refused"):
        load_model(path)
    with pytest.raises(ValueError, match="would run code while loading"):
        dyntok.create_model("vit_tiny_patch16_224", pretrained_file=str(path), img_size=32, depth=1)
    with pytest.raises(CheckpointError):
        train(tiny_config(image_folder, tmp_path, init=str(path)))
    assert not marker.exists()


def test_tampered_cifar_batch_files_are_never_unpickled(evil_pickle, tmp_path):
    """torchvision's CIFAR files are pickles; torchvision checks their published MD5s before reading them."""
    from dyntok.data.datasets import load_dataset
    from dyntok.data.errors import DatasetNotFoundError

    path, marker = evil_pickle
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(path.read_bytes())
    with pytest.raises(DatasetNotFoundError, match="corrupt"):
        load_dataset("cifar10", "train", data_root=tmp_path / "data")
    assert not marker.exists()


def test_plain_tensor_torch_files_still_load_as_pretrained_weights(tmp_path):
    source = dyntok.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=4)
    path = tmp_path / "weights.pth"
    torch.save(source.vit.state_dict(), path)
    model = dyntok.create_model("vit_tiny_patch16_224", pretrained_file=str(path), img_size=32, depth=1,
                                num_classes=4)
    assert torch.equal(model.vit.pos_embed, source.vit.pos_embed)


@pytest.fixture
def saved(tmp_path):
    return save_model(tiny_model("dense"), tmp_path / "model.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1], ids=["empty", "8-byte-header", "mid-header", "half", "last-byte"])
def test_truncated_files_are_refused_with_the_path(saved, keep):
    data = saved.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) - 1 if keep == -1 else keep)
    saved.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as info:
        load_model(saved)
    assert str(saved) in str(info.value)


def test_random_bytes_and_directories_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(garbage)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path)


def test_foreign_and_damaged_headers_are_refused(tmp_path):
    tensors = {"w": torch.zeros(2)}
    save_file(tensors, tmp_path / "timm.safetensors")
    with pytest.raises(CheckpointError, match="not a dyntok checkpoint"):
        load_model(tmp_path / "timm.safetensors")
    save_file(tensors, tmp_path / "damaged.safetensors", metadata={"format": "dyntok/1", "meta": "{not json"})
    with pytest.raises(CheckpointError, match="damaged dyntok header"):
        load_model(tmp_path / "damaged.safetensors")
    save_tensors(tmp_path / "unknown.safetensors", tensors, {"kind": "model", "config": {"method": "nosuch"}})
    with pytest.raises(CheckpointError, match="cannot build"):
        load_model(tmp_path / "unknown.safetensors")


def test_weights_that_do_not_fit_their_header_are_named(tmp_path):
    model = tiny_model("dense")
    tensors = dict(model.state_dict())
    tensors["vit.head.weight"] = torch.zeros(7, 32)
    del tensors["vit.norm.bias"]
    save_tensors(tmp_path / "edited.safetensors", tensors, {"kind": "model", "config": model.config, "budget": {}})
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "edited.safetensors")
    message = str(info.value)
    assert "vit.head.weight (7, 32) instead of (5, 32)" in message and "missing: vit.norm.bias" in message


# ------------------------------------------------------------------------------------------ mismatches
def test_resume_names_what_differs(image_folder, tmp_path):
    train(tiny_config(image_folder, tmp_path, epochs=1))
    with pytest.raises(ValueError, match="method: 'dense' in the file, 'dynamicvit' here"):
        train(tiny_config(image_folder, tmp_path, model="dynamicvit_vit_cifar_tiny", epochs=1, resume=True))
    with pytest.raises(ValueError, match="embed_dim: 32 in the file, 48 here"):
        train(tiny_config(image_folder, tmp_path, epochs=1, resume=True,
                          model_kwargs={**TINY_MODEL, "embed_dim": 48}))


def test_init_must_be_a_dense_model_of_the_same_backbone(image_folder, tmp_path):
    wrong_classes = save_model(tiny_model("dense", num_classes=7), tmp_path / "seven.safetensors")
    not_dense = save_model(tiny_model("dynamicvit", num_classes=3), tmp_path / "dvit.safetensors")
    with pytest.raises(CheckpointError, match="num_classes: 7 in the file, 3 here"):
        train(tiny_config(image_folder, tmp_path, model="dynamicvit_vit_cifar_tiny", init=str(wrong_classes)))
    with pytest.raises(CheckpointError, match="is a dynamicvit model; it must be a dense model"):
        train(tiny_config(image_folder, tmp_path, model="dynamicvit_vit_cifar_tiny", init=str(not_dense)))
    # Regularisation settings do not change shapes: a dense model trained with drop path is a valid start.
    dense = save_model(tiny_model("dense", num_classes=3, drop_path_rate=0.1), tmp_path / "dense.safetensors")
    check_dense_init(load_model(dense), tiny_model("dynamicvit", num_classes=3), dense)


def test_eval_on_a_dataset_with_other_classes_is_refused(image_folder, tmp_path, capsys):
    path = save_model(tiny_model("dense"), tmp_path / "five.safetensors")  # 5 classes; the folder has 3
    code = main(["eval", str(path), "--dataset", str(image_folder), "--holdout-size", "0", "--no-speed",
                 "--no-progress"])
    assert code == 2 and "predicts 5 classes but" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ file modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_a_plain_open_would_give_them(tmp_path, umask):
    from types import SimpleNamespace

    from dyntok.bench.cache import _write_json
    from dyntok.data.folder import _write_cache

    previous = os.umask(umask)
    try:
        weights = save_model(tiny_model("dense"), tmp_path / "model.safetensors")
        _write_json(tmp_path / "record.json", {"a": 1})
        _write_cache(tmp_path / "decoded.safetensors", torch.zeros(1, 3, 2, 2, dtype=torch.uint8),
                     SimpleNamespace(directory=tmp_path))
    finally:
        os.umask(previous)
    for path in (weights, tmp_path / "record.json", tmp_path / "decoded.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    assert json.loads((tmp_path / "record.json").read_text()) == {"a": 1}


# ------------------------------------------------------------------------------------------ failed writes
def test_a_failed_write_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = save_model(tiny_model("dense"), tmp_path / "last.safetensors")
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "save_file", disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*the previous last.safetensors is intact"):
        save_model(tiny_model("dense", depth=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temporary file left behind
    with pytest.raises(CheckpointWriteError, match="no fresh.safetensors was written"):
        save_model(tiny_model("dense"), tmp_path / "fresh.safetensors")


def test_training_stops_on_a_full_disk_and_resumes_from_the_intact_checkpoint(image_folder, tmp_path, monkeypatch):
    config = tiny_config(image_folder, tmp_path, epochs=2)
    original, writes = fileio.save_file, {"n": 0}

    def fails_second_time(*args, **kwargs):
        writes["n"] += 1
        if writes["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(fileio, "save_file", fails_second_time)
        with pytest.raises(CheckpointWriteError, match="previous last.safetensors is intact"):
            train(config)
    _, meta = load_tensors(tmp_path / "run" / "last.safetensors")
    assert meta["progress"]["epoch"] == 1
    config.resume = True
    assert train(config).metrics["steps"] == 6


def test_cli_reports_a_failed_write_in_one_line(image_folder, tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "save_file", disk_full)
    code = main(["train", "--dataset", str(image_folder), "--batch-size", "8", "--holdout-size", "0", "--epochs", "1",
                 "--output-dir", str(tmp_path / "run"), "--no-progress", "--model-arg", "img_size=16",
                 "--model-arg", "depth=1", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2"])
    err = capsys.readouterr().err
    assert code == 2 and "dyntok train: error:" in err and "No space left on device" in err
    assert "Traceback" not in err and json.loads((tmp_path / "run" / "train_config.json").read_text())
