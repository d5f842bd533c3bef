"""DVT: rewritten timm forwards, reuse, real early exit, MAC accounting, thresholds and checkpoints."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

import dyntok
from dyntok.methods import load_model, save_model
from dyntok.measure.macs import count_macs_with_torch
from dyntok.methods.dvt import (DVT, NEVER_EXIT, default_grids, exit_stages, geometric_exit_proportions,
                                stage_geometry, thresholds_for_proportions)
from dyntok.methods.dvt_reuse import (RESAMPLING_MODES, RelationReuse, attention_with_logits, block_forward,
                                      resample_both_token_axes, resample_token_axis, resampling_macs,
                                      token_resampling_matrix)
from dyntok.models.vit import BackboneSpec

#: 16px images; default grids (2, 3, 4) -> patch 8 on 16px, patch 5 on 15px, patch 4 on 16px.
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def tiny_dvt(**kwargs):
    torch.manual_seed(0)
    return dyntok.create_model("dvt_vit_cifar_tiny", **{**TINY, **kwargs})


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(8, 3, 16, 16)


# ------------------------------------------------------------------------------------------ geometry
def test_grid_and_patch_rule():
    assert default_grids(8) == [4, 6, 8] and default_grids(14) == [7, 10, 14]
    assert [stage_geometry(32, g) for g in (4, 6, 8)] == [(8, 32), (5, 30), (4, 32)]
    assert [stage_geometry(224, g) for g in (7, 10, 14)] == [(32, 224), (22, 220), (16, 224)]
    model = tiny_dvt()
    assert model.grids == [2, 3, 4]
    assert [(s.vit.patch_embed.patch_size[0], s.side) for s in model.stages] == [(8, 16), (5, 15), (4, 16)]


def test_padded_patches_take_the_whole_image_under_a_larger_kernel(images):
    """The published DeiT model's middle stage: 23 x 23 kernel, padding 3 -> 10 x 10 tokens on 224px."""
    assert [stage_geometry(224, g, padded=True) for g in (7, 10, 14)] == [(32, 224), (23, 230), (16, 224)]
    model = tiny_dvt(padded_patches=True)
    assert [(s.vit.patch_embed.patch_size[0], s.side) for s in model.stages] == [(8, 16), (6, 18), (4, 16)]
    assert model.config["method_kwargs"]["padded_patches"] is True
    assert "padded_patches" not in tiny_dvt().config["method_kwargs"]
    assert torch.isfinite(model.eval().predict(images).logits).all()


def test_unknown_reuse_options_are_rejected():
    with pytest.raises(ValueError, match="reuse_resampling"):
        tiny_dvt(reuse_resampling="bicubic")
    with pytest.raises(ValueError, match="reuse_class_fill"):
        tiny_dvt(reuse_class_fill="first")


def test_too_few_grids_are_rejected():
    with pytest.raises(ValueError):
        tiny_dvt(grids=[4])


# ------------------------------------------------------------------------------------------ rewritten forwards
@pytest.mark.parametrize("variant", [{}, {"qk_norm": True, "init_values": 1e-2}])
def test_block_forward_equals_timm_block(variant):
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=2, mlp_ratio=2.0, qkv_bias=True, **variant).eval()
    x = torch.randn(3, 10, 32)
    expected = block(x)
    plain, no_logits = block_forward(block, x)
    exported, logits = block_forward(block, x, return_logits=True)
    assert no_logits is None and logits.shape == (3, 2, 10, 10)
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)


def test_attention_with_logits_equals_timm_attention_with_additive_mask():
    torch.manual_seed(0)
    attn = Block(dim=32, num_heads=2).eval().attn
    x, bias = torch.randn(2, 7, 32), torch.randn(2, 2, 7, 7)
    out, logits = attention_with_logits(attn, x, bias)
    torch.testing.assert_close(out, attn(x, attn_mask=bias), rtol=1e-5, atol=1e-5)
    q, k, _ = attn.qkv(x).reshape(2, 7, 3, 2, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(logits, (q @ k.transpose(-2, -1)) * attn.scale + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage_index", [0, 1, 2])
def test_stage_without_reuse_equals_timm_vit_forward(stage_index, images):
    stage = tiny_dvt(feature_reuse=False, relation_reuse=False).eval().stages[stage_index]
    resized = F.interpolate(images, size=(stage.side, stage.side), mode="bilinear", antialias=True)
    logits, _ = stage(images)
    torch.testing.assert_close(logits, stage.vit(resized))


def _bilinear(maps, size):
    """Reference: (..., g*g) maps on a g x g grid -> (..., size*size) with F.interpolate."""
    grid = int(maps.shape[-1] ** 0.5)
    flat = maps.reshape(-1, 1, grid, grid)
    return F.interpolate(flat, size=(size, size), mode="bilinear").reshape(*maps.shape[:-1], size * size)


def test_resample_token_axis_interpolates_the_patch_grid_and_keeps_prefix():
    values = torch.randn(2, 1 + 9, 4)  # one prefix token, a 3x3 grid, 4 channels
    resampled = resample_token_axis(values, token_resampling_matrix(3, 5, num_prefix=1))
    assert resampled.shape == (2, 1 + 25, 4) and torch.equal(resampled[:, :1], values[:, :1])
    expected = _bilinear(values[:, 1:].transpose(1, 2), 5).transpose(1, 2)
    torch.testing.assert_close(resampled[:, 1:], expected)


def _resample_as_images(values, old_grid, new_grid, num_prefix, mode):
    """The 2-d operators themselves, on the patch grid as a channels-first image batch."""
    leading, channels = values.shape[:-2], values.shape[-1]
    images = values[..., num_prefix:, :].reshape(-1, old_grid, old_grid, channels).permute(0, 3, 1, 2)
    if mode == "nearest-avgpool":
        images = F.adaptive_avg_pool2d(F.interpolate(images, size=(2 * old_grid,) * 2, mode="nearest"), new_grid)
    else:
        images = F.interpolate(images, size=(new_grid, new_grid), mode="bilinear", align_corners=False,
                               antialias=new_grid < old_grid)
    patches = images.permute(0, 2, 3, 1).reshape(*leading, new_grid * new_grid, channels)
    return torch.cat([values[..., :num_prefix, :], patches], dim=-2)


@pytest.mark.parametrize("mode", RESAMPLING_MODES)
@pytest.mark.parametrize("old_grid, new_grid", [(3, 5), (5, 3), (4, 7), (7, 10)])
def test_matmul_resampling_equals_the_2d_operators(mode, old_grid, new_grid):
    torch.manual_seed(0)
    values = torch.randn(2, 3, 1 + old_grid ** 2, 6)
    matrix = token_resampling_matrix(old_grid, new_grid, num_prefix=1, mode=mode)
    resampled = resample_token_axis(values, matrix)
    torch.testing.assert_close(resampled, _resample_as_images(values, old_grid, new_grid, 1, mode))
    tokens = 1 + old_grid ** 2, 1 + new_grid ** 2
    assert count_macs_with_torch(lambda v: resample_token_axis(v, matrix), values) == \
        6 * resampling_macs(*tokens, channels=6)  # 2 x 3 items of 6 channels


@pytest.mark.parametrize("mode", RESAMPLING_MODES)
def test_both_axes_resampled_as_each_axis_in_turn(mode):
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 1 + 16, 1 + 16)
    matrix = token_resampling_matrix(4, 7, num_prefix=1, mode=mode)
    queries_then_keys = resample_token_axis(resample_token_axis(maps, matrix).transpose(-1, -2), matrix)
    torch.testing.assert_close(resample_both_token_axes(maps, matrix), queries_then_keys.transpose(-1, -2))


def test_relation_resampling_is_grid_to_grid_on_both_axes():
    reuse = RelationReuse(channels=2, previous_grid=2, grid=3, num_prefix=1)
    reuse.mlp = nn.Identity()  # look at the resampling alone
    query_maps, key_maps = torch.randn(2, 4), torch.randn(2, 4)
    logits = torch.randn(1, 2, 5, 5)
    logits[0, :, 1:, 1:] = query_maps[:, :, None] * key_maps[:, None, :]  # patch-patch block: rank one
    bias = reuse(logits)[0]
    assert bias.shape == (2, 10, 10)
    torch.testing.assert_close(bias[:, 0, 0], logits[0, :, 0, 0])  # class-class kept
    torch.testing.assert_close(bias[:, 0, 1:], _bilinear(logits[0, :, 0, 1:], 3))  # class row: a 2-d map
    torch.testing.assert_close(bias[:, 1:, 0], _bilinear(logits[0, :, 1:, 0], 3))  # class column
    expected = _bilinear(query_maps, 3)[:, :, None] * _bilinear(key_maps, 3)[:, None, :]
    torch.testing.assert_close(bias[:, 1:, 1:], expected)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("feature_reuse", [False, True])
@pytest.mark.parametrize("relation_reuse", [False, True])
def test_train_step_reaches_every_parameter(feature_reuse, relation_reuse, images):
    model = tiny_dvt(feature_reuse=feature_reuse, relation_reuse=relation_reuse).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.arange(len(images)) % TINY["num_classes"]
    output = model(images)
    assert len(output) == 3 and all(logits.shape == (len(images), TINY["num_classes"]) for logits in output)
    loss = model.compute_loss(output, labels, nn.CrossEntropyLoss())
    assert sorted(loss.terms) == ["exit1", "exit2", "exit3"]
    assert loss.total.item() == pytest.approx(sum(loss.terms.values()), rel=1e-5)
    loss.total.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reaches {missing}"
    optimizer.step()
    has_reuse = [s.feature_reuse is not None or s.relation_reuse is not None for s in model.stages]
    assert has_reuse == [False, feature_reuse or relation_reuse, feature_reuse or relation_reuse]


# ------------------------------------------------------------------------------------------ early exit
def test_never_exiting_equals_running_every_stage(images):
    model = tiny_dvt().eval()
    model.set_budget(thresholds=[NEVER_EXIT, NEVER_EXIT])
    prediction = model.predict(images)
    torch.testing.assert_close(prediction.logits, model.predict_all_exits(images)[-1])
    assert prediction.extras["exit_stage"].tolist() == [2] * len(images)
    assert torch.all(prediction.macs == model.dense_macs())


def test_always_exiting_runs_only_stage_one(images):
    model = tiny_dvt().eval()
    model.set_budget(thresholds=[0.0, 0.0])
    fired = []
    for stage in model.stages[1:]:
        for module in stage.modules():
            module.register_forward_hook(lambda *_: fired.append(1))
    prediction = model.predict(images)
    assert not fired
    assert prediction.extras["exit_stage"].tolist() == [0] * len(images)
    torch.testing.assert_close(prediction.logits, model.stages[0](images)[0])
    assert torch.all(prediction.macs == model.exit_macs()[0])
    assert count_macs_with_torch(model.predict, images[:1]) == pytest.approx(model.exit_macs()[0], rel=0.01)


def _thresholds_splitting(model, images):
    """Thresholds half-way between two confidences near each exit's median: mixed exits, no ties."""
    confidences = torch.stack([F.softmax(logits, -1).amax(-1) for logits in model.predict_all_exits(images)], 1)
    thresholds = []
    for stage in range(confidences.shape[1] - 1):
        ranked = confidences[:, stage].sort().values
        middle = len(ranked) // 2
        thresholds.append(((ranked[middle - 1] + ranked[middle]) / 2).item())
    return thresholds


def test_batched_early_exit_equals_one_image_at_a_time(images):
    model = tiny_dvt().eval()
    model.set_budget(thresholds=_thresholds_splitting(model, images))
    batched = model.predict(images)
    assert len(set(batched.extras["exit_stage"].tolist())) > 1, "the test wants images leaving at different stages"
    singles = [model.predict(image.unsqueeze(0)) for image in images]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in singles]), rtol=1e-4, atol=1e-5)
    assert torch.equal(batched.extras["exit_stage"], torch.cat([s.extras["exit_stage"] for s in singles]))
    assert torch.equal(batched.macs, torch.cat([s.macs for s in singles]))
    # An image's logits are those of the exit it left at, whichever images it shared a batch with.
    every_exit = model.predict_all_exits(images)
    for i, stage in enumerate(batched.extras["exit_stage"].tolist()):
        torch.testing.assert_close(batched.logits[i], every_exit[stage][i], rtol=1e-4, atol=1e-5)


def test_exit_confidence_is_reported_at_every_exit_reached_and_nan_after(images):
    model = tiny_dvt().eval()
    thresholds = _thresholds_splitting(model, images)
    model.set_budget(thresholds=thresholds)
    prediction = model.predict(images)
    stages, confidence = prediction.extras["exit_stage"], prediction.extras["exit_confidence"]
    assert confidence.shape == (len(images), 3)
    every_exit = torch.stack([logits.softmax(-1).amax(-1) for logits in model.predict_all_exits(images)], dim=1)
    for i, stage in enumerate(stages.tolist()):
        torch.testing.assert_close(confidence[i, :stage + 1], every_exit[i, :stage + 1], rtol=1e-4, atol=1e-5)
        assert confidence[i, stage + 1:].isnan().all()
        assert all(confidence[i, k] < thresholds[k] for k in range(stage))  # it stayed while unsure
        assert stage == 2 or confidence[i, stage] >= thresholds[stage]


@pytest.mark.parametrize("feature_reuse", [False, True])
@pytest.mark.parametrize("relation_reuse", [False, True])
def test_macs_match_torch_flop_counter(feature_reuse, relation_reuse, images):
    model = tiny_dvt(feature_reuse=feature_reuse, relation_reuse=relation_reuse).eval()
    reported = model.predict(images[:1]).macs.item()
    assert reported == model.dense_macs()
    assert reported == pytest.approx(count_macs_with_torch(model.predict, images[:1]), rel=0.01)
    if feature_reuse or relation_reuse:
        assert model.dense_macs() > tiny_dvt(feature_reuse=False, relation_reuse=False).dense_macs()


# ------------------------------------------------------------------------------------------ thresholds
def test_thresholds_for_proportions_gives_the_requested_shares():
    torch.manual_seed(0)
    confidences = torch.rand(1000, 3)
    thresholds = thresholds_for_proportions(confidences, [0.5, 0.3, 0.2])
    counts = torch.bincount(exit_stages(confidences, thresholds), minlength=3)
    assert counts.tolist() == [500, 300, 200]
    assert thresholds_for_proportions(confidences, [0.0, 0.0, 1.0]) == [NEVER_EXIT, NEVER_EXIT]
    shares = geometric_exit_proportions(2.0, 3)
    assert shares == pytest.approx([2 / 14, 4 / 14, 8 / 14])
    with pytest.raises(ValueError):
        thresholds_for_proportions(confidences, [0.5, 0.5])


def test_set_budget_validates():
    model = tiny_dvt()
    for bad in ([0.5], [0.5, -0.1], [0.5, float("nan")], [0.5, 1.5], "high", 0.5):
        with pytest.raises(ValueError):
            model.set_budget(thresholds=bad)
    with pytest.raises(ValueError):
        model.set_budget(q=0.5)
    model.set_budget(thresholds=[0.3, NEVER_EXIT])
    assert model.get_budget() == {"thresholds": [0.3, NEVER_EXIT]}


def test_calibrate_for_q_and_for_gmacs(images):
    model = tiny_dvt().eval()
    loader = [(images[:4], None), (images[4:], None)]
    with pytest.warns(UserWarning):
        assert model.budget_sweep() == [model.get_budget()]
    budget = model.calibrate(loader, q=1.0)  # equal thirds: 3, 2, 3 of 8 (rounded cumulatively)
    counts = torch.bincount(model.predict(images).extras["exit_stage"], minlength=3)
    assert counts.tolist() == [3, 2, 3] and budget == model.get_budget()
    cheap, full = model.exit_macs()[0], model.dense_macs()
    target = (cheap + full) / 2
    model.calibrate(loader, gmacs=target / 1e9)
    assert cheap <= model.predict(images).macs.mean().item() <= target
    sweep = model.budget_sweep()
    assert len(sweep) > 1 and all(len(point["thresholds"]) == 2 for point in sweep)
    with pytest.raises(ValueError):
        model.calibrate(loader, gmacs=cheap / 2 / 1e9)


# ------------------------------------------------------------------------------------------ dense start, save/load
def test_init_from_dense_resamples_every_stage(images):
    dense = dyntok.create_model("vit_cifar_tiny", **TINY).eval()
    model = tiny_dvt(feature_reuse=False, relation_reuse=False).eval()
    model.init_from_dense(dense.state_dict())
    # The full-resolution stage is the dense model.
    torch.testing.assert_close(model.stages[-1](images)[0], dense.vit(images))
    coarse = model.stages[0].vit
    assert coarse.patch_embed.proj.weight.shape[-2:] == (8, 8)
    torch.testing.assert_close(coarse.pos_embed, resample_abs_pos_embed(dense.vit.pos_embed, [2, 2]))
    torch.testing.assert_close(coarse.blocks[0].attn.qkv.weight, dense.vit.blocks[0].attn.qkv.weight)


def test_init_from_dense_keeps_reuse_inputs_fresh():
    dense = dyntok.create_model("vit_cifar_tiny", **TINY)
    model = tiny_dvt()
    model.init_from_dense(dense.state_dict())
    fc1, dense_fc1 = model.stages[1].vit.blocks[0].mlp.fc1, dense.vit.blocks[0].mlp.fc1
    assert fc1.in_features == dense_fc1.in_features + model.method_kwargs["reuse_dim"]
    torch.testing.assert_close(fc1.weight[:, :dense_fc1.in_features], dense_fc1.weight)
    assert fc1.weight[:, dense_fc1.in_features:].abs().sum() > 0


def test_save_load_round_trip_keeps_thresholds(images, tmp_path):
    model = tiny_dvt().eval()
    model.set_budget(thresholds=[0.25, 0.75])
    loaded = load_model(save_model(model, tmp_path / "dvt.safetensors")).eval()
    assert loaded.get_budget() == {"thresholds": [0.25, 0.75]}
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.predict(images).logits, model.predict(images).logits, rtol=0, atol=0)


PREFIX_VARIANTS = [dict(reg_tokens=2, no_embed_class=True), dict(class_token=False, global_pool="avg")]


@pytest.mark.parametrize("prefix", PREFIX_VARIANTS)
def test_register_tokens_and_no_class_token(prefix, images):
    torch.manual_seed(0)
    model = DVT(BackboneSpec("vit_cifar_tiny", {**TINY, **prefix})).train()
    loss = model.compute_loss(model(images), torch.arange(len(images)) % 5, nn.CrossEntropyLoss())
    loss.total.backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters())
    model.eval()
    counted = count_macs_with_torch(model.predict, images[:1])
    assert model.predict(images[:1]).macs.item() == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize("dim, widths", [(32, (11, 4)), (96, (32, 12)), (384, (128, 48))])
def test_reuse_widths_scale_with_the_backbone_width(dim, widths):
    model = tiny_dvt(embed_dim=dim)
    assert (model.method_kwargs["reuse_hidden"], model.method_kwargs["reuse_dim"]) == widths
    reuse = model.stages[1].feature_reuse[0].mlp
    assert (reuse.fc1.out_features, reuse.fc2.out_features) == widths
    # The reused features widen every fc1 by D/8, the published 12.5%, whatever the width.
    assert model.stages[2].vit.blocks[0].mlp.fc1.in_features == dim + widths[1]


def test_published_reuse_widths_stay_reachable():
    model = tiny_dvt(reuse_hidden=128, reuse_dim=48)
    reuse = model.stages[1].feature_reuse[0].mlp
    assert (reuse.fc1.out_features, reuse.fc2.out_features) == (128, 48)
    assert model.stages[1].vit.blocks[0].mlp.fc1.in_features == TINY["embed_dim"] + 48
