"""What ``benchmarks/official_speed.py`` relies on that is dyntok's own, checked without the official code.

The benchmark loads a dyntok model's weights into the official model under the official key names
(``dyntok.convert.to_official``): that renaming must be the exact inverse of the converters' and give exactly the
keys and shapes of the official model.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from dyntok.convert import ConversionError, OFFICIAL_NAMES, to_official
from dyntok.convert import adavit, dvt, dynamicvit, evit
from dyntok.convert._official import backbone_dyntok_name
from dyntok.methods.dvt import exit_stages

from . import official_reference as official
from .conftest import REPO_ROOT, TINY, tiny_model

#: Each official code's key -> dyntok key mapping, as the converters apply it (ToMe patches a plain timm ViT).
DYNTOK_NAMES = {"dynamicvit": dynamicvit.dyntok_name, "evit": evit.dyntok_name, "tome": backbone_dyntok_name,
                "dvt": dvt.dyntok_name, "adavit": adavit.dyntok_name}
#: The DeiT-S-like geometry of the official DVT (grids 7, 10, 14 at 224 px; reuse widths 128, 48), made small.
OFFICIAL_DVT = dict(img_size=224, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=5, mlp_ratio=4,
                    grids=[7, 10, 14], reuse_hidden=128, reuse_dim=48, padded_patches=True,
                    reuse_resampling="nearest-avgpool", reuse_class_fill="zeros")
#: A DeiT shape for AdaViT, as ``official_reference.random_adavit`` builds it.
OFFICIAL_ADAVIT = dict(img_size=224, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=5, mlp_ratio=4)


def dyntok_state(source: str, official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official weights under dyntok's names, as the converters read them (AdaViT's query, key, value joined)."""
    if source == "adavit":
        official_state = adavit.joined_qkv(official_state)
    return {DYNTOK_NAMES[source](key): value for key, value in official_state.items()}


def official_shaped_model(source: str):
    """A tiny dyntok model whose official counterpart ``official_reference`` can write out."""
    if source == "dvt":
        return tiny_model("dvt", **OFFICIAL_DVT)
    return tiny_model(source, **OFFICIAL_ADAVIT) if source == "adavit" else tiny_model(source)


def official_state_of(source: str, model) -> dict[str, torch.Tensor]:
    """A state dict with the official keys and shapes for ``model``'s architecture (random values)."""
    if source == "dvt":
        return official.random_dvt(embed_dim=32, depth=3, heads=2, num_classes=5)
    if source == "adavit":
        return official.random_adavit(embed_dim=32, depth=3, heads=2, num_classes=5)
    expected = official.random_deit(embed_dim=TINY["embed_dim"], depth=TINY["depth"], num_classes=TINY["num_classes"],
                                    img_size=TINY["img_size"], patch_size=TINY["patch_size"], mlp_ratio=2)
    if source == "dynamicvit":
        expected = official.add_dynamicvit_predictors(expected, stages=len(model.prune_locations))
    return expected


def test_every_official_naming_has_its_inverse_here():
    assert set(DYNTOK_NAMES) == set(OFFICIAL_NAMES)


@pytest.mark.parametrize("source", sorted(OFFICIAL_NAMES))
def test_renaming_to_official_and_back_is_the_identity(source):
    state = official_shaped_model(source).state_dict()
    renamed = to_official(source, state)
    back = dyntok_state(source, renamed)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)


@pytest.mark.parametrize("source", sorted(OFFICIAL_NAMES))
def test_renamed_weights_have_the_official_keys_and_shapes(source):
    model = official_shaped_model(source)
    expected = official_state_of(source, model)
    renamed = to_official(source, model.state_dict())
    assert {key: tuple(value.shape) for key, value in renamed.items()} == \
        {key: tuple(value.shape) for key, value in expected.items()}


def test_adavit_attention_is_split_into_query_key_value_in_timm_order():
    state = official_shaped_model("adavit").state_dict()
    renamed = to_official("adavit", state)
    query, key, value = state["vit.blocks.1.attn.qkv.weight"].chunk(3)
    assert torch.equal(renamed["blocks.1.attn.query.weight"], query)
    assert torch.equal(renamed["blocks.1.attn.key.weight"], key)
    assert torch.equal(renamed["blocks.1.attn.value.weight"], value)
    assert torch.equal(renamed["blocks.0.attn.token_select.mlp_head.weight"], state["first_block_policy.patch.weight"])
    assert torch.equal(renamed["blocks.2.layer_select.mlp_head.bias"], state["policies.1.block.bias"])


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.6, 0.9])
def test_official_code_thresholds_take_dyntok_decisions(threshold):
    official_threshold = adavit.threshold_for_official_code(threshold, temperature=5.0)
    assert adavit.official_threshold(official_threshold, temperature=5.0) == pytest.approx(threshold)
    logits = torch.linspace(-12, 12, 241)
    dyntok_decisions = torch.sigmoid(logits / 5.0) > threshold
    official_decisions = torch.sigmoid(logits) > official_threshold
    near_boundary = (logits - 5.0 * math.log(threshold / (1 - threshold))).abs() < 1e-4
    assert torch.equal(dyntok_decisions[~near_boundary], official_decisions[~near_boundary])


def test_a_dvt_stage_the_official_model_lacks_is_refused():
    model = tiny_model("dvt", grids=[1, 2, 3, 4])
    with pytest.raises(ConversionError, match="stages.3"):
        to_official("dvt", model.state_dict())


def test_a_weight_the_official_model_lacks_is_refused_by_name():
    with pytest.raises(ConversionError, match="predictors.0"):
        to_official("evit", tiny_model("dynamicvit").state_dict())


def test_an_unknown_official_code_is_refused():
    with pytest.raises(ValueError, match="known: dynamicvit, evit, tome, dvt, adavit"):
        to_official("revit", {})


def load_script():
    spec = importlib.util.spec_from_file_location("official_speed", REPO_ROOT / "benchmarks" / "official_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_missing_clones_skip_their_methods_with_the_repository_to_clone(tmp_path, capsys):
    results = load_script().main(["--official-root", str(tmp_path / "none"), "--smoke",
                                  "--output", str(tmp_path / "report")])
    statuses = {row["method"]: row["status"] for row in results["rows"]}
    assert statuses == {"tome": "skipped", "evit": "skipped", "dynamicvit": "skipped", "adavit": "skipped",
                        "dvt": "not comparable", "revit": "no official code"}  # the smoke size is not DeiT-S
    printed = capsys.readouterr().out
    for url in ("facebookresearch/ToMe", "youweiliang/evit", "raoyongming/DynamicViT", "MengLcool/AdaViT"):
        assert f"git clone https://github.com/{url}" in printed
    written = json.loads((tmp_path / "report" / "results.json").read_text())
    assert written["run"]["argv"][:2] == ["--official-root", "OFFICIAL"]  # no path of this machine in a report
    assert "no clone of https://github.com/raoyongming/DynamicViT" in (tmp_path / "report" / "README.md").read_text()


class ThreeExits(torch.nn.Module):
    """Stands in for the official ``DVT_Deit_small_model``: the logits of its three exits."""

    def __init__(self, exits):
        super().__init__()
        self.exits = exits

    def forward(self, images):
        return self.exits


def test_the_official_dvt_takes_the_exit_dyntok_takes():
    torch.manual_seed(0)
    exits = [3 * torch.randn(16, 5) for _ in range(3)]
    thresholds = [0.8, 0.6]
    chosen = load_script().ExitsAsInference(ThreeExits(exits), thresholds)(torch.zeros(16))
    confidences = torch.stack([logits.softmax(dim=-1).amax(dim=-1) for logits in exits], dim=1)
    stages = exit_stages(confidences, thresholds)
    assert len(set(stages.tolist())) == 3  # every exit is taken by some image
    assert torch.equal(chosen, torch.stack(exits, dim=1)[torch.arange(16), stages])
