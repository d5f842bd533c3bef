"""The benchmark's cache: keys follow the training settings, finished work is reused, interrupted work resumed.

Training is replaced by a stub that saves a freshly built model, so these tests check the runner's
bookkeeping in seconds; ``test_benchmark_end_to_end`` (slow) runs the real trainer on a tiny dataset.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dyntok
from dyntok.bench import plan as bench_plan
from dyntok.bench import runner
from dyntok.bench.cache import EntryCache, training_key
from dyntok.bench.plan import ModelCost, entry_caches, train_config
from dyntok.bench.spec import parse_spec
from dyntok.methods import save_model
from dyntok.training.trainer import TrainResult

#: A 4x4-token backbone of width 32: every model of the spec builds and runs in milliseconds.
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """3 classes x 8 training and 4 test images of 16x16 pixels, in an image-folder tree."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for label in range(3):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = (rng.random((16, 16, 3)) * 80 + 80 * label).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def tiny_spec(dataset: Path, cache_dir: Path, dvt_sweep: bool = False, extra_entries: tuple = ()) -> dict:
    """Dense, DynamicViT from dense, and DVT at one calibrated point (or its whole sweep: slower to time)."""
    dvt_budget = {} if dvt_sweep else {"budgets": [{"calibrate": {"q": 1.0}}]}
    return {
        "name": "tiny", "backbone": "vit_cifar_micro", "device": "cpu",
        "data": {"dataset": str(dataset), "batch_size": 4, "holdout_size": 6, "cache_dir": str(cache_dir)},
        "train": {"epochs": 0.25, "warmup_epochs": 0},
        "speed": {"batch_size": 4, "images": 8, "latency_images": 2, "repeats": 1, "warmup": 0},
        "entries": [
            {"name": "dense", "model": "{backbone}", "model_kwargs": TINY},
            {"name": "dynamicvit", "model": "dynamicvit_{backbone}", "model_kwargs": TINY, "init": "dense",
             "budgets": [{"keep_ratio": 0.5}, {"keep_ratio": 1.0}]},
            {"name": "dvt", "model": "dvt_{backbone}", "model_kwargs": TINY, **dvt_budget},
            *extra_entries,
        ],
    }


@pytest.fixture
def stub_training(monkeypatch):
    """Replace the trainer (and the timing probe) with instant stand-ins; returns the configs trained."""
    trained = []

    def fake_train(config):
        trained.append(config)
        model = dyntok.create_model(config.model, **config.model_kwargs)
        path = save_model(model, Path(config.output_dir) / "model.safetensors")
        return TrainResult(Path(config.output_dir), path, {"test": {"top1": 0.5}})

    monkeypatch.setattr(runner, "train", fake_train)
    monkeypatch.setattr(bench_plan, "probe_cost", lambda spec, entry, *args, **kwargs: ModelCost(
        0.01, 0.001, 0.001, len(entry.budgets) if entry.budgets else 1))
    return trained


# ------------------------------------------------------------------------------------------ keys
def keys(values: dict) -> dict[str, str]:
    spec = parse_spec(values)
    return {name: cache.key for name, cache in entry_caches(spec, list(spec.entries), "cache").items()}


def test_key_is_stable_and_follows_training_settings(tmp_path):
    values = tiny_spec(tmp_path / "data", tmp_path / "decoded")
    before = keys(values)
    assert keys(values) == before

    values["entries"][2]["train"] = {"lr": 0.01}
    after = keys(values)
    assert after["dvt"] != before["dvt"] and after["dense"] == before["dense"]

    values["train"]["epochs"] = 0.5  # the default every entry inherits
    assert all(keys(values)[name] != after[name] for name in after)


def test_key_follows_the_dense_init_and_the_data(tmp_path):
    values = tiny_spec(tmp_path / "data", tmp_path / "decoded")
    before = keys(values)
    values["entries"][0]["model_kwargs"] = {**TINY, "depth": 3}
    after = keys(values)
    # dynamicvit starts from dense, so retraining dense invalidates it; dvt trains from scratch.
    assert after["dense"] != before["dense"] and after["dynamicvit"] != before["dynamicvit"]
    assert after["dvt"] == before["dvt"]
    values["data"]["batch_size"] = 8
    assert keys(values)["dvt"] != before["dvt"]


def test_key_ignores_where_and_how_a_run_happens(tmp_path):
    spec = parse_spec(tiny_spec(tmp_path / "data", tmp_path / "decoded"))
    entry = spec.entries[0]
    config = train_config(spec, entry)
    moved = train_config(dataclasses.replace(spec, data=dataclasses.replace(spec.data, data_root="/elsewhere")),
                         entry, output_dir="/tmp/x", device="cuda", progress=False)
    assert training_key(config) == training_key(moved)
    assert training_key(config, init_key="abc") != training_key(config)


def test_done_marker_must_match_the_key(tmp_path):
    cache = EntryCache.at(tmp_path, "dense", "k" * 64)
    assert not cache.is_done and not cache.is_started
    cache.folder.mkdir(parents=True)
    cache.model_path.write_bytes(b"weights")
    assert not cache.is_done  # weights without the marker: training may have been cut short
    cache.mark_done({"train_seconds": 1.0})
    assert cache.is_done
    assert not EntryCache(cache.folder, "other" * 8).is_done
    cache.save_eval({"keep_ratio": 0.5}, {"top1": 0.25})
    assert cache.load_eval({"keep_ratio": 0.5}) == {"knobs": {"keep_ratio": 0.5}, "top1": 0.25}
    assert cache.load_eval({"keep_ratio": 0.6}) is None


# ------------------------------------------------------------------------------------------ the runner
def test_finished_entries_are_not_retrained_and_evaluations_are_reused(tiny_dataset, tmp_path, stub_training,
                                                                      monkeypatch):
    spec = parse_spec(tiny_spec(tiny_dataset, tmp_path / "decoded"))
    first = runner.run_benchmark(spec, tmp_path / "report", progress=False)
    assert [config.model for config in stub_training] == [entry.model for entry in spec.entries]
    dense_cache = entry_caches(spec, list(spec.entries), tmp_path / "report" / "cache")["dense"]
    assert stub_training[1].init == str(dense_cache.model_path)  # dynamicvit starts from the cached dense model
    assert all(config.resume for config in stub_training)
    assert all("/" not in entry["cache"] for entry in first["entries"])  # results name no path of this machine

    evaluations = []
    monkeypatch.setattr(runner, "evaluate", lambda *args, **kwargs: evaluations.append(args))
    second = runner.run_benchmark(spec, tmp_path / "report", progress=False)
    assert len(stub_training) == 3 and evaluations == []

    def accuracy(results):
        return [(e["name"], p["label"], p["top1"], p["mean_gmacs"]) for e in results["entries"] for p in e["points"]]
    assert accuracy(second) == accuracy(first)
    assert [e["kind"] for e in first["entries"]] == ["reference", "adaptive", "adaptive"]
    assert first["entries"][2]["points"][0]["label"] == "q=1 (calibrated)"


def test_adding_an_entry_trains_only_that_entry(tiny_dataset, tmp_path, stub_training):
    spec = parse_spec(tiny_spec(tiny_dataset, tmp_path / "decoded"))
    runner.run_benchmark(spec, tmp_path / "report", only=["dynamicvit"], progress=False)
    static = {"name": "patch8", "model": "{backbone}", "model_kwargs": {**TINY, "patch_size": 8}}
    spec = parse_spec(tiny_spec(tiny_dataset, tmp_path / "decoded", extra_entries=(static,)))
    results = runner.run_benchmark(spec, tmp_path / "report", only=["dynamicvit", "patch8"], progress=False)
    assert [config.model for config in stub_training] == ["vit_cifar_micro", "dynamicvit_vit_cifar_micro",
                                                          "vit_cifar_micro"]
    assert stub_training[-1].model_kwargs["patch_size"] == 8
    assert [entry["kind"] for entry in results["entries"]] == ["reference", "adaptive", "static"]


def test_interrupted_entry_is_resumed_in_its_folder(tiny_dataset, tmp_path, stub_training):
    spec = parse_spec(tiny_spec(tiny_dataset, tmp_path / "decoded"))
    report = tmp_path / "report"
    cache = entry_caches(spec, list(spec.entries), report / "cache")["dense"]
    cache.folder.mkdir(parents=True)
    (cache.folder / "last.safetensors").write_bytes(b"a checkpoint of a killed run")
    plan, _ = runner.prepare(spec, report, only=["dense"])
    assert [(item.entry.name, item.status) for item in plan.entries] == [("dense", "resume")]
    runner.run_benchmark(spec, report, only=["dense"], progress=False)
    assert len(stub_training) == 1
    assert stub_training[0].resume and stub_training[0].output_dir == str(cache.folder)


def test_results_json_records_spec_versions_and_machine(tiny_dataset, tmp_path, stub_training):
    spec = parse_spec(tiny_spec(tiny_dataset, tmp_path / "decoded"))
    runner.run_benchmark(spec, tmp_path / "report", only=["dynamicvit"], progress=False)
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert {"torch", "timm", "dyntok", "python", "cpu", "cores", "gpu"} <= set(results["environment"])
    assert results["spec"]["name"] == "tiny" and [e["name"] for e in results["entries"]] == ["dense", "dynamicvit"]
    point = results["entries"][1]["points"][0]
    for key in ("top1", "mean_gmacs", "throughput", "speedup", "latency_ms", "latency_speedup", "mac_reduction",
                "realised_speedup"):
        assert np.isfinite(point[key]), key
    assert point["realised_speedup"] == pytest.approx(point["speedup"] / point["mac_reduction"])
    assert (tmp_path / "report" / "leaderboard.md").is_file()
    gallery = results["entries"][1]["gallery"]  # pictures at the middle budget point, linked from the leaderboard
    assert list(gallery["figures"]) == ["patches", "gmacs"]
    assert all((tmp_path / "report" / path).is_file() for path in gallery["figures"].values())
    assert f"[patches]({gallery['figures']['patches']})" in (tmp_path / "report" / "leaderboard.md").read_text()


@pytest.mark.slow
def test_benchmark_end_to_end(tiny_dataset, tmp_path):
    """The real trainer, one step per phase, every stage of the run; then a re-run that trains nothing."""
    spec = parse_spec(tiny_spec(tiny_dataset, tmp_path / "decoded", dvt_sweep=True))
    results = runner.run_benchmark(spec, tmp_path / "report", progress=False)
    assert [len(entry["points"]) for entry in results["entries"]][:2] == [1, 2]
    assert len(results["entries"][2]["points"]) > 1  # DVT's own sweep, after calibrating on the held-out split
    for name in ("results.json", "leaderboard.md", "accuracy_vs_gmacs.png", "accuracy_vs_throughput.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    plan, _ = runner.prepare(spec, tmp_path / "report")
    assert {item.status for item in plan.entries} == {"cached"}


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_dataset, tmp_path, stub_training, capsys):
    import yaml

    from dyntok.cli import main

    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(tiny_dataset, tmp_path / "decoded")))
    code = main(["bench", "--spec", str(spec_file), "--output", str(tmp_path / "report"), "--dry-run"])
    plan = capsys.readouterr().out
    assert code == 0 and not stub_training and not (tmp_path / "report" / "results.json").exists()
    for entry in ("dense", "dynamicvit", "dvt"):
        assert f"\n{entry} " in plan
    assert "estimated total:" in plan


def test_new_shipped_weights_make_a_new_entry(tmp_path, monkeypatch):
    """A pretrained entry is keyed by its weights file's content: regenerated weights are never mixed up."""
    from dyntok import pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path)
    spec = parse_spec({"name": "p", "backbone": "vit_cifar_micro", "train": {"epochs": 1},
                       "entries": [{"name": "dense", "model": "{backbone}", "pretrained": True}]})
    torch_seed_models = []
    for seed in (0, 1):
        import torch
        torch.manual_seed(seed)
        torch_seed_models.append(dyntok.create_model("vit_cifar_micro"))
    save_model(torch_seed_models[0], tmp_path / "vit_cifar_micro.safetensors")
    first = entry_caches(spec, list(spec.entries), tmp_path / "cache")["dense"].key
    assert entry_caches(spec, list(spec.entries), tmp_path / "cache")["dense"].key == first
    save_model(torch_seed_models[1], tmp_path / "vit_cifar_micro.safetensors")
    assert entry_caches(spec, list(spec.entries), tmp_path / "cache")["dense"].key != first
