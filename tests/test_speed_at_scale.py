"""The speed-at-scale benchmark's logic on tiny models (no timing is asserted: speed is never tested)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

import dyntok
from tests.conftest import REPO_ROOT, TINY, tiny_model


def load_script():
    spec = importlib.util.spec_from_file_location("speed_at_scale", REPO_ROOT / "benchmarks" / "speed_at_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_is_timed_at_its_speed_budgets_with_finite_ratios(tmp_path):
    script = load_script()
    results = script.main(["--sizes", "vit_cifar_tiny", "--batch", "2", "--repeats", "1", "--latency-images", "1",
                           "--output", str(tmp_path)], backbone_overrides=TINY)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["rows"] == json.loads(json.dumps(results["rows"]))
    assert {row["method"] for row in written["rows"]} == set(dyntok.list_methods())
    for row in written["rows"]:
        for key in ("mac_reduction", "speedup", "realised", "latency_ratio", "latency_realised"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], row["budget"], key)
        assert row["realised"] == pytest.approx(row["speedup"] / row["mac_reduction"])
    report = (tmp_path / "README.md").read_text()
    assert "## vit_cifar_tiny" in report and written["environment"]["torch"] in report
    assert report.count("\n| ") == len(written["rows"]) + 2  # header, rule, one line per row


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
