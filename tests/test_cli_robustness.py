"""The command line under bad input: every sub-command, a generated catalogue of bad values in each class
of docs/reliability.md, one line naming the option or file, a non-zero exit, nothing written, bounded memory.

Each case calls ``dyntok.cli.main`` in-process with captured stderr (fast); a few run ``python -m dyntok`` for
the real boundary (exit code, stderr of a fresh interpreter, Ctrl-C).
"""
from __future__ import annotations

import errno
import json
import math
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import save_file

from dyntok import fileio
from dyntok.cli import main
from dyntok.fileio import load_tensors
from dyntok.methods import save_model
from dyntok.models import hub, limits

from .conftest import REPO_ROOT, make_image_folder, tiny_model

TINY_ARGS = ["--model-arg", "img_size=16", "--model-arg", "depth=2", "--model-arg", "embed_dim=32",
             "--model-arg", "num_heads=2"]
#: Cases run per generated test: enough to cover every kind of bad value, quick on 2 busy cores.
CASES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
#: Resident memory a refused input may add to the test process at most.
MEMORY_BOUND = 512 * 2 ** 20


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def refused(argv: list[str], capsys, *named: str) -> str:
    """Run ``dyntok argv``; assert a non-zero exit, no traceback, one short message naming ``named``."""
    before = peak_rss()
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse refuses a value it parses itself
        code = exit_info.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 8, err
    for name in named:
        assert name in err, (name, err)
    assert peak_rss() - before < MEMORY_BOUND
    return err


def nothing_in(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ------------------------------------------------------------------------------ 1. sizes from untrusted places
#: Bad values of each backbone setting: wrong types, out of range, absurd.
_NOT_A_NUMBER = st.one_of(st.text(min_size=1, max_size=8).filter(lambda s: s.strip() and not _is_json_number(s)),
                          st.lists(st.integers(), min_size=3, max_size=4), st.just({"a": 1}))


def _is_json_number(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (int, float))
    except ValueError:
        return False


def _bad_whole(low: int, high: int):
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1, max_value=10 ** 12),
                     st.floats(allow_nan=True).filter(lambda x: not float(x).is_integer()), _NOT_A_NUMBER)


BAD_BACKBONE_VALUES = {
    "depth": _bad_whole(1, 1024),
    "embed_dim": _bad_whole(1, 65536),
    "num_heads": _bad_whole(1, 1024),
    "patch_size": _bad_whole(1, 1024),
    "img_size": _bad_whole(1, 16384),
    "num_classes": _bad_whole(1, 10_000_000),
    "mlp_ratio": st.one_of(st.floats(max_value=0), st.floats(min_value=257), st.just(math.nan), _NOT_A_NUMBER),
    "drop_path_rate": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1), _NOT_A_NUMBER),
}


def model_arg(key: str, value) -> list[str]:
    return ["--model-arg", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]


@CASES
@given(data=st.data())
def test_bad_model_args_are_refused_before_any_data_is_read(data, tmp_path, capsys):
    key = data.draw(st.sampled_from(sorted(BAD_BACKBONE_VALUES)))
    value = data.draw(BAD_BACKBONE_VALUES[key])
    out = tmp_path / f"run-{time.monotonic_ns()}"
    # The dataset does not exist: the model's error must come first, naming the option.
    refused(["train", "--dataset", str(tmp_path / "no-such-data"), "--output-dir", str(out), *model_arg(key, value)],
            capsys, "--model-arg", key)
    assert not out.exists()


SHAPES = st.one_of(
    # widths the heads do not divide
    st.tuples(st.integers(2, 64), st.integers(1, 64)).filter(lambda p: (p[0] * 8 + 1) % p[1])
    .map(lambda p: {"embed_dim": p[0] * 8 + 1, "num_heads": p[1]}),
    # images the patches do not tile
    st.integers(2, 8).flatmap(lambda patch: st.integers(patch + 1, 200).filter(lambda side: side % patch)
                              .map(lambda side: {"img_size": side, "patch_size": patch})),
    # absurd totals out of settings each in range
    st.tuples(st.integers(300, 1024), st.integers(4096, 65536))
    .map(lambda p: {"depth": p[0], "embed_dim": p[1] - p[1] % 16, "num_heads": 16}),
    st.integers(1, 2).map(lambda patch: {"img_size": 16384 - 16384 % patch, "patch_size": patch}),
)


@CASES
@given(shape=SHAPES, method=st.sampled_from(["dense", "dynamicvit", "dvt", "tome", "adavit"]))
def test_malformed_or_huge_models_are_refused_by_name(shape, method, tmp_path, capsys):
    out = tmp_path / f"run-{time.monotonic_ns()}"
    args = [arg for key, value in shape.items() for arg in model_arg(key, value)]
    err = refused(["train", "--method", method, "--dataset", str(tmp_path / "no-such-data"), "--output-dir", str(out),
                   *args], capsys, "--model-arg")
    assert any(word in err for word in ("divisible", "multiple", "--allow-large-model")), err
    assert not out.exists()


def test_the_size_bound_lets_published_vits_through_and_can_be_lifted(monkeypatch):
    for name in ("deit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"):
        limits.check_backbone(name, {})
    giant = {"embed_dim": 8192, "depth": 64, "num_heads": 64}
    with pytest.raises(ValueError, match="--allow-large-model.*DYNTOK_ALLOW_LARGE_MODEL=1"):
        limits.check_backbone("vit_base_patch16_224", giant)
    monkeypatch.setenv(limits.ALLOW_LARGE_ENV, "1")
    limits.check_backbone("vit_base_patch16_224", giant)


def test_allow_large_model_reaches_the_bound(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(limits.ALLOW_LARGE_ENV, raising=False)
    huge = ["--model-arg", "embed_dim=8192", "--model-arg", "depth=64", "--model-arg", "num_heads=64"]
    base = ["train", "--dataset", str(tmp_path / "no-such-data"), "--output-dir", str(tmp_path / "run"), *huge]
    refused(base, capsys, "--allow-large-model")
    # With the option the model passes the bound; the missing dataset is then what stops the run.
    err = refused([*base, "--allow-large-model"], capsys, "no-such-data")
    assert "--allow-large-model" not in err


def hostile_checkpoint(path: Path, meta) -> Path:
    """A dyntok-format file whose header describes ``meta`` (any JSON text or value), with no weights."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "dyntok/1", "meta": text})
    return path


def model_meta(**changes) -> dict:
    config = tiny_model("dense").config
    backbone = {**config["backbone"], "overrides": {**config["backbone"]["overrides"], **changes.pop("overrides", {})}}
    return {"kind": "model", "config": {**config, "backbone": backbone, **changes}, "budget": {}}


HOSTILE_METAS = st.one_of(
    st.integers(2_000, 200_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(2_000, 200_000).map(lambda depth: '{"kind": "model", "config": ' + '{"a": ' * depth + "1"
                                    + "}" * depth + "}"),
    st.sampled_from(sorted(BAD_BACKBONE_VALUES)).flatmap(
        lambda key: BAD_BACKBONE_VALUES[key].filter(lambda v: not isinstance(v, float) or math.isfinite(v))
        .map(lambda value: model_meta(overrides={key: value}))),
    SHAPES.map(lambda shape: model_meta(overrides=shape)),
    st.sampled_from([model_meta(method="nosuch"), model_meta(method=["dense"]), model_meta(backbone="vit"),
                     model_meta(method_kwargs=[1]), model_meta(method_kwargs={"keep_ratio": 0.5}),
                     model_meta(overrides={"dynamic_img_size": True}), {"kind": "model", "config": None}]),
    st.one_of(st.integers(), st.text(max_size=4), st.fixed_dictionaries({"holdout_size": st.floats(1.5, 1e9)}),
              st.fixed_dictionaries({"holdout_size": st.integers(1, 9), "seed": st.text(max_size=3)}))
    .map(lambda split: {**model_meta(), "holdout_split": split}),
)


@CASES
@given(meta=HOSTILE_METAS, command=st.sampled_from(["eval", "show", "labels"]))
def test_hostile_checkpoint_headers_are_refused_naming_the_file(meta, command, tmp_path, capsys):
    assume(command != "labels" or "holdout_split" not in meta)  # labels does not calibrate
    path = hostile_checkpoint(tmp_path / f"model-{time.monotonic_ns()}.safetensors", meta)
    out = tmp_path / f"out-{time.monotonic_ns()}"
    calibrate = ["--calibrate-gmacs", "1"]
    output = {"eval": ["--output", str(out), *calibrate], "show": ["--out", str(out), *calibrate],
              "labels": ["--output", str(out)]}[command]
    refused([command, str(path), "--dataset", str(tmp_path / "no-such-data"), *output], capsys, str(path))
    assert not out.exists()


# ------------------------------------------------------------------------------ 2. settings and options
BAD_TRAIN_OPTIONS = {
    "--lr": st.one_of(st.floats(max_value=0), st.just("nan"), st.just("inf")),
    "--epochs": st.one_of(st.floats(max_value=-1e-9), st.just("nan")),
    "--batch-size": st.integers(max_value=0),
    "--holdout-size": st.one_of(st.floats(1.0001, 1e6).filter(lambda x: not x.is_integer()),
                                st.floats(max_value=-1e-9), st.just("nan"), st.just("-3")),
    "--label-smoothing": st.one_of(st.floats(min_value=1), st.floats(max_value=-1e-9)),
    "--ema-decay": st.one_of(st.floats(min_value=1), st.floats(max_value=0)),
    "--mixup": st.floats(max_value=-1e-9),
    "--randaugment": st.one_of(st.tuples(st.integers(0, 16), st.integers(31, 10 ** 6)),
                               st.tuples(st.integers(max_value=-1), st.integers(0, 30)),
                               st.tuples(st.integers(17, 10 ** 6), st.integers(0, 30))),
    "--save-every": st.integers(max_value=-1),
}


@CASES
@given(data=st.data())
def test_bad_training_options_are_refused_by_name(data, tmp_path, capsys):
    option = data.draw(st.sampled_from(sorted(BAD_TRAIN_OPTIONS)))
    value = data.draw(BAD_TRAIN_OPTIONS[option])
    values = [str(part) for part in value] if isinstance(value, tuple) else [str(value)]
    out = tmp_path / f"run-{time.monotonic_ns()}"
    refused(["train", "--dataset", str(tmp_path / "no-such-data"), "--output-dir", str(out), option, *values],
            capsys, option)
    assert not out.exists()


@CASES
@given(option=st.sampled_from(["--model-arg", "--budget"]),
       pair=st.one_of(st.text(max_size=6).filter(lambda s: "=" not in s),
                      st.integers(2_000, 50_000).map(lambda depth: "a=" + "[" * depth + "]" * depth)))
def test_malformed_key_value_pairs_are_refused(option, pair, tmp_path, capsys):
    command = ["eval", str(tmp_path / "model.safetensors")] if option == "--budget" else ["train"]
    refused([*command, "--dataset", str(tmp_path / "no-such-data"), option, pair], capsys)


def test_every_option_an_error_message_advises_exists():
    """Options quoted in messages must be real ones (``--image-size`` was advised when no command had it)."""
    import re

    from dyntok.cli import build_parser

    parser = build_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    for sub in parser._subparsers._group_actions[0].choices.values():
        known |= {option for action in sub._actions for option in action.option_strings}
    quoted = set()
    for source in (REPO_ROOT / "dyntok").rglob("*.py"):
        for string in re.findall(r'f?"[^"\n]*"', source.read_text()):
            quoted |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", string))
    assert quoted - known - {"--nproc"} == set()  # torchrun's --nproc_per_node


# ------------------------------------------------------------------------------ 3. benchmark specs
def minimal_spec() -> dict:
    return {"name": "mini", "backbone": "vit_cifar_micro", "data": {"dataset": "cifar10", "batch_size": 32},
            "train": {"epochs": 1},
            "entries": [{"name": "dense", "model": "{backbone}"},
                        {"name": "dynamicvit", "model": "dynamicvit_{backbone}", "init": "dense",
                         "budgets": [{"keep_ratio": 0.5}]},
                        {"name": "dvt", "model": "dvt_{backbone}", "budgets": [{"calibrate": {"q": 0.5}}]}]}


SPEC_MUTATIONS = st.one_of(
    st.from_regex(r"[a-z]{3,8}", fullmatch=True).filter(lambda m: m not in ("dense", "dvt", "tome", "evit", "revit"))
    .map(lambda method: ("entries[2].model", lambda spec: spec["entries"][2].update(model=f"{method}_{{backbone}}"))),
    st.one_of(st.floats(max_value=0), st.floats(min_value=1.0001), st.just("half"))
    .map(lambda ratio: ("entries[1].budgets[0]", lambda spec: spec["entries"][1].update(
        budgets=[{"keep_ratio": 0.5}, {"keep_ratio": ratio}][-1:]))),
    st.text(min_size=1, max_size=8).filter(lambda k: k != "keep_ratio")
    .map(lambda knob: ("entries[1].budgets[0]", lambda spec: spec["entries"][1].update(budgets=[{knob: 0.5}]))),
    st.sampled_from(["gmac", "Q", "accuracy"])
    .map(lambda target: ("entries[2].budgets[0].calibrate",
                         lambda spec: spec["entries"][2].update(budgets=[{"calibrate": {target: 1.0}}]))),
    SHAPES.map(lambda shape: ("entries[0].model_kwargs", lambda spec: spec["entries"][0].update(model_kwargs=shape))),
)


@CASES
@given(mutation=SPEC_MUTATIONS)
def test_impossible_specs_fail_the_dry_run_naming_the_field(mutation, tmp_path, capsys):
    field, mutate = mutation
    spec = minimal_spec()
    mutate(spec)
    path = tmp_path / f"spec-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / f"report-{time.monotonic_ns()}"
    refused(["bench", "--spec", str(path), "--output", str(out), "--dry-run"], capsys, field)
    assert not out.exists()


def test_a_deeply_nested_spec_is_refused(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * 20_000 + "]" * 20_000 + "\n")
    refused(["bench", "--spec", str(path), "--output", str(tmp_path / "report"), "--dry-run"], capsys, str(path))


# ------------------------------------------------------------------------------ weights in another dtype
def test_a_weight_in_another_dtype_is_refused_by_name(tmp_path, capsys):
    path = save_model(tiny_model("dense"), tmp_path / "model.safetensors")
    tensors, meta = load_tensors(path)
    tensors["vit.cls_token"] = tensors["vit.cls_token"].double()
    fileio.save_tensors(path, tensors, meta)
    refused(["eval", str(path), "--no-speed"], capsys, str(path), "vit.cls_token torch.float64 instead of torch.float32")


# ------------------------------------------------------------------------------ full disk, Ctrl-C, read-only
@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DYNTOK_CACHE", str(tmp_path / "cache"))
    return make_image_folder(tmp_path / "tiny")


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", str(data), "--batch-size", "8", "--holdout-size", "0", "--epochs", "2",
            "--output-dir", str(out), "--no-progress", *TINY_ARGS, *extra]


def test_a_full_disk_seen_by_safetensors_is_one_line_and_keeps_the_checkpoint(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original, writes = fileio.save_file, {"n": 0}

    def full_on_second_write(*args, **kwargs):
        writes["n"] += 1
        if writes["n"] == 2:  # safetensors reports I/O errors with its own class, not OSError
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(*args, **kwargs)

    monkeypatch.setattr(fileio, "save_file", full_on_second_write)
    err = refused(train_argv(folder, out), capsys, "No space left on device", "the previous last.safetensors is intact")
    assert "[Errno" not in err
    assert load_tensors(out / "last.safetensors")[1]["progress"]["epoch"] == 1
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_ctrl_c_names_the_intact_checkpoint_and_resume_finishes(folder, tmp_path, capsys, monkeypatch):
    from dyntok.training import trainer

    out = tmp_path / "run"
    original, steps = trainer.Trainer._train_step, {"n": 0}

    def interrupted_in_epoch_two(self, *args):
        steps["n"] += 1
        if steps["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(trainer.Trainer, "_train_step", interrupted_in_epoch_two)
    code = main(train_argv(folder, out))
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT and "Traceback" not in err
    assert "interrupted (Ctrl-C)" in err and f"{out / 'last.safetensors'} is intact" in err and "--resume" in err
    monkeypatch.setattr(trainer.Trainer, "_train_step", original)
    assert main(train_argv(folder, out, "--resume")) == 0


@pytest.mark.parametrize("failure", ["under a file", "read-only"])
def test_an_unwritable_output_folder_is_refused_before_any_data_is_read(failure, tmp_path, capsys, monkeypatch):
    # Tests run as root, whom permissions do not stop: a path under a file, or a mocked read-only file system.
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    if failure == "read-only":
        out = tmp_path / "run"

        def read_only(*args, dir=None, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))

        monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    refused(["train", "--dataset", str(tmp_path / "no-such-data"), "--output-dir", str(out)], capsys,
            f"--output-dir {out} cannot be written")


def test_an_unwritable_benchmark_folder_is_refused_by_its_option(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(minimal_spec()))
    for option in ("--output", "--cache-dir"):
        folders = {"--output": tmp_path / "report", "--cache-dir": tmp_path / "cache", option: tmp_path / "file" / "x"}
        refused(["bench", "--spec", str(spec), *[part for pair in folders.items() for part in map(str, pair)]],
                capsys, f"{option} {tmp_path / 'file' / 'x'} cannot be written")


def test_an_unwritable_cache_folder_only_costs_the_cache(folder, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):  # what safetensors raises on a read-only file system
        raise SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")

    monkeypatch.setattr("safetensors.torch.save_file", read_only)  # the decode cache's writer, not checkpoints'
    with pytest.warns(UserWarning, match="Could not write the decode cache.*Read-only file system"):
        assert main(train_argv(folder, tmp_path / "run", "--epochs", "1")) == 0
    assert not list((tmp_path / "cache").glob("**/*.safetensors"))


def test_offline_hub_is_said_plainly_and_quickly(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "_probe", lambda host: calls.append(host) or f"{host} cannot be reached (timed out)")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import dyntok

    with pytest.raises(hub.HubUnavailableError, match="cannot download vit_cifar_micro.safetensors from hub "
                                                      "repository 'dyntok-test/none': huggingface.co cannot be reached"):
        dyntok.create_model("vit_cifar_micro", pretrained="hf-hub:dyntok-test/none")
    assert calls == ["huggingface.co"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = refused(["train", "--model", "deit_tiny_patch16_224", "--model-arg", "pretrained=true", "--holdout-size", "0", "--batch-size", "8",
                   "--dataset", str(make_image_folder(tmp_path / "tiny")), "--output-dir", str(tmp_path / "run")],
                  capsys, "cannot download timm's weights for deit_tiny_patch16_224: HF_HUB_OFFLINE is set",
                  "pretrained_file=PATH")
    assert len(calls) == 1


# ------------------------------------------------------------------------------ the real boundary
def dyntok_process(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dyntok", *argv], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300, **kwargs)


def test_a_fresh_process_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    argv = ["train", "--dataset", str(tmp_path / "none"), "--model-arg", "depth=abc", "--output-dir",
            str(tmp_path / "run")]
    result = dyntok_process(*argv)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "dyntok train: error: model 'vit_cifar_tiny' (--model, --method, --model-arg): depth must be a whole number "
        "in [1, 1024]; got 'abc'"]
    debug = dyntok_process(*argv, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "depth must be a whole number" in debug.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ctrl_c_in_a_real_process(tmp_path):
    data, out = make_image_folder(tmp_path / "tiny", per_class=40), tmp_path / "run"
    argv = train_argv(data, out, "--epochs", "200", "--batch-size", "4")
    # A suite started as a background job (`cmd &` in a script) hands its children SIGINT ignored, and Python
    # installs no Ctrl-C handler for an ignored signal: give the child the default back, as a terminal would.
    run = subprocess.Popen([sys.executable, "-m", "dyntok", *argv], stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                           env={**__import__("os").environ, "DYNTOK_CACHE": str(tmp_path / "cache")},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "last.safetensors").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGINT and "Traceback" not in err
    assert "interrupted (Ctrl-C)" in err and "last.safetensors is intact" in err
    load_tensors(out / "last.safetensors")
