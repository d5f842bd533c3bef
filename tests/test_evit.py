"""EViT: dense at keep rate 1, fusion by class attention, an independent reference, MACs, schedule, knobs."""
from __future__ import annotations

import math

import pytest
import torch

import dyntok
from dyntok.measure.macs import count_macs_with_torch
from dyntok.methods.evit import EViT, destinations, kept_count, reorganise
from dyntok.models import BackboneSpec

from . import vit_reference as ref
from .conftest import TINY, tiny_model

VARIANTS = {
    "plain": {},
    "layerscale_qknorm": {"init_values": 0.5, "qk_norm": True},
    "registers": {"reg_tokens": 2, "init_values": 0.5},
}


def evit_on(variant: str, **kwargs) -> EViT:
    torch.manual_seed(0)
    model = EViT(BackboneSpec("vit_cifar_tiny", {**TINY, **VARIANTS[variant]}), **kwargs)
    return ref.randomise(model).eval()


@torch.no_grad()
def reference_evit(model: EViT, images: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` computed image by image from the weights and the full attention maps."""
    vit, prefix = model.vit, model.vit.num_prefix_tokens
    logits = []
    for image in images:
        x = vit._pos_embed(vit.patch_embed(image[None]))[0]
        for index, block in enumerate(vit.blocks):
            branch, attention_map, _ = ref.attention(block, x)
            x = x + branch
            patches = x[prefix:]
            keep = math.ceil(round(model.keep_rate * len(patches), 6))
            # Like the official code, a block drops or fuses whenever it keeps fewer than all; except that
            # fusing a single token into one would not shorten the sequence, so dyntok leaves that block be.
            shortens = keep < len(patches) - 1 if model.fuse_inattentive else keep < len(patches)
            if index in model.prune_locations and shortens:
                scores = attention_map[:, 0, prefix:].mean(0)  # the class token's row, mean over heads
                ranked = sorted(range(len(patches)), key=lambda i: -float(scores[i]))
                top, rest = sorted(ranked[:keep]), ranked[keep:]
                fused = [sum(scores[i] * patches[i] for i in rest)[None]] if model.fuse_inattentive else []
                x = torch.cat([x[:prefix], patches[top], *fused])
            x = x + ref.mlp(block, x)
        logits.append(ref.head(vit, x))
    return torch.stack(logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_keep_rate_one_gives_the_dense_logits(variant, images):
    model = evit_on(variant, keep_rate=1.0)
    torch.testing.assert_close(model.predict(images).logits, model.vit(images), rtol=0, atol=0)
    assert model.predict(images).macs[0].item() == pytest.approx(model.dense_macs())


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "drop"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("keep_rate, locations", [(0.7, None), (0.5, [0, 2]), (0.3, [3]), (0.9, None)])
def test_matches_an_independent_reference(variant, fused, fuse, keep_rate, locations, images):
    model = evit_on(variant, keep_rate=keep_rate, prune_locations=locations, fuse_inattentive=fuse)
    ref.set_fused_attention(model.vit, fused)
    torch.testing.assert_close(model.predict(images).logits, reference_evit(model, images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefix", [0, 2])
def test_fusion_keeps_the_top_tokens_in_order_and_sums_the_rest_by_attention(prefix):
    tokens = torch.arange(12.0).view(1, 6, 2)
    scores = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.1, 0.05]])
    first = -torch.ones(1, prefix, 2)  # prefix tokens: passed through, first
    reorganised, top = reorganise(torch.cat([first, tokens], 1), scores, keep=2, prefix=prefix)
    torch.testing.assert_close(reorganised[:, :prefix], first)
    reorganised = reorganised[:, prefix:]
    torch.testing.assert_close(reorganised[0, :2], tokens[0, [1, 3]])
    torch.testing.assert_close(reorganised[0, 2], (scores[0, [0, 2, 4, 5], None] * tokens[0, [0, 2, 4, 5]]).sum(0))
    assert top.tolist() == [[1, 3]]
    assert destinations(top, 6, fuse=True).tolist() == [[2, 0, 2, 1, 2, 2]]


def test_dropping_keeps_the_top_tokens_in_order_and_nothing_else():
    tokens = torch.arange(12.0).view(1, 6, 2)
    scores = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.1, 0.05]])
    reorganised, top = reorganise(tokens, scores, keep=2, fuse=False)
    torch.testing.assert_close(reorganised, tokens[:, [1, 3]])
    assert destinations(top, 6, fuse=False).tolist() == [[-1, 0, -1, 1, -1, -1]]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("keep_rate", [0.5, 0.7, 0.9])
def test_reported_macs_match_torch_flop_counter(variant, keep_rate, images):
    model = evit_on(variant, keep_rate=keep_rate)
    reported = model.predict(images[:1]).macs.item()
    assert reported == pytest.approx(count_macs_with_torch(model.predict, images[:1]), rel=0.01)
    # At 0.9 a 16-patch sequence would keep 15 and fuse 1: no shorter, so the block is left as it is.
    if keep_rate == 0.9:
        assert reported == model.dense_macs()
        dense = evit_on(variant, keep_rate=1.0).predict(images[:1]).logits
        torch.testing.assert_close(model.predict(images[:1]).logits, dense)
    else:
        assert reported < model.dense_macs()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("keep_rate", [0.5, 0.9])
def test_reported_macs_without_fusing_match_torch_flop_counter(variant, keep_rate, images):
    model = evit_on(variant, keep_rate=keep_rate, fuse_inattentive=False)
    reported = model.predict(images[:1]).macs.item()
    assert reported == pytest.approx(count_macs_with_torch(model.predict, images[:1]), rel=1e-9)
    # Dropping shortens the sequence even where fusing would not (0.9 of 16 patches keeps 15).
    assert reported < evit_on(variant, keep_rate=keep_rate).predict(images[:1]).macs.item() <= model.dense_macs()


def hooked_blocks(model) -> list[int]:
    return [index for index, block in enumerate(model.vit.blocks)
            if any(module._forward_hooks or module._forward_pre_hooks for module in block.attn.modules())]


def test_only_blocks_that_reorganise_through_timms_modules_are_hooked(images):
    model = evit_on("layerscale_qknorm", keep_rate=0.5, prune_locations=[0, 2])
    model.predict(images)
    assert hooked_blocks(model) == [0, 2]
    model.set_budget(keep_rate=1.0)
    model.predict(images)
    assert hooked_blocks(model) == []
    lean = evit_on("plain", keep_rate=0.5, prune_locations=[0, 2])  # lean halves hand the class row over directly
    lean.predict(images)
    assert hooked_blocks(lean) == [] and [index for index, tap in lean._taps.items() if tap.enabled] == [0, 2]


@pytest.mark.parametrize("variant", ["plain", "layerscale_qknorm"], ids=["lean", "timm modules"])
def test_the_explicit_attention_hands_over_the_class_row_without_recomputing_it(variant, images):
    """Off the fused kernel the probabilities exist: the class token's row is read, not recomputed, and the
    MACs say so (and still match torch's counter). Switching kernels after a predict re-places the hooks."""
    model = evit_on(variant, keep_rate=0.5)
    fused = model.predict(images)
    ref.set_fused_attention(model.vit, False)
    explicit = model.predict(images)
    torch.testing.assert_close(explicit.logits, fused.logits, rtol=1e-4, atol=1e-5)
    # At blocks 1, 2, 3 the 16 patch tokens become 8 + 1 fused, then 5 + 1, then 3 + 1: the class row before each.
    rows = sum((patches + 1) * TINY["embed_dim"] for patches in (16, 9, 6))
    assert explicit.macs[0].item() == fused.macs[0].item() - rows
    assert explicit.macs[0].item() == pytest.approx(count_macs_with_torch(model.predict, images[:1]), rel=1e-9)


def test_dropping_reports_the_patches_kept_and_no_groups(images):
    model = evit_on("plain", keep_rate=0.5, fuse_inattentive=False)  # 16 -> 8 -> 4 -> 2 patch tokens
    extras = model.predict(images).extras
    assert "patch_groups" not in extras  # every token left is one source patch
    assert [mask.sum(1).tolist() for mask in extras["kept_patches"]] == [[8] * 6, [4] * 6, [2] * 6]
    kept = extras["kept_patches"]
    assert all((later <= earlier).all() for earlier, later in zip(kept, kept[1:]))  # once dropped, gone
    assert (extras["token_length"] == 2).all()


def patches_alone(index):
    """(B, num_patches) bool from a ``patch_groups`` index: patches whose token holds no other patch."""
    counts = torch.zeros_like(index).scatter_add_(1, index, torch.ones_like(index))
    return counts.gather(1, index) == 1


def test_kept_patches_and_groups_follow_the_fusion(images):
    model = evit_on("plain", keep_rate=0.5)  # 16 patches -> 8 kept + 1 fused -> 5 + 1 -> 3 + 1 (blocks 1, 2, 3)
    extras = model.predict(images).extras
    kept, groups = extras["kept_patches"], extras["patch_groups"]
    # A kept token is an original patch, or one of the fused tokens of earlier blocks (holding no kept patch).
    for stage, (mask, index, tokens_kept) in enumerate(zip(kept, groups, [8, 5, 3])):
        assert set(mask.sum(1).tolist()) <= set(range(tokens_kept - stage, tokens_kept + 1))
        assert (index[mask] < tokens_kept).all() and not mask[index == tokens_kept].any()  # the new fused token
        assert patches_alone(index)[mask].all()  # a kept patch is a token of its own
    assert (extras["token_length"] == 4).all()
    assert all((later <= earlier).all() for earlier, later in zip(kept, kept[1:]))  # once fused, always fused


def test_keep_rate_schedule_from_scratch_follows_the_published_cosine():
    model = tiny_model("evit", keep_rate=0.5)  # not started from a trained model: the warm-up
    assert model.keep_rate_schedule == "warmup"
    start, end = 10 / 300, 110 / 300
    assert model.training_keep_rate() == 0.5  # no trainer: the target
    for progress, expected in [(0.0, 1.0), (start - 1e-6, 1.0), (start, 1.0), ((start + end) / 2, 0.75),
                               (end, 0.5), (0.9, 0.5)]:
        model.set_training_progress(progress)
        assert model.training_keep_rate() == pytest.approx(expected)


def test_a_model_started_from_a_trained_one_fine_tunes_at_the_target_keep_rate():
    dense = tiny_model("dense")
    model = tiny_model("evit", keep_rate=0.5)
    model.init_from_dense(dense.state_dict())
    assert model.config["method_kwargs"]["keep_rate_schedule"] == "constant"
    for progress in (0.0, 0.2, 0.9):
        model.set_training_progress(progress)
        assert model.training_keep_rate() == 0.5
    chosen = tiny_model("evit", keep_rate=0.5, keep_rate_schedule="warmup")
    chosen.init_from_dense(dense.state_dict())
    chosen.set_training_progress(0.0)
    assert chosen.training_keep_rate() == 1.0 and chosen.config["method_kwargs"]["keep_rate_schedule"] == "warmup"


def test_a_backbone_built_with_trained_weights_fine_tunes_at_the_target_keep_rate(tmp_path):
    from safetensors.torch import save_file

    from dyntok.models import create_backbone

    weights = tmp_path / "vit.safetensors"
    save_file(create_backbone("vit_cifar_tiny", **TINY).state_dict(), weights)
    model = EViT(BackboneSpec("vit_cifar_tiny", TINY, pretrained_file=str(weights)), keep_rate=0.5)
    assert model.config["method_kwargs"]["keep_rate_schedule"] == "constant"
    model.set_training_progress(0.0)
    assert model.training_keep_rate() == 0.5


def test_fine_tune_from_a_dense_checkpoint_trains_at_the_target_from_the_first_step(image_folder, tmp_path,
                                                                                     monkeypatch):
    from dyntok.methods import load_model
    from dyntok.data import DataConfig
    from dyntok.training import TrainConfig, train

    model_kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    data = DataConfig(dataset=str(image_folder), batch_size=8, holdout_size=0, cache_dir=str(tmp_path / "cache"))
    dense = train(TrainConfig(model="vit_cifar_tiny", model_kwargs=model_kwargs, data=data, epochs=0,
                              output_dir=str(tmp_path / "dense"), progress=False))
    seen, scheduled = [], EViT.training_keep_rate
    monkeypatch.setattr(EViT, "training_keep_rate", lambda self: seen.append(scheduled(self)) or seen[-1])
    evit = train(TrainConfig(model="evit_vit_cifar_tiny", model_kwargs={**model_kwargs, "keep_rate": 0.5}, data=data,
                             epochs=1, init=str(dense.model_path), output_dir=str(tmp_path / "evit"), progress=False))
    assert seen == [0.5] * 3  # 24 images, batch 8
    assert load_model(evit.model_path).config["method_kwargs"]["keep_rate_schedule"] == "constant"


def test_trainer_reports_progress_to_the_schedule(image_folder, tmp_path, monkeypatch):
    from dyntok.data import DataConfig
    from dyntok.training import TrainConfig, train

    seen = []
    monkeypatch.setattr(EViT, "set_training_progress", lambda self, fraction: seen.append(fraction))
    model_kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    data = DataConfig(dataset=str(image_folder), batch_size=8, holdout_size=0, cache_dir=str(tmp_path / "cache"))
    train(TrainConfig(model="evit_vit_cifar_tiny", model_kwargs=model_kwargs, data=data, epochs=2,
                      output_dir=str(tmp_path / "run"), progress=False))
    assert seen == pytest.approx([step / 6 for step in range(6)])  # 24 images, batch 8, 2 epochs


@pytest.mark.parametrize("knobs, message", [
    ({"keep_rate": 0.0}, r"in \(0, 1\]"),
    ({"keep_rate": 1.5}, r"in \(0, 1\]"),
    ({"keep_rate": "0.7"}, r"in \(0, 1\]"),
    ({"r": 2}, "no budget knob r; knobs: keep_rate"),
])
def test_impossible_knobs_are_rejected(knobs, message):
    model = tiny_model("evit")
    with pytest.raises(ValueError, match=message):
        model.set_budget(**knobs)
    assert model.get_budget() == {"keep_rate": 0.7}


def test_constructor_checks():
    with pytest.raises(ValueError, match="no class token"):
        tiny_model("evit", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="prune_locations"):
        tiny_model("evit", prune_locations=[4])
    with pytest.raises(ValueError, match="shares of training"):
        tiny_model("evit", shrink_start=0.5, shrink_end=0.2)
    with pytest.raises(ValueError, match="keep_rate_schedule is one of warmup, constant"):
        tiny_model("evit", keep_rate_schedule="cosine")


def test_default_locations_scale_with_depth():
    assert tiny_model("evit").prune_locations == (1, 2, 3)
    assert tiny_model("evit", depth=12).prune_locations == (3, 6, 9)  # the paper's 4th, 7th and 10th blocks


def test_kept_count_rounds_up_without_float_noise():
    assert kept_count(0.7, 100) == 70 and kept_count(0.7, 196) == 138 and kept_count(0.01, 16) == 1


def test_training_free_from_a_dense_checkpoint(images):
    dense = ref.randomise(dyntok.create_model("vit_cifar_tiny", **TINY)).eval()
    model = tiny_model("evit", keep_rate=1.0).eval()
    model.init_from_dense(dense.state_dict())
    torch.testing.assert_close(model.predict(images).logits, dense.predict(images).logits, rtol=0, atol=0)
