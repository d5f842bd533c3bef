"""Converting officially released checkpoints: the converted model computes what the official model does.

The official files cannot be downloaded here, so each test writes a file with the official structure (key
names, shapes, where the weights sit in the checkpoint) and random values, converts it, and compares the
dyntok model's logits with the official forward written out in ``official_reference``.
"""
from __future__ import annotations

import argparse
import inspect
import os

import pytest
import torch

import dyntok
from dyntok.fileio import load_meta
from dyntok.cli import main as cli_main
from dyntok.convert import ConversionError, convert
from dyntok.methods.evit import EViT

from . import official_reference as official

HEADS = 2


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))


def _save(tmp_path, content, name="official.pth"):
    path = tmp_path / name
    torch.save(content, path)
    return path


def _converted(tmp_path, source, content, **options):
    out = tmp_path / f"{source}.safetensors"
    convert(source, _save(tmp_path, content), out, num_heads=HEADS, **options)
    return dyntok.load_model(out).eval()


# --------------------------------------------------------------------------------------------- DynamicViT
@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_dynamicvit_matches_the_official_forward(tmp_path, images, keep_ratio):
    state = official.add_dynamicvit_predictors(official.random_deit())
    model = _converted(tmp_path, "dynamicvit", {"model": state, "epoch": 29}, keep_ratio=keep_ratio)
    assert model.get_budget() == {"keep_ratio": keep_ratio}
    assert model.prune_locations == (3, 6, 9)
    expected = official.dynamicvit_logits(state, images, keep_ratio, HEADS)
    torch.testing.assert_close(model.predict(images).logits, expected, rtol=1e-5, atol=1e-5)


def test_dynamicvit_keep_ratio_comes_from_the_saved_training_arguments(tmp_path):
    state = official.add_dynamicvit_predictors(official.random_deit())
    model = _converted(tmp_path, "dynamicvit", {"model": state, "args": argparse.Namespace(base_rate=0.8)})
    assert model.get_budget() == {"keep_ratio": 0.8}


def test_converted_deit_small_needs_no_backbone_overrides(tmp_path):
    """At DeiT-S's shape the checkpoint names timm's deit_small_patch16_224 and nothing else."""
    state = official.add_dynamicvit_predictors(official.random_deit(embed_dim=384, depth=12, num_classes=1000))
    out = tmp_path / "deit_s.safetensors"
    model = convert("dynamicvit", _save(tmp_path, {"model": state}), out)
    assert model.config["backbone"] == {"name": "deit_small_patch16_224", "overrides": {}}


# --------------------------------------------------------------------------------------------- EViT
def _evit_has_unfused_option() -> bool:
    return "fuse_inattentive" in inspect.signature(EViT.__init__).parameters


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "not_fused"])
@pytest.mark.parametrize("keep_rate", [0.7, 0.5])
def test_evit_matches_the_official_forward(tmp_path, images, keep_rate, fuse):
    if not fuse and not _evit_has_unfused_option():
        pytest.skip("dyntok's EViT has no fuse_inattentive option on this branch yet")
    state = official.random_deit()
    model = _converted(tmp_path, "evit", {"model": state}, keep_rate=keep_rate, fuse=fuse)
    expected = official.evit_logits(state, images, keep_rate, fuse, HEADS)
    torch.testing.assert_close(model.predict(images).logits, expected, rtol=1e-5, atol=1e-5)


def test_evit_budget_comes_from_the_saved_training_arguments(tmp_path):
    args = argparse.Namespace(base_keep_rate=0.6, fuse_token=True, drop_loc="(2, 5, 8)")
    model = _converted(tmp_path, "evit", {"model": official.random_deit(), "args": args})
    assert model.get_budget() == {"keep_rate": 0.6}
    assert model.prune_locations == (2, 5, 8)


# --------------------------------------------------------------------------------------------- DVT
def _dvt_file(point_thresholds=(0.6, 0.4, -1e8)):
    table = torch.zeros(59, 3)
    table[9] = torch.tensor(point_thresholds)
    return {"model_state_dict": official.random_dvt(heads=HEADS), "flops": [0.6, 1.9, 4.6],
            "dynamic_threshold": table}


def test_dvt_matches_the_official_forward_at_every_exit(tmp_path, images):
    content = _dvt_file()
    model = _converted(tmp_path, "dvt", content)
    assert model.grids == [7, 10, 14]
    meta = load_meta(tmp_path / "dvt.safetensors")
    assert meta["converted_from"]["reported"]["flops"] == [0.6, 1.9, 4.6]
    assert meta["eval_transform"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    expected = official.dvt_logits(content["model_state_dict"], images, HEADS)
    for ours, theirs in zip(model.predict_all_exits(images), expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dvt_exits_where_the_official_thresholds_send_each_image(tmp_path, images):
    exits = official.dvt_logits(official.random_dvt(heads=HEADS), images, HEADS)
    confidence = torch.stack([logits.softmax(-1).amax(-1) for logits in exits])
    # thresholds between this batch's confidences, so that images leave at different stages
    first, second = confidence[0].median().item(), confidence[1].median().item()
    model = _converted(tmp_path, "dvt", _dvt_file((first, second, -1e8)))
    assert model.get_budget() == {"thresholds": [first, second]}
    leaves = [next(k for k in range(3) if k == 2 or confidence[k, i] >= (first, second)[k]) for i in range(len(images))]
    prediction = model.predict(images)
    assert prediction.extras["exit_stage"].tolist() == leaves
    torch.testing.assert_close(prediction.logits, torch.stack([exits[k][i] for i, k in enumerate(leaves)]),
                               rtol=1e-5, atol=1e-5)


def test_a_t2t_vit_dvt_is_refused_with_the_reason(tmp_path):
    content = {"model_state_dict": {"less_less_token.tokens_to_token.project.weight": torch.zeros(4, 4)}}
    with pytest.raises(ConversionError, match="T2T-ViT.*Tokens-to-Token"):
        convert("dvt", _save(tmp_path, content), tmp_path / "out.safetensors")


# --------------------------------------------------------------------------------------------- AdaViT
def _adavit_follows_the_release() -> bool:
    from dyntok.methods.adavit import AdaViT

    return "first_block_patch_policy" in inspect.signature(AdaViT.__init__).parameters


adavit_release = pytest.mark.skipif(not _adavit_follows_the_release(),
                                    reason="dyntok's AdaViT has no head-gated MLP on this branch yet")


@adavit_release
def test_adavit_matches_the_official_forward_from_the_ema_weights(tmp_path, images):
    ema, trained = official.random_adavit(seed=0), official.random_adavit(seed=1)
    model = _converted(tmp_path, "adavit", {"state_dict": trained, "state_dict_ema": ema, "epoch": 149})
    batch = torch.cat([images, images.flip(-1)])  # more images, so that decisions differ between them
    expected = official.adavit_logits(ema, batch, HEADS)
    torch.testing.assert_close(model.predict(batch).logits, expected, rtol=1e-5, atol=1e-5)


@adavit_release
def test_adavit_accepts_a_joined_qkv_and_takes_the_official_decisions(tmp_path, images):
    from dyntok.convert.adavit import official_threshold

    state = official.random_adavit()
    separate = ("query", "key", "value")
    joined = {key: value for key, value in state.items() if not any(f"attn.{n}." in key for n in separate)}
    for i in range(official.depth_of(state)):
        for kind in ("weight", "bias"):
            joined[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([state[f"blocks.{i}.attn.{n}.{kind}"] for n in separate])
    model = _converted(tmp_path, "adavit", {"model": joined})
    assert model.get_budget()["patch_threshold"] == pytest.approx(official_threshold(0.6))
    assert official_threshold(0.6) == pytest.approx(0.52026, abs=1e-5)
    torch.testing.assert_close(model.predict(images).logits, official.adavit_logits(state, images, HEADS),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- refusals
def test_a_file_of_another_method_is_refused_naming_the_keys(tmp_path):
    dynamicvit_file = {"model": official.add_dynamicvit_predictors(official.random_deit(depth=12))}
    with pytest.raises(ConversionError, match=r"keys that do not map: score_predictor\.0\."):
        convert("evit", _save(tmp_path, dynamicvit_file), tmp_path / "out.safetensors", num_heads=HEADS)
    with pytest.raises(ConversionError, match=r"left without a value: predictors\.0\."):
        convert("dynamicvit", _save(tmp_path, {"model": official.random_deit()}), tmp_path / "out.safetensors",
                num_heads=HEADS)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_file_without_vit_weights_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="pos_embed"):
        convert("evit", _save(tmp_path, {"model": {"fc.weight": torch.zeros(2, 2)}}), tmp_path / "out.safetensors")
    with pytest.raises(ConversionError, match="none of the entries"):
        convert("evit", _save(tmp_path, {"optimizer": {"lr": 1.0}}), tmp_path / "out.safetensors")


def test_a_truncated_file_is_refused(tmp_path):
    path = _save(tmp_path, {"model": official.random_deit(depth=2)})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConversionError, match="truncated"):
        convert("evit", path, tmp_path / "out.safetensors")


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo this must never run",)


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capfd):
    path = _save(tmp_path, {"model": official.random_deit(depth=2), "extra": _RunsCode()})
    with pytest.raises(ConversionError, match="refusing to load .*posix.system|refusing to load .*nt.system"):
        convert("evit", path, tmp_path / "out.safetensors")
    assert "must never run" not in capfd.readouterr().out


def test_an_unknown_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="converts: dynamicvit, evit, adavit, dvt"):
        convert("t2t", tmp_path / "x.pth", tmp_path / "out.safetensors")


# --------------------------------------------------------------------------------------------- command line
def test_command_line_converts_and_reports_refusals_in_one_line(tmp_path, capsys):
    path = _save(tmp_path, {"model": official.random_deit(depth=4)})
    out = tmp_path / "evit.safetensors"
    assert cli_main(["convert", "--from", "evit", str(path), str(out), "--option", "keep_rate=0.5",
                     "--option", "prune_locations=[1,2,3]", "--option", f"num_heads={HEADS}"]) == 0
    assert dyntok.load_model(out).get_budget() == {"keep_rate": 0.5}
    path.write_bytes(path.read_bytes()[:100])
    assert cli_main(["convert", "--from", "evit", str(path), str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dyntok convert: error:") and "truncated" in error and "\n" not in error
