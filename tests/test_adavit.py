"""AdaViT: decisions, the masked training forward against the skipping inference, MACs, losses and knobs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyntok
from dyntok.fileio import save_tensors
from dyntok.measure.macs import count_macs_with_torch, linear_macs
from dyntok.methods import adavit_skipping, load_model
from dyntok.methods.adavit import (ATTENTION_BATCHING, AdaViTOutput, Decisions, _heads_gated, attention_on_heads,
                                   gumbel_sigmoid, mlp_channels, mlp_on_channels)

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


def spread_decisions(model, scale: float = 20.0, seed: int = 3):
    """Random policy weights large enough that images disagree on patches, heads and blocks."""
    torch.manual_seed(seed)
    for policy in model.block_policies():
        for layer in policy.modules_by_policy().values():
            nn.init.normal_(layer.weight, std=scale / layer.in_features)
    return model


def varied(images, copies: int = 3):
    """More images, each a noisy copy of one of ``images``, so that decisions vary between them."""
    torch.manual_seed(4)
    batch = images.repeat(copies, 1, 1, 1)
    return batch + 0.3 * torch.randn_like(batch)


# --------------------------------------------------------------------------------------------- the official model
def official_block(block, x, patches=None, heads=None, layers=None, gate_mlp=True):
    """One block of the released AdaViT (its ``StepAdaBlock`` as configured for Ada-DeiT-S) on the weights of
    a timm ``Block``, written out from the official code for given 0/1 decisions, without dyntok's helpers:
    ``patches`` (B, N), ``heads`` (B, H), ``layers`` (B, 2: attention, MLP); ``None`` where the block takes no
    such decision. A head gates its q, k, v rows, its proj columns and the embedding channels
    ``h * D/H .. (h+1) * D/H`` at fc1's input; the patch mask (detached) lets kept tokens see kept tokens and a
    dropped token only itself; a gated block has no drop-path (the tests run without)."""
    batch, length, dim = x.shape
    num_heads = block.attn.num_heads
    head_dim = dim // num_heads
    width = x.new_ones(batch, dim) if heads is None else heads.repeat_interleave(head_dim, dim=1)
    normed = block.norm1(x)
    weights, biases = block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)
    q, k, v = ((F.linear(normed, w, b) * width[:, None]).reshape(batch, length, num_heads, head_dim).transpose(1, 2)
               for w, b in zip(weights, biases))
    logits = q @ k.transpose(-2, -1) * head_dim ** -0.5
    token_select = None
    if patches is not None:
        token_select = torch.cat([patches.new_ones(batch, 1), patches], dim=1)
        pairs = (token_select[:, :, None] * token_select[:, None, :]).detach()[:, None]
        fill = torch.zeros_like(logits).masked_fill((1 - pairs - torch.eye(length)) > 0, float("-inf"))
        logits = logits * pairs + fill
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, dim)
    out = F.linear(out * width[:, None], block.attn.proj.weight, block.attn.proj.bias)
    if token_select is not None:
        out = out * token_select[..., None]
    x = x + (out if layers is None else layers[:, :1, None] * out)
    hidden = block.norm2(x) * (width[:, None] if gate_mlp else 1.0)
    out = block.mlp.fc2(F.gelu(block.mlp.fc1(hidden)))
    if token_select is not None:
        out = out * token_select[..., None]
    return x + (out if layers is None else layers[:, 1:, None] * out)


def official_forward(model, images):
    """The released AdaViT's inference on ``model``'s weights: every block's decisions taken from its own input
    (thresholds 0.6 / 0.5 / 0.5 on ``sigmoid(logit / 5)``, dyntok's boundary), then :func:`official_block`."""
    vit = model.vit
    x = torch.cat([vit.cls_token.expand(len(images), -1, -1), vit.patch_embed(images)], dim=1) + vit.pos_embed

    def decide(layer, inputs, threshold):
        return None if layer is None else (torch.sigmoid(layer(inputs) / 5.0) > threshold).float()

    for block, policy in zip(vit.blocks, model.block_policies()):
        patches = decide(policy.patch, block.norm1(x)[:, 1:], 0.6)
        x = official_block(block, x, None if patches is None else patches.squeeze(-1),
                           decide(policy.head, x[:, 0], 0.5), decide(policy.block, x[:, 0], 0.5))
    return vit.head(vit.norm(x)[:, 0])


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


def test_training_decisions_start_where_the_official_initialisation_starts(images):
    """Zero biases: under the training noise a share sigmoid(-5 * logit(threshold)) is kept, whatever the target."""
    model = tiny_model("adavit", patch_target=0.3, head_target=0.5, block_target=0.8).train()
    torch.manual_seed(0)
    usage = model.compute_loss(model(images.repeat(8, 1, 1, 1)), torch.zeros(48, dtype=torch.long), criterion).terms
    patches = 16
    kept_patch = torch.sigmoid(torch.tensor(-5.0 * math.log(0.6 / 0.4))).item()  # 0.116
    assert usage["patch_usage"] == pytest.approx((1 + patches * kept_patch) / (1 + patches), abs=0.05)
    assert usage["head_usage"] == pytest.approx(0.5, abs=0.1)
    assert usage["block_usage"] == pytest.approx(0.5, abs=0.1)


def test_target_biases_start_each_policy_at_its_usage_target(images):
    """policy_bias='target': under the training noise each policy keeps its target share from the first step."""
    model = tiny_model("adavit", patch_target=0.3, head_target=0.5, block_target=0.8, policy_bias="target").train()
    torch.manual_seed(0)
    usage = model.compute_loss(model(images.repeat(8, 1, 1, 1)), torch.zeros(48, dtype=torch.long), criterion).terms
    patches = 16
    assert usage["patch_usage"] == pytest.approx((1 + patches * 0.3) / (1 + patches), abs=0.05)
    assert usage["head_usage"] == pytest.approx(0.5, abs=0.1)
    assert usage["block_usage"] == pytest.approx(0.8, abs=0.1)
    with pytest.raises(ValueError, match="policy_bias must be one of zero, target"):
        tiny_model("adavit", policy_bias="prior")


# --------------------------------------------------------------------------------------------- the seams
def test_attention_on_every_head_is_timms_attention():
    attn = tiny_model("adavit").eval().vit.blocks[1].attn
    x = torch.randn(3, 9, TINY["embed_dim"])
    torch.testing.assert_close(attention_on_heads(attn, x, torch.arange(attn.num_heads)), attn(x))


def test_attention_on_some_heads_equals_timms_attention_with_the_others_gated_off():
    block = tiny_model("adavit", num_heads=4).eval().vit.blocks[1]
    x = torch.randn(2, 9, TINY["embed_dim"])
    with _heads_gated(block, torch.tensor([[1.0, 0.0, 1.0, 0.0]]).expand(2, -1), gate_mlp=True):
        gated = block.attn(x)
    torch.testing.assert_close(attention_on_heads(block.attn, x, torch.tensor([0, 2])), gated)
    hooks = (block.attn.qkv._forward_hooks, block.attn.proj._forward_pre_hooks, block.mlp.fc1._forward_pre_hooks)
    assert not any(hooks), "the gates must not outlive their block"


def test_mlp_on_every_channel_is_timms_mlp():
    mlp = tiny_model("adavit").eval().vit.blocks[1].mlp
    x = torch.randn(3, 9, TINY["embed_dim"])
    torch.testing.assert_close(mlp_on_channels(mlp, x, torch.arange(TINY["embed_dim"])), mlp(x))


@pytest.mark.parametrize("kept", [[1, 3], []], ids=["two_heads", "no_head"])
def test_mlp_on_the_kept_heads_channels_equals_the_gated_fc1(kept):
    """Head h owns the h-th quarter of the embedding channels at fc1's input (the official mapping)."""
    block = tiny_model("adavit", num_heads=4).eval().vit.blocks[1]
    x = torch.randn(2, 9, TINY["embed_dim"])
    gates = torch.zeros(2, 4)
    gates[:, kept] = 1.0
    channels = mlp_channels(block.mlp, 4, torch.tensor(kept, dtype=torch.long))
    assert channels.tolist() == [c for h in kept for c in range(8 * h, 8 * h + 8)]
    with _heads_gated(block, gates, gate_mlp=True):
        gated = block.mlp(x)
    torch.testing.assert_close(mlp_on_channels(block.mlp, x, channels), gated)


# --------------------------------------------------------------------------------------------- equivalences
def test_every_policy_forced_on_gives_the_dense_logits(images):
    dense, model = dense_and_adavit()
    model.set_budget(**FULL)
    expected = dense.predict(images).logits
    prediction = model.predict(images)
    torch.testing.assert_close(prediction.logits, expected)
    torch.testing.assert_close(model(images).logits, expected)
    assert prediction.extras["kept_blocks"].all() and all(kept.all() for kept in prediction.extras["kept_patches"])
    # At thresholds 0 no decision could skip anything, so none is taken: the dense model's cost, not a MAC more.
    assert prediction.macs.tolist() == [dense.dense_macs()] * len(images)


def test_decisions_are_not_taken_where_they_could_skip_nothing(images):
    model = tiny_model("adavit").eval()
    calls = []
    for policy in model.block_policies():
        for layer in policy.modules_by_policy().values():
            layer.register_forward_hook(lambda *_: calls.append(1))
    model.set_budget(**FULL)
    model.predict(images)
    assert not calls
    model.set_budget(**{knob: 0.0 for knob in FULL} | {"head_threshold": 0.5})
    model.predict(images)
    assert calls  # one threshold above 0: the decisions can skip, so they are taken
    calls.clear()
    model.set_budget(**FULL)
    model.calibrate([(images, None)])  # calibrating records every decision's score, so it takes them
    assert calls


def test_the_official_model_equals_the_masked_forward_and_the_skipping_inference(images):
    """For the same hard decisions, a reference written from the released code (head-gated fc1, a patch policy
    from block 0) gives dyntok's logits on both paths."""
    _, model = dense_and_adavit()
    spread_decisions(model)
    batch = varied(images)
    prediction = model.predict(batch)
    kept_heads = torch.stack(prediction.extras["kept_heads"][1:], 1)
    assert 0.1 < kept_heads.float().mean() < 0.9 and not prediction.extras["kept_patches"][0].all()
    expected = official_forward(model, batch)
    torch.testing.assert_close(model(batch).logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prediction.logits, expected, rtol=1e-4, atol=1e-5)


def test_the_official_blocks_gradients_equal_the_masked_blocks():
    """Same outputs and gradients for the tokens and every decision: q, k and v gated (the heads' gradient
    flows through them), the patch mask detached, no drop-path in a gated block (set high here)."""
    model = tiny_model("adavit", num_heads=4, drop_path_rate=0.9).train()
    block, policy = model.vit.blocks[2], model.policies[1]
    torch.manual_seed(5)
    x = torch.randn(3, 17, TINY["embed_dim"], requires_grad=True)
    patches, heads, layers = ((torch.rand(shape) > 0.4).float().requires_grad_() for shape in ((3, 16), (3, 4), (3, 2)))
    ours = model._masked_block(block, policy, x, block.norm1(x), Decisions(patches, heads, layers))
    reference = official_block(block, x, patches, heads, layers)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(ours)
    inputs = (x, patches, heads, layers)
    for got, want in zip(torch.autograd.grad((ours * weights).sum(), inputs),
                         torch.autograd.grad((reference * weights).sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_blocks_that_keep_everything_take_the_plain_path_with_the_same_results(images, monkeypatch):
    _, model = dense_and_adavit()
    model.set_budget(**FULL)
    plain = model.predict(images)
    monkeypatch.setattr(adavit_skipping, "_keeps_everything", lambda decided: False)
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
    batch = varied(images)
    prediction = model.predict(batch)
    blocks, heads = prediction.extras["kept_blocks"][:, 1:], torch.stack(prediction.extras["kept_heads"][1:], 1)
    patches = torch.stack(prediction.extras["kept_patches"], 1)
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
    assert loss.terms["head_usage"] == loss.terms["block_usage"] == 0.0
    assert loss.terms["patch_usage"] == pytest.approx(1 / 17)  # the class token counts as kept
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
    assert model.first_block_policy.patch is not None and model.first_block_policy.head is None
    for index, policy in enumerate(model.block_policies()):
        for name, layer in policy.modules_by_policy().items():
            assert layer.weight.grad is not None and layer.weight.grad.any(), f"block {index} {name} policy"


def test_the_task_loss_reaches_the_patch_policy_through_the_gated_updates_only(images, labels):
    """The attention mask passes no gradient (official): the last block's patch updates never reach the
    class token, so there the task loss alone gives the patch policy nothing."""
    model = tiny_model("adavit", head_policy=False, block_policy=False, patch_weight=0.0).train()
    torch.manual_seed(0)
    model.compute_loss(model(images), labels, criterion).total.backward()
    *earlier, last = model.block_policies()
    assert all(policy.patch.weight.grad.any() for policy in earlier)
    assert not last.patch.weight.grad.any()


def test_gated_blocks_run_without_drop_path(images):
    """With every decision on, training runs the dense blocks; only blocks without a block policy drop paths."""
    dense = tiny_model("dense").eval()
    for block_policy, same in ((True, True), (False, False)):
        model = tiny_model("adavit", block_policy=block_policy, drop_path_rate=0.9)
        model.init_from_dense(dense.state_dict())
        model.set_budget(**{knob: 0.0 for knob in model.get_budget()})
        torch.manual_seed(0)
        logits = model.train()(images).logits
        assert torch.allclose(logits, dense.predict(images).logits, atol=1e-5) == same


def test_usages_follow_the_official_definitions():
    """Patches: blocks 0 .. depth-1, the class token counted as kept. Heads: an image's block that runs neither
    attention nor MLP is left out. Blocks: every decision."""
    model = tiny_model("adavit", num_heads=4)  # 4 blocks, 16 patches, 4 heads
    ones = torch.ones
    first = Decisions(torch.zeros(2, 16), ones(2, 4), ones(2, 2))
    later = Decisions(ones(2, 16), torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]]), torch.tensor([[0.0, 0], [1, 0]]))
    output = AdaViTOutput(torch.zeros(2, 5), [first, later, later, later])
    terms = model.compute_loss(output, torch.zeros(2, dtype=torch.long), criterion).terms
    assert terms["patch_usage"] == pytest.approx((1 + 3 * 17) / (4 * 17))
    assert terms["head_usage"] == pytest.approx(1.0)  # image 0 runs no sub-block: its heads do not count
    assert terms["block_usage"] == pytest.approx(0.25)


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
@pytest.mark.parametrize("head_gates_mlp", [True, False])
@pytest.mark.parametrize("knobs", [FULL, NOTHING, {}], ids=["full", "nothing", "default"])
def test_macs_match_torch_flop_counter(images, knobs, head_gates_mlp):
    _, model = dense_and_adavit(head_gates_mlp=head_gates_mlp)
    spread_decisions(model).set_budget(**knobs)
    for image in images[:3]:
        batch = image[None]
        assert model.predict(batch).macs.item() == pytest.approx(count_macs_with_torch(model.predict, batch), rel=0.01)


def test_a_dropped_head_skips_its_fc1_columns(images):
    """Two blocks, so block 1 decides on the same input with and without head_gates_mlp: the MACs differ by
    exactly fc1's unread columns, tokens x dropped heads' channels x hidden width, for each image."""
    dense = tiny_model("dense", depth=2, num_heads=4)
    gated, plain = (tiny_model("adavit", depth=2, num_heads=4, block_policy=False, head_gates_mlp=flag).eval()
                    for flag in (True, False))
    for model in (gated, plain):
        model.init_from_dense(dense.state_dict())
        spread_decisions(model)
    batch = varied(images)
    prediction = gated.predict(batch)
    tokens = 1 + prediction.extras["kept_patches"][1].sum(dim=1).double()
    dropped = 4 - prediction.extras["kept_heads"][1].sum(dim=1).double()
    assert 0 < dropped.mean() < 4
    fc1 = gated.vit.blocks[1].mlp.fc1
    torch.testing.assert_close(plain.predict(batch).macs - prediction.macs, tokens * dropped / 4 * linear_macs(fc1, 1))


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
    assert costs == sorted(costs, reverse=True) and costs[0] > 0.5 * model.dense_macs() > costs[-1]


def test_checkpoints_saved_before_the_official_options_load_with_the_behaviour_they_were_trained_with(images,
                                                                                                        tmp_path):
    old = spread_decisions(tiny_model("adavit", head_gates_mlp=False, first_block_patch_policy=False)).eval()
    assert not any(name.startswith("first_block_policy") for name in old.state_dict())
    config = old.config
    for option in ("head_gates_mlp", "first_block_patch_policy"):
        del config["method_kwargs"][option]  # as written before the options existed
    path = save_tensors(tmp_path / "old.safetensors", old.state_dict(),
                        {"kind": "model", "config": config, "budget": old.get_budget()})
    loaded = load_model(path).eval()
    assert loaded.config["method_kwargs"]["head_gates_mlp"] is False
    assert loaded.config["method_kwargs"]["first_block_patch_policy"] is False
    assert torch.equal(loaded.predict(images).logits, old.predict(images).logits)
    assert loaded.predict(images).extras["kept_patches"][0].all()


def test_unsupported_backbones_are_refused():
    with pytest.raises(ValueError, match="class token"):
        dyntok.create_model("adavit_vit_cifar_tiny", **{**TINY, "class_token": False, "global_pool": "avg"})


def test_calibration_sets_thresholds_that_reach_a_usage_on_held_out_images(images):
    model = spread_decisions(tiny_model("adavit", head_policy=False, block_policy=False)).eval()
    held_out = images.repeat(4, 1, 1, 1) + 0.3 * torch.randn(24, *images.shape[1:])
    budget = model.calibrate([(held_out[:12], None), (held_out[12:], None)], usage=0.3)
    assert set(budget) == {"patch_threshold"} and 0.0 < budget["patch_threshold"] < 1.0
    kept = torch.stack(model.predict(held_out).extras["kept_patches"]).float().mean().item()
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
