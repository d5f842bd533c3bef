"""The speed benchmarks' logic on tiny models (no timing is asserted: speed is never tested)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import dyntok
from dyntok.data import DatasetNotFoundError
from tests.conftest import REPO_ROOT, TINY, tiny_model


def load_script(name: str = "speed_at_scale"):
    """A script of ``benchmarks/`` as a module (its siblings importable, as when it runs)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_every_method(output) -> tuple[dict, dict]:
    """The script on the tiny model, every method: what it returned and what it wrote."""
    results = load_script().main(["--sizes", "vit_cifar_tiny", "--batch", "2", "--repeats", "1",
                                  "--latency-images", "1", "--output", str(output)], backbone_overrides=TINY)
    return results, json.loads((output / "results.json").read_text())


def test_every_method_is_timed_at_its_speed_budgets_with_finite_ratios(tmp_path):
    results, written = run_every_method(tmp_path)
    assert written["rows"] == json.loads(json.dumps(results["rows"]))
    assert {row["method"] for row in written["rows"]} == set(dyntok.list_methods())
    for row in written["rows"]:
        for key in ("mac_reduction", "speedup", "realised", "latency_ratio", "latency_realised"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], row["budget"], key)
        assert row["realised"] == pytest.approx(row["speedup"] / row["mac_reduction"])
    report = (tmp_path / "README.md").read_text()
    assert "## vit_cifar_tiny" in report and written["runs"][0]["environment"]["torch"] in report
    assert report.count("\n| ") == len(written["rows"]) + 2  # header, rule, one line per row


def test_append_replaces_only_the_sizes_and_methods_measured_again(tmp_path):
    _, first = run_every_method(tmp_path)
    load_script().main(["--sizes", "vit_cifar_tiny", "--methods", "evit", "--batch", "2", "--repeats", "1",
                        "--latency-images", "1", "--append", "--output", str(tmp_path)], backbone_overrides=TINY)
    written = json.loads((tmp_path / "results.json").read_text())
    assert len(written["runs"]) == 2 and "--append" in written["runs"][1]["argv"]
    assert [(row["method"], row["budget"]) for row in written["rows"] if row["run"] == 1] == \
        [(row["method"], row["budget"]) for row in first["rows"] if row["method"] == "evit"]
    assert [row for row in written["rows"] if row["run"] == 0] == \
        [row for row in first["rows"] if row["method"] != "evit"]
    report = (tmp_path / "README.md").read_text()
    assert "run 1: `python benchmarks/speed_at_scale.py --sizes vit_cifar_tiny --batch 2" in report
    assert report.count("| evit |") == 2 and "| 2 |" in report


def test_a_report_written_before_runs_were_recorded_is_merged_as_one_run():
    script = load_script()
    old = {"argv": ["--sizes", "deit_small"], "environment": {"torch": "2.14.1"}, "settings": {"batch": 64},
           "rows": [{"size": "deit_small", "method": method, "budget": "b"} for method in ("dvt", "evit")]}
    run = {"argv": ["--append"], "environment": {}, "settings": {}}
    merged = script.merge_results(old, run, [{"size": "deit_small", "method": "evit", "budget": "b2"}])
    assert merged["runs"] == [{key: old[key] for key in ("argv", "environment", "settings")}, run]
    assert [(row["method"], row["budget"], row["run"]) for row in merged["rows"]] == [("dvt", "b", 0),
                                                                                     ("evit", "b2", 1)]


def test_forced_budgets_pin_the_cost_the_label_promises(images):
    by_label = {}
    for method in dyntok.list_methods():
        model = tiny_model(method).eval()
        budgets = model.speed_budgets(images)
        assert budgets and all(isinstance(knobs, dict) for knobs in budgets.values())
        for label, knobs in budgets.items():
            model.set_budget(**knobs)
            by_label[method, label] = (model, model.predict(images))
    dvt, first = by_label["dvt", "all exit at stage 1"]
    assert (first.extras["exit_stage"] == 0).all()
    assert (first.macs == dvt.exit_macs()[0]).all()
    for (method, label), (model, prediction) in by_label.items():
        if "nothing" in label:  # nothing pruned: every image at the model's full token count
            assert prediction.macs.max() <= model.dense_macs() * (1 + 1e-9), method
            assert prediction.macs.min() >= dyntok.create_model("vit_cifar_tiny", **TINY).dense_macs(), method


def test_compile_mode_times_compiled_predictors_and_reports_their_gains(tmp_path):
    script = load_script()
    results = script.main(["--sizes", "vit_cifar_tiny", "--methods", "evit", "--batch", "2", "--repeats", "1",
                           "--latency-images", "1", "--compile", "--output", str(tmp_path)],
                          backbone_overrides=TINY)
    assert results["runs"][0]["settings"]["compile"] is True
    for row in results["rows"]:
        for key in ("compile_gain", "dense_compile_gain", "compiled_speedup", "compile_latency_gain",
                    "dense_compile_latency_gain", "compiled_latency_ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, key
    report = (tmp_path / "README.md").read_text()
    assert "torch.compile(predict)" in report and report.count("| evit |") == 2 * len(results["rows"])


def test_timing_runs_the_shipped_weights_on_a_preset():
    """The method's own trained weights where dyntok ships them, else the method started from the reference."""
    create = load_script().create_for_timing
    timed, shipped = create("dynamicvit", "vit_cifar_micro"), dyntok.create_model("dynamicvit_vit_cifar_micro",
                                                                                  pretrained=True)
    assert not timed.explain and not timed.training
    for (name, value), expected in zip(timed.state_dict().items(), shipped.state_dict().values()):
        assert torch.equal(value, expected), name
    reference = dyntok.create_model("vit_cifar_micro", pretrained=True)
    assert torch.equal(create("tome", "vit_cifar_micro").vit.blocks[0].attn.qkv.weight,
                       reference.vit.blocks[0].attn.qkv.weight)


def test_latency_calibration_reports_where_each_fitted_budget_landed(tmp_path, monkeypatch):
    script = load_script("latency_calibration")

    def no_data(config):
        raise DatasetNotFoundError("no CIFAR-10 here")

    monkeypatch.setattr(script, "build_loaders", no_data)  # falls back to noise images, and says so
    results = script.main(["--sizes", "vit_cifar_nano", "--methods", "dynamicvit", "--batch-sizes", "2",
                           "--shares", "0.5,-100", "--images", "8", "--repeats", "1", "--output", str(tmp_path)])
    fitted, impossible = results["rows"]
    assert {fitted["images"], impossible["images"]} == {"noise"} and fitted["batch"] == 2
    # Far below the fastest budget (or below zero): refused by the fit, and the row says why.
    assert impossible["target_ms"] < impossible["fastest_ms"] <= fitted["target_ms"] <= fitted["slowest_ms"]
    assert "no budget of dynamicvit meets" in impossible["unreachable"] or "positive latency" in impossible["unreachable"]
    assert "unreachable" in fitted or fitted["landed"] == pytest.approx(fitted["measured_ms"] / fitted["target_ms"])
    report = (tmp_path / "README.md").read_text()
    assert report.count("| vit_cifar_nano | noise | dynamicvit | 2 |") == 2
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    # The sweep timed before fitting: every budget's latency and GMACs, beside dense at the same batch size.
    dense, sweep = results["sweeps"]
    assert (dense["method"], sweep["method"]) == ("dense", "dynamicvit") and dense["batch"] == sweep["batch"] == 2
    model = dyntok.create_model("dynamicvit_vit_cifar_nano")
    assert [point["budget"] for point in sweep["points"]] == model.budget_sweep()
    assert all(point["ms"] > 0 and point["gmacs"] > 0 for point in sweep["points"])
    assert min(point["gmacs"] for point in sweep["points"]) < dense["points"][0]["gmacs"]
    assert impossible["fastest_ms"] == min(point["ms"] for point in sweep["points"])
    assert report.count("| dynamicvit | keep_ratio=") == len(sweep["points"])
    assert (tmp_path / "latency_vs_budget.png").stat().st_size > 0
