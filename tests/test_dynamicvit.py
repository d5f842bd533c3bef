"""DynamicViT: masked training forward, gathering inference, MACs, losses and knobs, on tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dyntok
from dyntok.methods import load_model, save_model
from dyntok.measure.macs import count_macs_with_torch
from dyntok.methods.dynamicvit import (KeepPredictor, default_prune_locations, keep_attention_mask,
                                       predictor_macs)

from .conftest import TINY, tiny_model

criterion = nn.CrossEntropyLoss()


def dense_and_pruned(keep_ratio: float, name: str = "vit_cifar_tiny", **overrides):
    """A dense model and a DynamicViT started from its weights, both in eval mode."""
    overrides = {**TINY, **overrides}
    torch.manual_seed(0)
    dense = dyntok.create_model(name, **overrides)
    model = dyntok.create_model(f"dynamicvit_{name}", keep_ratio=keep_ratio, **overrides)
    model.init_from_dense(dense.state_dict())
    return dense.eval(), model.eval()


#: A timm ViT with 4 register tokens and average pooling: checks prefix handling and the masked mean.
REGISTER_GAP = dict(name="vit_medium_patch16_reg4_gap_256")


# --------------------------------------------------------------------------------------------- structure
def test_default_prune_locations():
    assert default_prune_locations(12) == [3, 6, 9]
    assert default_prune_locations(6) == [1, 3, 4]
    assert default_prune_locations(4) == [1, 2, 3]
    assert default_prune_locations(2) == [1]
    with pytest.raises(ValueError):
        default_prune_locations(1)


@pytest.mark.parametrize("locations", [[], [2, 1], [1, 1], [4], [-1]])
def test_invalid_prune_locations_are_rejected(locations):
    with pytest.raises(ValueError):
        tiny_model("dynamicvit", prune_locations=locations)


def test_stage_keep_counts_follow_powers_of_the_ratio():
    model = tiny_model("dynamicvit", img_size=40)  # 10x10 = 100 patches
    model.set_budget(keep_ratio=0.7)
    assert model.stage_keep_counts() == [70, 49, 34]  # 0.7**2 * 100 is 48.99999...: must give 49
    model.set_budget(keep_ratio=0.01)
    assert model.stage_keep_counts() == [1, 1, 1]


def test_attention_mask_equals_the_official_masked_softmax_and_its_gradient():
    """softmax(logits + mask) == exp(logits) * G / sum, G_ij = 1 if i == j else keep_j; same d/d keep."""
    torch.manual_seed(0)
    batch, heads, tokens = 2, 3, 6
    logits = torch.randn(batch, heads, tokens, tokens, dtype=torch.float64)
    keep = (torch.rand(batch, tokens) > 0.5).double().requires_grad_(True)
    weights = torch.randn_like(logits)
    ours = torch.softmax(logits + keep_attention_mask(keep).double(), dim=-1)
    policy = keep[:, None, None, :] + (1 - keep[:, None, None, :]) * torch.eye(tokens, dtype=torch.float64)
    official = logits.exp() * policy
    official = official / official.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(ours, official)
    ours_grad, = torch.autograd.grad((ours * weights).sum(), keep)
    official_grad, = torch.autograd.grad((official * weights).sum(), keep)
    torch.testing.assert_close(ours_grad, official_grad, rtol=1e-4, atol=1e-5)  # mask is built in float32


# --------------------------------------------------------------------------------------------- forwards
@pytest.mark.parametrize("backbone", [{}, REGISTER_GAP], ids=["class-token", "registers-avg-pool"])
def test_keep_ratio_one_reproduces_the_dense_backbone(backbone, images):
    """Both rewritten forwards against timm's own: nothing pruned means the dense logits."""
    dense, model = dense_and_pruned(1.0, **backbone)
    expected = dense.vit(images)
    torch.testing.assert_close(model.predict(images).logits, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", [{}, REGISTER_GAP], ids=["class-token", "registers-avg-pool"])
def test_masked_forward_and_gathering_keep_the_same_tokens(backbone, images):
    """In eval mode the masked forward takes predict's top-k decisions: same tokens, same logits."""
    _, model = dense_and_pruned(0.5, **backbone)
    prediction = model.predict(images)
    with torch.no_grad():
        masked = model(images)
    assert len(masked.decisions) == len(prediction.extras["kept_patches"]) == len(model.prune_locations)
    for decision, kept in zip(masked.decisions, prediction.extras["kept_patches"]):
        assert torch.equal(decision.bool(), kept)
    torch.testing.assert_close(masked.logits, prediction.logits, rtol=1e-4, atol=1e-5)


def test_kept_patches_shrink_stage_by_stage(images):
    _, model = dense_and_pruned(0.7)
    prediction = model.predict(images)
    counts = model.stage_keep_counts()
    for stage, kept in enumerate(prediction.extras["kept_patches"]):
        assert kept.shape == (len(images), model.num_patches)
        assert (kept.sum(dim=1) == counts[stage]).all()
        if stage:  # a dropped patch stays dropped
            assert not (kept & ~prediction.extras["kept_patches"][stage - 1]).any()
    assert (prediction.extras["kept_tokens"] == counts[-1]).all()


def test_training_decisions_are_hard_cumulative_and_differentiable(images):
    model = tiny_model("dynamicvit", keep_ratio=0.5).train()
    output = model(images)
    previous = torch.ones_like(output.decisions[0])
    for decision in output.decisions:
        assert decision.requires_grad
        assert ((decision == 0) | (decision == 1)).all()
        assert (decision <= previous).all()
        previous = decision


# --------------------------------------------------------------------------------------------- training
def test_gradients_reach_every_predictor_and_backbone_parameter(images, labels):
    dense, model = dense_and_pruned(0.7)
    model.attach_teacher(dense)
    model.train()
    loss = model.compute_loss(model(images), labels, criterion)
    loss.total.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_task_loss_reaches_the_predictors_through_the_attention_mask(images, labels):
    """Without the ratio loss, only the masked attention can carry a gradient to the predictors."""
    model = tiny_model("dynamicvit", ratio_weight=0.0).train()
    model.compute_loss(model(images), labels, criterion).total.backward()
    assert all(p.grad is not None and p.grad.any() for p in model.predictors.parameters())


def test_loss_terms_with_and_without_a_teacher(images, labels):
    dense, model = dense_and_pruned(0.7)
    model.train()
    alone = model.compute_loss(model(images), labels, criterion)
    assert set(alone.terms) == {"task", "ratio"}
    model.attach_teacher(dense)
    taught = model.compute_loss(model(images), labels, criterion)
    assert set(taught.terms) == {"task", "ratio", "distill", "token_distill"}
    assert all(torch.isfinite(torch.tensor(value)) for value in taught.terms.values())
    assert torch.isfinite(taught.total)


def test_soft_targets_go_straight_to_the_criterion(images):
    model = tiny_model("dynamicvit").train()
    soft = torch.softmax(torch.randn(len(images), TINY["num_classes"]), dim=-1)
    assert torch.isfinite(model.compute_loss(model(images), soft, criterion).total)


def test_keeping_a_single_token_never_gives_nan(images, labels):
    dense, model = dense_and_pruned(0.01)
    model.attach_teacher(dense)
    model.train()
    for _ in range(3):  # several Gumbel draws, some of which drop every patch of an image
        model.zero_grad()
        loss = model.compute_loss(model(images), labels, criterion)
        assert torch.isfinite(loss.total)
        loss.total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    prediction = model.predict(images)
    assert torch.isfinite(prediction.logits).all()
    assert (prediction.extras["kept_tokens"] == 1).all()


def test_phases_and_param_groups():
    model = tiny_model("dynamicvit")
    assert [phase.name for phase in model.training_phases()] == ["warmup", "main"]
    assert sum(phase.epoch_share for phase in model.training_phases()) == pytest.approx(1.0)
    predictor_ids = {id(p) for p in model.predictors.parameters()}

    model.set_phase("warmup")
    grouped = [p for group in model.param_groups(0.05) for p in group["params"]]
    assert {id(p) for p in grouped} == predictor_ids
    assert not any(p.requires_grad for p in model.vit.parameters())

    model.set_phase("main")
    groups = model.param_groups(0.05)
    assert {id(p) for group in groups for p in group["params"]} == {id(p) for p in model.parameters()}
    for group in groups:
        in_predictors = {id(p) in predictor_ids for p in group["params"]}
        assert len(in_predictors) == 1
        assert group["lr_scale"] == (1.0 if in_predictors == {True} else 0.01)
    assert [phase.name for phase in tiny_model("dynamicvit", predictor_warmup=0).training_phases()] == ["main"]


def test_init_from_dense_loads_the_backbone_strictly():
    dense, model = dense_and_pruned(0.7)
    for name, value in dense.vit.state_dict().items():
        assert torch.equal(model.vit.state_dict()[name], value)
    with pytest.raises(ValueError):
        model.init_from_dense(model.state_dict())  # predictor keys are not a dense checkpoint
    with pytest.raises(RuntimeError):
        model.init_from_dense({"vit.cls_token": dense.vit.cls_token})


# --------------------------------------------------------------------------------------------- inference cost
def test_predictor_macs_match_torch_counter():
    predictor = KeepPredictor(32)
    tokens = torch.randn(1, 11, 32)
    assert predictor_macs(predictor, 11) == pytest.approx(count_macs_with_torch(predictor, tokens), rel=1e-6)


@pytest.mark.parametrize("keep_ratio", [1.0, 0.7, 0.3])
@pytest.mark.parametrize("backbone", [{}, REGISTER_GAP], ids=["class-token", "registers-avg-pool"])
def test_predict_macs_match_torch_counter(keep_ratio, backbone, images):
    _, model = dense_and_pruned(keep_ratio, **backbone)
    reported = model.predict(images[:1]).macs.item()
    assert reported == pytest.approx(count_macs_with_torch(model.predict, images[:1]), rel=0.01)
    batch = model.predict(images).macs
    assert (batch == reported).all()
    if keep_ratio < 1.0:
        assert reported < model.dense_macs()


# --------------------------------------------------------------------------------------------- knobs and persistence
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, "0.5", None, True])
def test_set_budget_rejects_impossible_keep_ratios(bad):
    model = tiny_model("dynamicvit")
    with pytest.raises(ValueError):
        model.set_budget(keep_ratio=bad)
    with pytest.raises(ValueError):
        model.set_budget(ratio=0.5)
    assert model.get_budget() == {"keep_ratio": 0.7}


def test_budget_sweep_and_a_smaller_ratio_costs_less(images):
    model = tiny_model("dynamicvit").eval()
    sweep = model.budget_sweep()
    assert [point["keep_ratio"] for point in sweep] == [0.5, 0.6, 0.7, 0.8, 0.9]
    macs = []
    for point in sweep:
        model.set_budget(**point)
        macs.append(model.predict(images).macs[0].item())
    assert macs == sorted(macs)


def test_save_load_round_trip_keeps_keep_ratio_and_logits(images, tmp_path):
    model = tiny_model("dynamicvit").eval()
    model.set_budget(keep_ratio=0.55)
    loaded = load_model(save_model(model, tmp_path / "dynamicvit.safetensors")).eval()
    assert loaded.get_budget() == {"keep_ratio": 0.55}
    assert loaded.prune_locations == model.prune_locations
    assert torch.equal(loaded.predict(images).logits, model.predict(images).logits)


def test_keep_ratio_one_skips_the_predictors_and_is_the_dense_model(images):
    dense, model = dense_and_pruned(keep_ratio=1.0)
    calls = []
    for predictor in model.predictors:
        predictor.register_forward_hook(lambda *args: calls.append(1))
    prediction = model.predict(images)
    assert calls == []
    torch.testing.assert_close(prediction.logits, dense.predict(images).logits)
    assert (prediction.macs == dense.dense_macs()).all()
    assert [kept.all() for kept in prediction.extras["kept_patches"]] == [True] * len(model.prune_locations)
    model.set_budget(keep_ratio=0.5)  # fewer tokens at every stage: every predictor runs again
    model.predict(images)
    assert len(calls) == len(model.prune_locations)
