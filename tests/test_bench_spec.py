"""Benchmark specs: the built-ins parse, every registered method is benchmarked, bad specs say what is wrong."""
from __future__ import annotations

import copy

import pytest
import yaml

import dyntok
from dyntok.bench.plan import select_entries
from dyntok.bench.spec import PROFILES, SpecError, builtin_spec_path, load_spec, parse_spec


def minimal_spec() -> dict:
    return {
        "name": "mini",
        "backbone": "vit_cifar_micro",
        "data": {"dataset": "cifar10", "batch_size": 32},
        "train": {"epochs": 1, "lr": "1e-3"},
        "entries": [
            {"name": "dense", "model": "{backbone}"},
            {"name": "dynamicvit", "model": "dynamicvit_{backbone}", "init": "dense",
             "budgets": [{"keep_ratio": 0.5}, {"keep_ratio": 0.7}]},
            {"name": "dvt", "model": "dvt_{backbone}", "train": {"epochs": 2},
             "budgets": [{"calibrate": {"q": 0.5}}]},
        ],
    }


def error_for(values: dict) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(values)
    return str(caught.value)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_builtin_specs_parse(profile):
    spec = load_spec(builtin_spec_path(profile))
    assert spec.entries and spec.reference in {entry.name for entry in spec.entries}
    assert all(entry.train["epochs"] > 0 or entry.init or entry.pretrained for entry in spec.entries)
    assert spec.source == f"dyntok/bench/specs/{builtin_spec_path(profile).name}"  # no path of this machine


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_registered_method_is_in_the_builtin_spec(profile):
    spec = load_spec(builtin_spec_path(profile))
    benchmarked = {entry.method for entry in spec.entries}
    missing = set(dyntok.list_methods()) - benchmarked
    assert not missing, f"add an entry for {sorted(missing)} to {builtin_spec_path(profile).name}"


def test_builtin_cpu_spec_takes_shipped_methods_as_they_are_and_starts_the_others_from_the_shipped_reference():
    from dyntok.models import PRESETS
    from dyntok.pretrained import shipped_presets

    spec = load_spec(builtin_spec_path("cpu"))
    reference = spec.entry(spec.reference)
    assert reference.pretrained and reference.model == spec.backbone
    adaptive = [entry for entry in spec.entries if entry.method != "dense"]
    shipped = set(shipped_presets())
    assert adaptive and all(entry.pretrained if entry.model in shipped else entry.init == spec.reference
                            for entry in adaptive)
    static = [entry for entry in spec.entries if entry.method == "dense" and entry.name != spec.reference]
    assert all(entry.pretrained for entry in static)
    shapes = {key: PRESETS[spec.backbone][key] for key in ("patch_size", "embed_dim", "depth")}
    assert any(PRESETS[entry.model]["patch_size"] > shapes["patch_size"] for entry in static), "fewer tokens"
    assert any(PRESETS[entry.model]["depth"] < shapes["depth"] for entry in static), "a smaller ViT"


def test_pretrained_entries_train_nothing_unless_from_scratch():
    from dyntok.bench.plan import train_config
    from dyntok.bench.spec import with_references_from_scratch
    from dyntok.training.recipes import RECIPES

    values = minimal_spec()
    values["entries"][0]["pretrained"] = True
    spec = parse_spec(values)
    dense = spec.entry("dense")
    config = train_config(spec, dense)
    assert dense.pretrained and config.epochs == 0 and config.init == "pretrained"
    scratch = with_references_from_scratch(spec).entry("dense")
    config = train_config(spec, scratch)
    assert not scratch.pretrained and config.init is None
    assert (config.epochs, config.lr) == (RECIPES["vit_cifar_micro"].epochs, RECIPES["vit_cifar_micro"].lr)
    assert with_references_from_scratch(spec).entry("dynamicvit") == spec.entry("dynamicvit")


def test_a_shipped_method_from_scratch_follows_its_recipe_from_the_retrained_reference():
    from dyntok.bench.plan import train_config
    from dyntok.bench.spec import with_references_from_scratch
    from dyntok.training.recipes import RECIPES

    values = minimal_spec()
    values["entries"][0]["pretrained"] = True
    values["entries"][1] = {"name": "dynamicvit", "model": "dynamicvit_{backbone}", "pretrained": True}
    spec = parse_spec(values)
    assert train_config(spec, spec.entry("dynamicvit")).epochs == 0
    scratch = with_references_from_scratch(spec).entry("dynamicvit")
    recipe = RECIPES["dynamicvit_vit_cifar_micro"]
    assert scratch.init == "dense" and scratch.model_kwargs == recipe.model_kwargs
    assert train_config(spec, scratch).epochs == recipe.epochs and train_config(spec, scratch).lr == recipe.lr
    values["entries"][0]["model"] = "vit_cifar_nano"
    with pytest.raises(SpecError, match="no earlier entry trains it"):
        with_references_from_scratch(parse_spec(values))


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "model": "vit_cifar_small", "pretrained": True}, "only a model with shipped weights"),
    ({"name": "x", "model": "{backbone}", "model_kwargs": {"depth": 2}, "pretrained": True}, "no model_kwargs"),
    ({"name": "x", "model": "{backbone}", "pretrained": "yes"}, "entries[3].pretrained"),
])
def test_bad_pretrained_entries_are_refused(entry, message):
    values = minimal_spec()
    values["entries"].append(entry)
    assert message in error_for(values)


def test_valid_spec_fills_placeholders_defaults_and_budgets():
    spec = parse_spec(minimal_spec())
    dense, dynamicvit, dvt = spec.entries
    assert dense.model == "vit_cifar_micro" and dynamicvit.model == "dynamicvit_vit_cifar_micro"
    assert dense.train == {"epochs": 1, "lr": 1e-3}  # "1e-3" is a string to YAML 1.1, a number to us
    assert dvt.train["epochs"] == 2 and dvt.train["lr"] == 1e-3
    assert [point.knobs for point in dynamicvit.budgets] == [{"keep_ratio": 0.5}, {"keep_ratio": 0.7}]
    assert dvt.budgets[0].calibrate == {"q": 0.5} and dvt.budgets[0].knobs is None
    assert dense.budgets is None and spec.reference == "dense"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["entries"][2]["train"].update(epochs="ten"),
     "entries[2].train.epochs: expected a number >= 0, got 'ten'"),
    (lambda s: s["entries"][2]["train"].update(epochs=0), "entries[2].train.epochs: 0 trains nothing, so the entry "
                                                          "needs init"),
    (lambda s: s["entries"][1].update(train={"lr": -1}), "entries[1].train.lr: expected a number > 0"),
    (lambda s: s["train"].update(seed=1.5), "train.seed: expected a whole number >= 0"),
    (lambda s: s["data"].update(batch_size=0), "data.batch_size: expected a whole number >= 1, got 0"),
    (lambda s: s.update(speed={"repeats": "five"}), "speed.repeats: expected a whole number >= 1, got 'five'"),
    (lambda s: s["entries"][1].update(init="teacher"), "entries[1].init: 'teacher' is not an earlier entry"),
    (lambda s: s["entries"][1].update(name="dense"), "entries[1].name: 'dense' is used by an earlier entry"),
    (lambda s: s["entries"][0].update(name="a/b"), "entries[0].name: 'a/b' must be letters"),
    (lambda s: s["entries"][1].update(budgets=[]), "entries[1].budgets: expected a non-empty list"),
    (lambda s: s["entries"][1].update(budgets=[{}]), "entries[1].budgets[0]: empty budget point"),
    (lambda s: s["entries"][2].update(budgets=[{"calibrate": {"q": 1}, "x": 1}]),
     "entries[2].budgets[0]: unknown key 'x'; known keys: calibrate"),
    (lambda s: s.update(reference="baseline"), "reference: no entry named 'baseline'"),
    (lambda s: s.update(backbone="vit_cifar_pico"), "backbone: unknown backbone 'vit_cifar_pico'"),
    (lambda s: s.pop("entries"), "entries: missing"),
    (lambda s: s["entries"][0].pop("model"), "entries[0].model: missing"),
    (lambda s: s.update(train={}), "entries[0].train.epochs: missing"),
])
def test_bad_values_name_the_field(edit, message):
    values = minimal_spec()
    edit(values)
    assert message in error_for(values)


def test_unknown_keys_are_rejected_with_the_known_keys():
    values = minimal_spec()
    values["entries"][1]["epochs"] = 3
    message = error_for(values)
    assert message.startswith("entries[1]: unknown key 'epochs'; known keys:")
    assert "train" in message and "budgets" in message
    values = minimal_spec()
    values["train"]["learning_rate"] = 0.1
    assert "train: unknown key 'learning_rate'; known keys:" in error_for(values)
    values = minimal_spec()
    values["data"]["batchsize"] = 3
    assert "data: unknown key 'batchsize'" in error_for(values)
    values = minimal_spec()
    values["entrys"] = []
    assert "spec: unknown key 'entrys'" in error_for(values)


def test_unknown_models_fail_at_parse_time():
    values = minimal_spec()
    values["entries"][0]["model"] = "vit_cifar_mirco"
    assert "entries[0].model: unknown model 'vit_cifar_mirco'" in error_for(values)


def test_unknown_method_options_fail_at_parse_time():
    values = minimal_spec()
    values["entries"][1]["model_kwargs"] = {"keep_ratoi": 0.5, "depth": 2}
    message = error_for(values)
    assert "entries[1].model_kwargs: DynamicViT does not take 'keep_ratoi'" in message and "keep_ratio" in message


def test_unknown_methods_are_errors_not_skipped_entries():
    values = minimal_spec()
    values["entries"].append({"name": "future", "model": "dyanmicvit_{backbone}"})
    message = error_for(values)
    assert "entries[3].model: unknown method 'dyanmicvit'" in message and "dynamicvit" in message


def test_impossible_budget_points_and_targets_fail_at_parse_time():
    values = minimal_spec()
    values["entries"][1]["budgets"] = [{"keep_ratio": 0.5}, {"keep_ratio": 1.5}]
    assert "entries[1].budgets[1]: keep_ratio must be a number in (0, 1]; got 1.5" in error_for(values)
    values["entries"][1]["budgets"] = [{"keep_rate": 0.5}]
    assert "entries[1].budgets[0]: DynamicViT has no budget knob keep_rate" in error_for(values)
    values = minimal_spec()
    values["entries"][2]["budgets"] = [{"calibrate": {"gmac": 0.1}}]
    assert "entries[2].budgets[0].calibrate: DVT.calibrate takes gmacs, q; got 'gmac'" in error_for(values)
    values["entries"][2]["budgets"] = [{"calibrate": {"q": -1}}]
    assert "entries[2].budgets[0].calibrate.q: expected a positive number" in error_for(values)


def test_models_too_large_or_malformed_fail_at_parse_time():
    values = minimal_spec()
    values["entries"][0]["model_kwargs"] = {"depth": 1000, "embed_dim": 8192, "num_heads": 8}
    message = error_for(values)
    assert message.startswith("entries[0].model_kwargs: ") and "--allow-large-model" in message
    values["entries"][0]["model_kwargs"] = {"embed_dim": 100, "num_heads": 3}
    assert "embed_dim 100 is not divisible by num_heads 3" in error_for(values)


def test_load_spec_reports_the_file_and_yaml_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**minimal_spec(), "name": ""}))
    with pytest.raises(SpecError, match=r"bad.yaml: name: expected a non-empty string"):
        load_spec(path)
    path.write_text("entries: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
    with pytest.raises(FileNotFoundError):
        load_spec(tmp_path / "missing.yaml")


def test_only_adds_what_an_entry_needs():
    spec = parse_spec(minimal_spec())
    assert [entry.name for entry in select_entries(spec, ["dynamicvit"])] == ["dense", "dynamicvit"]
    assert [entry.name for entry in select_entries(spec, ["dvt"])] == ["dense", "dvt"]
    assert len(select_entries(spec)) == 3
    with pytest.raises(ValueError, match="no such entry; entries: dense, dynamicvit, dvt"):
        select_entries(spec, ["dvtt"])


def test_spec_round_trips_through_its_dict():
    spec = parse_spec(minimal_spec())
    values = copy.deepcopy(spec.to_dict())
    assert values["entries"][2]["budgets"] == [{"calibrate": {"q": 0.5}}]
    assert values["data"]["batch_size"] == 32


def test_dvt_ablation_spec_shares_the_default_runs_cache_entries(tmp_path, monkeypatch):
    from dyntok import pretrained
    from dyntok.bench.plan import entry_caches
    from dyntok.bench.spec import builtin_spec_path, load_spec

    from .conftest import REPO_ROOT

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path)  # stand-in shipped weights: keys hash the file
    dyntok.save_model(dyntok.create_model("vit_cifar_micro"), tmp_path / "vit_cifar_micro.safetensors")
    default = load_spec(builtin_spec_path("cpu"))
    ablation = load_spec(REPO_ROOT / "benchmarks" / "dvt_ablation.yaml")
    shared = {"dense"}  # the default's DVT is the shipped checkpoint; the ablation fine-tunes all three alike
    default_caches = entry_caches(default, [e for e in default.entries if e.name in shared], tmp_path)
    ablation_caches = entry_caches(ablation, [e for e in ablation.entries if e.name in shared], tmp_path)
    for name in shared:
        assert ablation_caches[name].folder == default_caches[name].folder, name
    kwargs = {e.name: e.model_kwargs for e in ablation.entries}
    assert kwargs["dvt_no_feature_reuse"] == {"feature_reuse": False}
    assert kwargs["dvt_no_relation_reuse"] == {"relation_reuse": False}
