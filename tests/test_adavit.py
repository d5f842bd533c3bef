"""AdaViT: decisions, the masked training forward against the skipping inference, MACs, losses and knobs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dyntok
from dyntok.measure.macs import count_macs_with_torch
from dyntok.methods import adavit
from dyntok.methods.adavit import ATTENTION_BATCHING, _heads_gated, attention_on_heads, gumbel_sigmoid

from .conftest import TINY, tiny_model

criterion = nn.CrossEntropyLoss()
FULL = dict(patch_threshold=0.0, head_threshold=0.0, block_threshold=0.0)
NOTHING = dict(patch_threshold=1.0, head_threshold=1.0, block_threshold=1.0)


def dense_and_adavit(**kwargs):
    """A dense model and an AdaViT started from its weights, both in eval mode."""
    dense = tiny_model("dense")
    model = tiny_model("adavit", **kwargs)
    model.init_from_dense(dense.state_dict())
    return dense.eval(), model.eval()


def spread_decisions(model, scale: float = 20.0):
    """Random policy weights large enough that images disagree on patches, heads and blocks."""
    torch.manual_seed(3)
    for policy in model.policies:
        for layer in policy.modules_by_policy().values():
            nn.init.normal_(layer.weight, std=scale / layer.in_features)
    return model


# --------------------------------------------------------------------------------------------- decisions
def test_gumbel_sigmoid_is_exactly_binary_with_the_sigmoid_gradient():
    torch.manual_seed(0)
    logits = torch.randn(1000, requires_grad=True)
    decisions = gumbel_sigmoid(logits, threshold=0.5, temperature=5.0, training=True)
    assert set(decisions.unique().tolist()) == {0.0, 1.0}
    decisions.sum().backward()
    assert (logits.grad > 0).all() and (logits.grad <= 0.25 / 5.0 + 1e-6).all()


def test_gumbel_sigmoid_at_inference_is_deterministic_and_thresholds_are_extremes():
    logits = torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0])
    assert gumbel_sigmoid(logits, 0.5, 5.0, training=False).tolist() == [0, 0, 0, 1, 1]
    # 0.6 on sigmoid(logits / 5): logits above 5 * logit(0.6) = 2.03 are kept.
    assert gumbel_sigmoid(torch.tensor([2.0, 2.1]), 0.6, 5.0, training=False).tolist() == [0, 1]
    for training in (False, True):
        assert gumbel_sigmoid(logits, 0.0, 5.0, training).all()
        assert not gumbel_sigmoid(logits, 1.0, 5.0, training).any()


def test_training_decisions_start_near_the_usage_targets(images):
    model = tiny_model("adavit", patch_target=0.3, head_target=0.5, block_target=0.8).train()
    torch.manual_seed(0)
    usage = model.compute_loss(model(images.repeat(8, 1, 1, 1)), torch.zeros(48, dtype=torch.long), criterion).terms
    assert usage["patch_usage"] == pytest.approx(0.3, abs=0.1)
    assert usage["head_usage"] == pytest.approx(0.5, abs=0.1)
    assert usage["block_usage"] == pytest.approx(0.8, abs=0.1)


# --------------------------------------------------------------------------------------------- the seams
def test_attention_on_every_head_is_timms_attention():
    attn = tiny_model("adavit").eval().vit.blocks[1].attn
    x = torch.randn(3, 9, TINY["embed_dim"])
    torch.testing.assert_close(attention_on_heads(attn, x, torch.arange(attn.num_heads)), attn(x))


def test_attention_on_some_heads_equals_timms_attention_with_the_others_gated_off():
    model = tiny_model("adavit", num_heads=4).eval()
    attn = model.vit.blocks[1].attn
    x = torch.randn(2, 9, TINY["embed_dim"])
    heads = torch.tensor([0, 2])
    with _heads_gated(attn, torch.tensor([[1.0, 0.0, 1.0, 0.0]]).expand(2, -1)):
        gated = attn(x)
    torch.testing.assert_close(attention_on_heads(attn, x, heads), gated)
    assert not attn.proj._forward_pre_hooks, "the gate must not outlive its block"


# --------------------------------------------------------------------------------------------- equivalences
def test_every_policy_forced_on_gives_the_dense_logits(images):
    dense, model = dense_and_adavit()
    model.set_budget(**FULL)
    expected = dense.predict(images).logits
    prediction = model.predict(images)
    torch.testing.assert_close(prediction.logits, expected)
    torch.testing.assert_close(model(images).logits, expected)
    assert prediction.extras["kept_blocks"].all() and all(kept.all() for kept in prediction.extras["kept_patches"])
    assert prediction.macs.tolist() == [model.dense_macs()] * len(images)


def test_blocks_that_keep_everything_take_the_plain_path_with_the_same_results(images, monkeypatch):
    _, model = dense_and_adavit()
    model.set_budget(**FULL)
    plain = model.predict(images)
    monkeypatch.setattr(adavit, "_keeps_everything", lambda decided: False)
    grouped = model.predict(images)
    torch.testing.assert_close(plain.logits, grouped.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.macs, grouped.macs)
    for key in ("kept_patches", "kept_heads"):
        assert all(torch.equal(a, b) for a, b in zip(plain.extras[key], grouped.extras[key]))
    assert torch.equal(plain.extras["kept_blocks"], grouped.extras["kept_blocks"])


@pytest.mark.parametrize("batching", ATTENTION_BATCHING)
def test_skipping_inference_equals_the_masked_forward(images, batching):
    _, model = dense_and_adavit()
    spread_decisions(model).attention_batching = batching
    batch = images.repeat(3, 1, 1, 1) + 0.3 * torch.randn(18, *images.shape[1:])
    prediction = model.predict(batch)
    blocks, heads = prediction.extras["kept_blocks"][:, 1:], torch.stack(prediction.extras["kept_heads"][1:], 1)
    patches = torch.stack(prediction.extras["kept_patches"][1:], 1)
    # The comparison only means something if images disagree on every kind of decision.
    for kept in (blocks, heads, patches):
        assert 0.1 < kept.float().mean() < 0.9
    assert len(set(patches.sum(-1).flatten().tolist())) > 3
    torch.testing.assert_close(prediction.logits, model(batch).logits, rtol=1e-4, atol=1e-5)


def test_batching_strategies_give_the_same_logits_and_padding_is_charged(images):
    _, model = dense_and_adavit()
    spread_decisions(model)
    predictions = {}
    for batching in ATTENTION_BATCHING:
        model.attention_batching = batching
        predictions[batching] = model.predict(images)
    exact = predictions["per_image"].macs
    torch.testing.assert_close(predictions["regroup"].macs, exact)
    assert (predictions["pad"].macs >= exact).all()
    for prediction in predictions.values():
        torch.testing.assert_close(prediction.logits, predictions["per_image"].logits, rtol=1e-4, atol=1e-5)


def test_batch_macs_are_each_images_own_without_padding(images):
    _, model = dense_and_adavit()
    spread_decisions(model).attention_batching = "regroup"
    alone = torch.cat([model.predict(image[None]).macs for image in images])
    torch.testing.assert_close(model.predict(images).macs, alone)
    assert len(set(alone.tolist())) > 1, "images should cost different amounts"


# --------------------------------------------------------------------------------------------- degenerate budgets
def test_no_patch_and_no_head_kept_trains_and_predicts_without_nan(images, labels):
    model = tiny_model("adavit")
    model.set_budget(**NOTHING)
    loss = model.compute_loss(model.train()(images), labels, criterion)
    assert loss.terms["patch_usage"] == loss.terms["head_usage"] == loss.terms["block_usage"] == 0.0
    loss.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    prediction = model.eval().predict(images)
    assert torch.isfinite(prediction.logits).all()
    assert prediction.macs.tolist() == [model.predict(images[:1]).macs.item()] * len(images)
    torch.testing.assert_close(prediction.logits, model(images).logits)


@pytest.mark.parametrize("knobs", [dict(patch_threshold=1.0, head_threshold=0.0, block_threshold=0.0),
                                   dict(patch_threshold=0.0, head_threshold=1.0, block_threshold=0.0)],
                         ids=["no_patch", "no_head"])
def test_blocks_with_no_patch_or_no_head_match_the_masked_forward(images, labels, knobs):
    model = tiny_model("adavit")
    model.set_budget(**knobs)
    model.compute_loss(model.train()(images), labels, criterion).total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    prediction = model.eval().predict(images)
    assert torch.isfinite(prediction.logits).all()
    torch.testing.assert_close(prediction.logits, model(images).logits)


# --------------------------------------------------------------------------------------------- training
def test_gradients_reach_every_decision_module(images, labels):
    model = tiny_model("adavit").train()
    torch.manual_seed(0)
    loss = model.compute_loss(model(images), labels, criterion)
    loss.total.backward()
    for index, policy in enumerate(model.policies, start=1):
        for name, layer in policy.modules_by_policy().items():
            assert layer.weight.grad is not None and layer.weight.grad.any(), f"block {index} {name} policy"


def test_the_task_loss_alone_reaches_the_patch_policy_through_the_attention_mask(images, labels):
    model = tiny_model("adavit", head_policy=False, block_policy=False, patch_weight=0.0).train()
    torch.manual_seed(0)
    model.compute_loss(model(images), labels, criterion).total.backward()
    assert all(policy.patch.weight.grad.any() for policy in model.policies)


def test_usage_losses_follow_the_published_forms(images, labels):
    model = tiny_model("adavit", patch_target=0.2, head_target=0.4, block_target=0.7, head_weight=3.0).train()
    output = model(images)
    loss = model.compute_loss(output, labels, criterion)
    terms = loss.terms
    expected = (terms["task"] + 2.0 * (terms["patch_usage"] - 0.2) ** 2 + 3.0 * abs(terms["head_usage"] - 0.4)
                + 2.0 * abs(terms["block_usage"] - 0.7))
    assert loss.total.item() == pytest.approx(expected, rel=1e-5)


def test_policy_switches(images, labels):
    model = tiny_model("adavit", patch_policy=False, block_policy=False).eval()
    spread_decisions(model)
    assert all(policy.patch is None and policy.block is None and policy.head is not None for policy in model.policies)
    assert model.get_budget() == {"head_threshold": 0.5}
    with pytest.raises(ValueError):
        model.set_budget(patch_threshold=0.5)
    prediction = model.predict(images)
    assert all(kept.all() for kept in prediction.extras["kept_patches"])
    assert not torch.stack(prediction.extras["kept_heads"]).all()
    terms = model.train().compute_loss(model(images), labels, criterion).terms
    assert set(terms) == {"task", "head_usage"}
    with pytest.raises(ValueError):
        tiny_model("adavit", patch_policy=False, head_policy=False, block_policy=False)


# --------------------------------------------------------------------------------------------- MACs, extras, knobs
@pytest.mark.parametrize("knobs", [FULL, NOTHING, {}], ids=["full", "nothing", "default"])
def test_macs_match_torch_flop_counter(images, knobs):
    _, model = dense_and_adavit()
    spread_decisions(model).set_budget(**knobs)
    for image in images[:3]:
        batch = image[None]
        assert model.predict(batch).macs.item() == pytest.approx(count_macs_with_torch(model.predict, batch), rel=0.01)


def test_extras_have_the_standard_shapes(images):
    model = spread_decisions(tiny_model("adavit")).eval()
    extras = model.predict(images).extras
    depth, patches, heads = TINY["depth"], (TINY["img_size"] // TINY["patch_size"]) ** 2, TINY["num_heads"]
    assert extras["kept_blocks"].shape == (len(images), depth, 2) and extras["kept_blocks"][:, 0].all()
    assert [kept.shape for kept in extras["kept_patches"]] == [(len(images), patches)] * depth
    assert [kept.shape for kept in extras["kept_heads"]] == [(len(images), heads)] * depth
    # A skipped attention runs no head.
    skipped = ~extras["kept_blocks"][:, :, 0]
    assert not torch.stack(extras["kept_heads"], 1)[skipped].any()


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.5", None])
def test_thresholds_outside_zero_one_are_rejected(value):
    with pytest.raises(ValueError):
        tiny_model("adavit").set_budget(head_threshold=value)


def test_budget_sweep_goes_from_generous_to_aggressive(images):
    model = spread_decisions(tiny_model("adavit")).eval()
    sweep = model.budget_sweep()
    assert len(sweep) >= 4 and {"patch_threshold": 0.6, "head_threshold": 0.5, "block_threshold": 0.5} in sweep
    costs = []
    for point in sweep:
        model.set_budget(**point)
        costs.append(model.predict(images).macs.mean().item())
    assert costs[0] > costs[-1] and costs[0] > 0.8 * model.dense_macs()


def test_unsupported_backbones_are_refused():
    with pytest.raises(ValueError, match="class token"):
        dyntok.create_model("adavit_vit_cifar_tiny", **{**TINY, "class_token": False, "global_pool": "avg"})


def test_calibration_sets_thresholds_that_reach_a_usage_on_held_out_images(images):
    model = spread_decisions(tiny_model("adavit", head_policy=False, block_policy=False)).eval()
    held_out = images.repeat(4, 1, 1, 1) + 0.3 * torch.randn(24, *images.shape[1:])
    budget = model.calibrate([(held_out[:12], None), (held_out[12:], None)], usage=0.3)
    assert set(budget) == {"patch_threshold"} and 0.0 < budget["patch_threshold"] < 1.0
    kept = torch.stack(model.predict(held_out).extras["kept_patches"][1:]).float().mean().item()
    assert kept == pytest.approx(0.3, abs=0.05)
    sweep = model.budget_sweep()
    assert len(sweep) == 5 and {"patch_threshold": 0.6} in sweep
    assert sweep[0]["patch_threshold"] < sweep[-1]["patch_threshold"]
    model.calibrate([(held_out, None)], usage=1.0)
    assert model.get_budget() == {"patch_threshold": 0.0}


def test_bfloat16_autocast_trains_and_predicts(images, labels):
    _, model = dense_and_adavit()
    spread_decisions(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = model.predict(images)
        loss = model.compute_loss(model.train()(images), labels, criterion)
    assert torch.isfinite(prediction.logits).all() and torch.isfinite(loss.total)
    loss.total.backward()
