"""What ``benchmarks/official_speed.py`` relies on that is dyntok's own, checked without the official code.

The benchmark loads a dyntok model's weights into the official model under the official key names
(``dyntok.convert.to_official``): that renaming must be the exact inverse of the converters' and give exactly the
keys and shapes of the official model.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from dyntok.convert import ConversionError, OFFICIAL_NAMES, to_official
from dyntok.convert import dynamicvit, evit
from dyntok.convert._official import backbone_dyntok_name

from . import official_reference as official
from .conftest import REPO_ROOT, TINY, tiny_model

#: Each official code's key -> dyntok key mapping, as the converters apply it (ToMe patches a plain timm ViT).
DYNTOK_NAMES = {"dynamicvit": dynamicvit.dyntok_name, "evit": evit.dyntok_name, "tome": backbone_dyntok_name}


def test_every_official_naming_has_its_inverse_here():
    assert set(DYNTOK_NAMES) == set(OFFICIAL_NAMES)


@pytest.mark.parametrize("source", sorted(OFFICIAL_NAMES))
def test_renaming_to_official_and_back_is_the_identity(source):
    state = tiny_model(source).state_dict()
    renamed = to_official(source, state)
    assert len(renamed) == len(state)
    back = {DYNTOK_NAMES[source](key): value for key, value in renamed.items()}
    assert back.keys() == state.keys()
    assert all(back[key] is state[key] for key in state)


@pytest.mark.parametrize("source", sorted(OFFICIAL_NAMES))
def test_renamed_weights_have_the_official_keys_and_shapes(source):
    model = tiny_model(source)
    expected = official.random_deit(embed_dim=TINY["embed_dim"], depth=TINY["depth"],
                                    num_classes=TINY["num_classes"], img_size=TINY["img_size"],
                                    patch_size=TINY["patch_size"], mlp_ratio=2)
    if source == "dynamicvit":
        expected = official.add_dynamicvit_predictors(expected, stages=len(model.prune_locations))
    renamed = to_official(source, model.state_dict())
    assert {key: tuple(value.shape) for key, value in renamed.items()} == \
        {key: tuple(value.shape) for key, value in expected.items()}


def test_a_weight_the_official_model_lacks_is_refused_by_name():
    with pytest.raises(ConversionError, match="predictors.0"):
        to_official("evit", tiny_model("dynamicvit").state_dict())


def test_an_unknown_official_code_is_refused():
    with pytest.raises(ValueError, match="known: dynamicvit, evit, tome"):
        to_official("dvt", {})


def load_script():
    spec = importlib.util.spec_from_file_location("official_speed", REPO_ROOT / "benchmarks" / "official_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_clones_skip_their_methods_with_the_repository_to_clone(tmp_path, capsys):
    results = load_script().main(["--official-root", str(tmp_path / "none"), "--smoke",
                                  "--output", str(tmp_path / "report")])
    assert [row["status"] for row in results["rows"]] == ["skipped"] * 3
    printed = capsys.readouterr().out
    for url in ("facebookresearch/ToMe", "youweiliang/evit", "raoyongming/DynamicViT"):
        assert f"git clone https://github.com/{url}" in printed
    written = json.loads((tmp_path / "report" / "results.json").read_text())
    assert written["run"]["argv"][:2] == ["--official-root", "OFFICIAL"]  # no path of this machine in a report
    assert "no clone of https://github.com/raoyongming/DynamicViT" in (tmp_path / "report" / "README.md").read_text()
