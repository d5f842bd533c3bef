"""Shipped reference weights: loaded by name, hub ids through the same path, clear errors for bad files."""
from __future__ import annotations

import json

import pytest
import torch

import dyntok
from dyntok import pretrained
from dyntok.data import DataConfig
from dyntok.pretrained import PretrainedError, model_card, reference_state_dict
from dyntok.training import TrainConfig, train
from dyntok.training import recipes
from dyntok.training.recipes import export_reference

from .conftest import requires_shared_cifar10

#: A preset-sized stand-in for a shipped file, so these tests do not depend on which files are shipped.
PRESET = "vit_cifar_nano"


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """An empty package weights folder the tests fill."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", folder)
    return folder


def _fake_reference(folder, preset=PRESET, **overrides):
    torch.manual_seed(3)
    model = dyntok.create_model(preset, **overrides)
    dyntok.save_model(model, folder / f"{preset}.safetensors", extra={"card": {"test_top1": 0.5, "seed": 0}})
    return model


def test_create_model_pretrained_loads_the_packaged_reference(weights_dir):
    reference = _fake_reference(weights_dir)
    model = dyntok.create_model(PRESET, pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.predict(images).logits, reference.eval().predict(images).logits)
    assert model_card(PRESET)["test_top1"] == 0.5


def test_a_method_starts_from_the_reference_through_init_from_dense(weights_dir):
    reference = _fake_reference(weights_dir)
    model = dyntok.create_model(f"dynamicvit_{PRESET}", pretrained="reference", keep_ratio=1.0).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.predict(images).logits, reference.eval().predict(images).logits)


def test_a_dense_file_given_for_a_method_is_its_starting_point(weights_dir, tmp_path):
    reference = _fake_reference(tmp_path)
    model = dyntok.create_model(f"evit_{PRESET}", pretrained_file=str(tmp_path / f"{PRESET}.safetensors"),
                                pretrained=True, keep_rate=1.0).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.predict(images).logits, reference.eval().predict(images).logits)


def _fake_method(folder, name=f"dynamicvit_{PRESET}", **kwargs):
    torch.manual_seed(5)
    model = dyntok.create_model(name, **kwargs)
    dyntok.save_model(model, folder / f"{name}.safetensors", extra={"card": {"test_top1": 0.4}})
    return model.eval()


def test_a_shipped_method_loads_its_own_weights_not_the_reference(weights_dir):
    _fake_reference(weights_dir)
    trained = _fake_method(weights_dir)
    model = dyntok.create_model(f"dynamicvit_{PRESET}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.predict(images).logits, trained.predict(images).logits)
    assert model_card(f"dynamicvit_{PRESET}")["test_top1"] == 0.4


def test_a_shipped_method_takes_budget_and_training_settings_but_not_shapes(weights_dir):
    trained = _fake_method(weights_dir)
    model = dyntok.create_model(f"dynamicvit_{PRESET}", pretrained=True, keep_ratio=0.5, drop_path_rate=0.1)
    assert model.get_budget()["keep_ratio"] == 0.5
    assert torch.equal(model.predictors[0].embed[1].weight, trained.predictors[0].embed[1].weight)
    with pytest.raises(PretrainedError, match=r"trained with prune_locations=\[1\]; these settings shape"):
        dyntok.create_model(f"dynamicvit_{PRESET}", pretrained=True, prune_locations=[0, 1])
    with pytest.raises(PretrainedError, match="trained with depth=2; .* built with depth=3"):
        dyntok.create_model(f"dynamicvit_{PRESET}", pretrained=True, depth=3)


def test_a_method_without_shipped_weights_names_both_ways_to_get_them(weights_dir):
    _fake_reference(weights_dir)
    with pytest.raises(PretrainedError, match=r"ships no weights for 'dynamicvit_vit_cifar_micro'.*"
                                              r"`dyntok pretrain dynamicvit_vit_cifar_micro`.*pretrained='reference'"):
        dyntok.create_model("dynamicvit_vit_cifar_micro", pretrained=True)
    with pytest.raises(PretrainedError, match=r"ships no weights for 'evit_vit_cifar_nano'.*pretrained='reference'"):
        dyntok.create_model(f"evit_{PRESET}", pretrained=True)


def test_a_file_of_another_method_is_refused(weights_dir, tmp_path):
    _fake_method(tmp_path, f"evit_{PRESET}")
    with pytest.raises(PretrainedError, match="holds evit weights, not dynamicvit weights"):
        dyntok.create_model(f"dynamicvit_{PRESET}", pretrained=str(tmp_path / f"evit_{PRESET}.safetensors"))


def test_a_hub_id_goes_through_huggingface_hub(weights_dir, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    reference = _fake_reference(hub)
    asked = []

    def fake_download(repo_id, filename):
        asked.append((repo_id, filename))
        return str(hub / filename)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = dyntok.create_model(PRESET, pretrained="hf-hub:someone/dyntok-refs")
    assert asked == [("someone/dyntok-refs", f"{PRESET}.safetensors")]
    assert torch.equal(model.vit.pos_embed, reference.vit.pos_embed)


def test_an_unreachable_hub_says_what_to_do_offline(weights_dir, monkeypatch):
    import huggingface_hub

    from dyntok.models import hub

    def offline(repo_id, filename):
        raise OSError("network is unreachable")

    # The hub answers the reachability check, then the download fails (test_cli_robustness.py covers no network).
    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(PretrainedError, match="could not fetch .*network is unreachable.*offline"):
        dyntok.create_model(PRESET, pretrained="hf-hub:someone/dyntok-refs")


def test_a_missing_file_names_the_shipped_presets_and_the_recipe(weights_dir):
    _fake_reference(weights_dir, "vit_cifar_micro")
    with pytest.raises(PretrainedError, match=r"ships no weights for 'vit_cifar_nano' \(shipped: vit_cifar_micro\)"
                                              r".*dyntok pretrain vit_cifar_nano"):
        dyntok.create_model(PRESET, pretrained=True)


def test_a_corrupt_file_gives_a_clear_error(weights_dir):
    (weights_dir / f"{PRESET}.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(PretrainedError, match="unusable: .*not a readable safetensors file"):
        dyntok.create_model(PRESET, pretrained=True)


def test_weights_for_another_model_are_refused_by_name(weights_dir):
    torch.manual_seed(0)
    other = dyntok.create_model("vit_cifar_micro")
    dyntok.save_model(other, weights_dir / f"{PRESET}.safetensors")
    with pytest.raises(PretrainedError, match="holds dense weights for 'vit_cifar_micro', not for 'vit_cifar_nano'"):
        reference_state_dict(PRESET, {})


def test_an_architecture_override_is_refused_naming_it(weights_dir):
    _fake_reference(weights_dir)
    with pytest.raises(PretrainedError, match="trained with depth=2; .* built with depth=3"):
        dyntok.create_model(PRESET, pretrained=True, depth=3)


def test_restating_the_presets_own_settings_is_no_clash(weights_dir):
    reference = _fake_reference(weights_dir)
    model = dyntok.create_model(PRESET, pretrained=True, img_size=32, depth=2, drop_path_rate=0.1)
    assert torch.equal(model.vit.pos_embed, reference.vit.pos_embed)


def test_another_class_count_keeps_the_body_and_renews_the_classifier(weights_dir):
    reference = _fake_reference(weights_dir)
    weights = reference_state_dict(PRESET, {"num_classes": 100})
    assert weights["vit.head.weight"].shape == (100, 64)
    assert torch.equal(weights["vit.blocks.0.attn.qkv.weight"], reference.vit.blocks[0].attn.qkv.weight)
    model = dyntok.create_model(PRESET, pretrained=True, num_classes=100)
    assert model.num_classes == 100


def test_init_pretrained_trains_a_method_from_the_reference(weights_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNTOK_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(3)
    reference = dyntok.create_model(PRESET, img_size=16, num_classes=3)
    dyntok.save_model(reference, weights_dir / f"{PRESET}.safetensors")
    config = TrainConfig(model=f"tome_{PRESET}", model_kwargs={"img_size": 16},
                         data=DataConfig(dataset=str(image_folder), batch_size=8, holdout_size=0),
                         output_dir=str(tmp_path / "run"), epochs=0, init="pretrained", progress=False)
    result = train(config)
    trained = dyntok.load_model(result.model_path)
    assert torch.equal(trained.vit.pos_embed, reference.vit.pos_embed)


def test_export_writes_a_loadable_reference_with_its_model_card(weights_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNTOK_CACHE", str(tmp_path / "cache"))
    recipe = recipes.Recipe(epochs=0.25, batch_size=8, holdout_size=4, randaugment=(1, 5), dataset=str(image_folder))
    config = recipe.train_config(PRESET, tmp_path / "run", progress=False)
    config.model_kwargs = {"img_size": 16}
    config.compile = False
    train(config)
    path = export_reference(tmp_path / "run", PRESET)
    assert path == weights_dir / f"{PRESET}.safetensors"
    card = model_card(PRESET)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert card["test_top1"] == metrics["test"]["top1"]
    assert card["seed"] == 0 and card["versions"]["torch"] == torch.__version__
    assert card["command"].startswith(f"dyntok train --model {PRESET} ")
    assert len(card["log"]) == 1 and card["recipe"]["epochs"] == 0.25


SHIPPED = pretrained.shipped_presets()


@pytest.mark.parametrize("preset", SHIPPED or [pytest.param("none", marks=pytest.mark.skip("no weights shipped"))])
def test_shipped_files_name_no_path_of_the_machine_they_were_made_on(preset):
    """Every string in a shipped file's metadata (card, config, split record) is free of absolute paths."""
    from dyntok.fileio import load_meta

    def strings(value):
        if isinstance(value, dict):
            return [text for item in value.values() for text in strings(item)]
        if isinstance(value, list):
            return [text for item in value for text in strings(item)]
        return [value] if isinstance(value, str) else []

    absolute = [text for text in strings(load_meta(pretrained.packaged_file(preset))) if text.startswith(("/", "~"))]
    assert not absolute


@requires_shared_cifar10()
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("preset", SHIPPED or [pytest.param("none", marks=pytest.mark.skip("no weights shipped"))])
def test_shipped_reference_reproduces_its_model_card(preset):
    """The packaged file's test top-1 on the shared CIFAR-10 copy is the one its card states, to 0.1 points."""
    from dyntok.data import DataConfig, build_loaders
    from dyntok.evaluation import evaluate

    from .conftest import SHARED_CIFAR10

    card = model_card(preset)
    model = dyntok.create_model(preset, pretrained=True).eval()
    loaders = build_loaders(DataConfig(dataset=str(SHARED_CIFAR10), batch_size=256, holdout_size=0))
    result = evaluate(model, loaders["test"], torch.device("cpu"), progress=False)
    assert abs(result.summary()["top1"] - card["test_top1"]) <= 0.001


@pytest.mark.parametrize("name", [PRESET, f"dynamicvit_{PRESET}"])
def test_dyntok_pretrain_resumes_and_reproduces_its_export(name, weights_dir, image_folder, tmp_path, monkeypatch):
    """Re-running the pretrain command continues the finished run (nothing retrained) and writes the same file;
    a method's recipe starts from the shipped reference of its backbone."""
    from dyntok.cli import main
    from safetensors.torch import load_file

    monkeypatch.setenv("DYNTOK_CACHE", str(tmp_path / "cache"))
    tiny = recipes.Recipe(epochs=0.5, batch_size=8, holdout_size=4, dataset=str(image_folder),
                             init=None if name == PRESET else "pretrained")
    monkeypatch.setitem(recipes.RECIPES, name, tiny)
    if name != PRESET:
        torch.manual_seed(3)
        dyntok.save_model(dyntok.create_model(PRESET, img_size=16, num_classes=3),
                          weights_dir / f"{PRESET}.safetensors")
    original = recipes.Recipe.train_config

    def uncompiled_at_16px(self, *args, **kwargs):  # tiny images; compiling would only cost time here
        config = original(self, *args, **kwargs)
        config.model_kwargs, config.compile = {"img_size": 16}, False
        return config

    monkeypatch.setattr(recipes.Recipe, "train_config", uncompiled_at_16px)
    argv = ["pretrain", name, "--output-dir", str(tmp_path / "runs"), "--export", str(tmp_path / "out"),
            "--no-progress"]
    assert main(argv) == 0
    first = load_file(tmp_path / "out" / f"{name}.safetensors")
    log_lines = (tmp_path / "runs" / name / "log.jsonl").read_text().splitlines()
    assert main(argv) == 0
    assert (tmp_path / "runs" / name / "log.jsonl").read_text().splitlines() == log_lines  # resumed, not retrained
    again = load_file(tmp_path / "out" / f"{name}.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
    card = model_card(name, tmp_path / "out" / f"{name}.safetensors")
    assert str(tmp_path) not in json.dumps(card) and card["recipe"]["output_dir"] == name  # no machine paths
    trained = dyntok.load_model(tmp_path / "runs" / name / "model.safetensors")
    assert card["command"] == tiny.command(name).replace(str(image_folder), image_folder.name)
    assert card["budget"] == trained.get_budget()


def test_dyntok_pretrain_names_the_presets_it_has_recipes_for():
    from dyntok.cli import main

    assert main(["pretrain", "vit_cifar_base", "--no-progress"]) == 2
