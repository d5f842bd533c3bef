"""Reports from a made-up results.json: leaderboard numbers, Pareto front, plots and the README table."""
from __future__ import annotations

import json

import pytest

from dyntok.cli import main
from dyntok.report import leaderboard_rows, load_results, pareto_front, render_leaderboard, render_report
from dyntok.report.leaderboard import render_table
from dyntok.report.readme import END_MARKER, START_MARKER, replace_between_markers, update_readme


def made_up_results() -> dict:
    def point(label, top1, gmacs, speedup=None, latency_speedup=None):
        return {"label": label, "knobs": {}, "top1": top1, "mean_gmacs": gmacs, "speedup": speedup,
                "throughput": None if speedup is None else 1000 * speedup, "latency_speedup": latency_speedup}

    return {
        "format": "dyntok-bench/1",
        "spec": {"name": "made-up"},
        "dataset": {"name": "cifar10", "source": "test data", "test_images": 100},
        "backbone": "vit_cifar_micro",
        "reference": "dense",
        "speed": {"device": "cpu", "dtype": "float32", "batch_size": 64, "images": 1024, "repeats": 5},
        "environment": {"device": "cpu", "cpu": "Test CPU", "cores": 2, "torch": "2.x", "timm": "1.x",
                        "dyntok": "0.1.0", "python": "3.11", "gpu": None},
        "entries": [
            {"name": "dense", "kind": "reference", "model": "vit_cifar_micro", "train": {"epochs": 3, "lr": 0.002},
             "train_seconds": 400.0, "params_m": 0.3, "points": [point("default", 0.80, 1.0, 1.0, 1.0)]},
            {"name": "dyn", "kind": "adaptive", "model": "dynamicvit_vit_cifar_micro", "init": "dense",
             "train": {"epochs": 1, "lr": 0.001}, "train_seconds": 30.0,
             "points": [point("keep_ratio=0.5", 0.75, 0.5, 1.8, 0.9), point("keep_ratio=0.7", 0.79, 0.7, 1.3, 0.8)]},
            {"name": "small", "kind": "static", "model": "vit_cifar_micro", "train": {"epochs": 3},
             "points": [point("default", 0.70, 0.6, 1.5, 1.6)]},
        ],
    }


@pytest.fixture
def report_dir(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(made_up_results()))
    return tmp_path


def test_pareto_front_on_made_up_points():
    points = [(1.0, 0.80), (0.7, 0.79), (0.5, 0.75), (0.6, 0.70), (0.5, 0.60), (1.2, 0.80), (0.4, 0.10)]
    assert pareto_front(points) == [True, True, True, False, False, False, True]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [True, True]  # equal points do not dominate each other
    assert pareto_front([]) == []


def test_leaderboard_rows_and_numbers():
    rows = leaderboard_rows(made_up_results())
    assert [(row.entry, row.knob) for row in rows] == [
        ("dense", "default"), ("dyn", "keep_ratio=0.7"), ("dyn", "keep_ratio=0.5"), ("small", "default")]
    dense, dyn70, dyn50, small = rows
    assert dense.mac_reduction == pytest.approx(1.0) and dense.realised == pytest.approx(1.0)
    assert dyn70.top1 == pytest.approx(79.0) and dyn70.mac_reduction == pytest.approx(1 / 0.7)
    assert dyn70.realised == pytest.approx(1.3 * 0.7)  # speed-up / MAC reduction
    assert dyn50.mac_reduction == pytest.approx(2.0) and dyn50.realised == pytest.approx(0.9)
    assert [row.pareto for row in rows] == [True, True, True, False]
    assert small.kind == "static" and small.latency_speedup == pytest.approx(1.6)


def test_leaderboard_table_columns_and_formatting():
    table = render_table(leaderboard_rows(made_up_results())).splitlines()
    assert table[0] == ("| entry | knob | top-1 (%) | GMACs | MAC reduction | speed-up | realised | "
                        "b=1 speed-up |")
    assert table[2] == "| dense (reference) | default | 80.00* | 1 | 1.00x | 1.00x | 1.00 | 1.00x |"
    assert table[3] == "| dyn | keep_ratio=0.7 | 79.00* | 0.7 | 1.43x | 1.30x | 0.91 | 0.80x |"
    assert table[5] == "| small (static) | default | 70.00 | 0.6 | 1.67x | 1.50x | 0.90 | 1.60x |"


def test_missing_speed_shows_as_not_available():
    results = made_up_results()
    results["entries"][2]["points"][0].update(speedup=None, latency_speedup=None)
    assert "| small (static) | default | 70.00 | 0.6 | 1.67x | n/a | n/a | n/a |" in render_table(
        leaderboard_rows(results))


def test_render_report_writes_leaderboard_and_both_plots(report_dir):
    written = render_report(report_dir)
    assert [path.name for path in written] == ["leaderboard.md", "accuracy_vs_gmacs.png", "accuracy_vs_throughput.png"]
    for path in written[1:]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    leaderboard = written[0].read_text()
    assert leaderboard.startswith("# Benchmark `made-up`: cifar10, vit_cifar_micro")
    assert "Test CPU, 2 cores" in leaderboard and "torch 2.x" in leaderboard
    assert "![accuracy vs gmacs](accuracy_vs_gmacs.png)" in leaderboard
    assert "| dyn | `dynamicvit_vit_cifar_micro` | dense | 1 | 0.001 |" in leaderboard


def test_readme_table_is_replaced_between_the_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# dyntok\n\nintro\n\n{START_MARKER}\nold table\n{END_MARKER}\n\n## Install\n")
    update_readme(readme, made_up_results(), report_link="reports/cpu/leaderboard.md")
    text = readme.read_text()
    assert text.startswith("# dyntok\n\nintro\n\n" + START_MARKER + "\nBenchmark `made-up`")
    assert text.endswith(f"{END_MARKER}\n\n## Install\n") and "old table" not in text
    assert "| dyn | keep_ratio=0.5 | 75.00* |" in text and "(reports/cpu/leaderboard.md)" in text
    again = replace_between_markers(text, "new")
    assert again == f"# dyntok\n\nintro\n\n{START_MARKER}\nnew\n{END_MARKER}\n\n## Install\n"


def test_readme_without_markers_is_an_error():
    with pytest.raises(ValueError, match="no <!-- results:end --> marker"):
        replace_between_markers(f"{START_MARKER}\n", "table")
    with pytest.raises(ValueError, match="comes before"):
        replace_between_markers(f"{END_MARKER}\n{START_MARKER}\n", "table")


def test_report_command_rerenders_and_updates_the_readme(report_dir, capsys):
    readme = report_dir / "README.md"
    readme.write_text(f"{START_MARKER}\n{END_MARKER}\n")
    assert main(["report", str(report_dir), "--readme", str(readme)]) == 0
    assert (report_dir / "leaderboard.md").is_file() and "| small (static) |" in readme.read_text()
    assert "(leaderboard.md)" in readme.read_text()  # the link is relative to the README
    assert main(["report", str(report_dir / "missing")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_load_results_rejects_broken_json(tmp_path):
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(tmp_path)


def test_anytime_accuracy_and_exit_shares_are_reported_for_multi_exit_entries(report_dir):
    results = made_up_results()
    cascade = {"name": "cascade", "kind": "adaptive", "model": "dvt_vit_cifar_micro", "exit_top1": [0.6, 0.7, 0.8],
               "points": [{"label": "q=0.5", "knobs": {}, "top1": 0.78, "mean_gmacs": 0.6,
                           "exit_shares": [0.5, 0.3, 0.2]}]}
    results["entries"].append(cascade)
    results["entries"][0]["exit_top1"] = [0.8]  # single-exit entries stay out of the table
    (report_dir / "results.json").write_text(json.dumps(results))
    leaderboard = render_report(report_dir)[0].read_text()
    assert "## Anytime accuracy" in leaderboard
    assert "| cascade | 60.00 | 70.00 | 80.00 |" in leaderboard
    assert "| cascade | q=0.5 | 50.0 | 30.0 | 20.0 |" in leaderboard
    assert "| dense | 80.00 |" not in leaderboard


def test_oracle_curves_are_tabled_and_plotted_beside_their_entry(report_dir):
    results = made_up_results()
    routed = {"name": "routed", "kind": "adaptive", "model": "revit_vit_cifar_micro",
              "oracle": [{"top1": 0.7, "mean_gmacs": 0.3}, {"top1": 0.9, "mean_gmacs": 0.55}],
              "points": [{"label": "bias=0", "knobs": {}, "top1": 0.78, "mean_gmacs": 0.6},
                         {"label": "bias=1", "knobs": {}, "top1": 0.8, "mean_gmacs": 0.9}]}
    results["entries"].append(routed)
    (report_dir / "results.json").write_text(json.dumps(results))
    leaderboard, *plots = render_report(report_dir)
    text = leaderboard.read_text()
    assert "## Oracle routing" in text
    assert "| routed | 0.3 -> 70.00, 0.55 -> 90.00 | 0.9 -> 80.00 |" in text
    assert "| dyn |" not in text.split("## Oracle routing")[1]  # entries without exits to route stay out
    assert all(path.stat().st_size > 0 for path in plots)


def test_leaderboard_links_each_entrys_gallery():
    results = made_up_results()
    results["entries"][1]["gallery"] = {"label": "keep_ratio=0.7", "figures": {
        "patches": "gallery/dyn/patches.png", "gmacs": "gallery/dyn/gmacs.png"}}
    leaderboard = render_leaderboard(results)
    assert "## Gallery" in leaderboard
    assert ("- **dyn** at keep_ratio=0.7: [patches](gallery/dyn/patches.png) · [gmacs](gallery/dyn/gmacs.png)"
            in leaderboard.splitlines())
    assert "**dense**" not in leaderboard  # entries without pictures get no line
    assert "## Gallery" not in render_leaderboard(made_up_results())


def test_training_curves_read_epochs_over_phases_from_a_card(tmp_path):
    from dyntok.report.curves import curves_table, epoch_curve, plot_training_curves

    # Two phases, the first ending mid-epoch: 100 steps an epoch, records at steps 100, 150, 250, 350.
    card = {"log": [{"phase": "warmup", "epoch": 1, "step": 100, "holdout_top1": 0.5},
                    {"phase": "warmup", "epoch": 2, "step": 150, "holdout_top1": 0.55},
                    {"phase": "main", "epoch": 1, "step": 250, "holdout_top1": 0.6},
                    {"phase": "main", "epoch": 2, "step": 350, "holdout_top1": 0.62}]}
    curve = epoch_curve(card)
    assert [x for x, _ in curve] == [1.0, 1.5, 2.5, 3.5]
    assert [top1 for _, top1 in curve] == pytest.approx([50.0, 55.0, 60.0, 62.0])
    assert epoch_curve({"log": [{"step": 10}]}) == []  # no held-out split logged
    table = curves_table({"m": card}, epochs=(1, 2, 3))
    assert table[2].startswith("| `m` | 50.00 | 55.00 | 60.00 |") and table[2].endswith("| +7.00 |")
    assert plot_training_curves({"m": card}, tmp_path / "c.png", ("ref", 61.0)).stat().st_size > 0
