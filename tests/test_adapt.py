"""``dyntok.adapt``: every method on a timm ViT the user already has, sharing its weights."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import dyntok
from dyntok.adapt import backbone_spec_of
from dyntok.methods.dvt import NEVER_EXIT

#: Backbones of several shapes, small enough to run every method in seconds.
SHAPES = {
    "patch16_at_224": dict(img_size=224, patch_size=16, embed_dim=32, depth=4, num_heads=2),
    "patch4_at_32": dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10),
    "average_pooling": dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10,
                            global_pool="avg"),
    "seven_classes_registers_layer_scale": dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                                num_classes=7, reg_tokens=2, init_values=1e-5),
}

#: Per method: (options at adapt time, the budget at which nothing is skipped, a budget that skips work).
#: DVT's finest stage equals the backbone only without reuse (reuse widens its MLP inputs).
BUDGETS = {
    "dense": ({}, {}, None),
    "tome": ({}, {"r": 0}, {"r": 4}),
    "evit": ({}, {"keep_rate": 1.0}, {"keep_rate": 0.5}),
    "dynamicvit": ({}, {"keep_ratio": 1.0}, {"keep_ratio": 0.5}),
    "adavit": ({}, {"patch_threshold": 0.0, "head_threshold": 0.0, "block_threshold": 0.0},
               {"patch_threshold": 1.0, "head_threshold": 1.0, "block_threshold": 1.0}),
    "revit": ({}, "finest grid", "coarsest grid"),
    "dvt": ({"feature_reuse": False, "relation_reuse": False}, {"thresholds": [NEVER_EXIT, NEVER_EXIT]},
            {"thresholds": [0.0, 0.0]}),
}


def test_every_registered_method_is_covered():
    assert sorted(BUDGETS) == sorted(dyntok.list_methods())


def _vit(shape: str) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(**SHAPES[shape]).eval()
    with torch.no_grad():  # non-trivial LayerScale, so that sharing it is visible in the logits
        for block in vit.blocks:
            for scale in (block.ls1, block.ls2):
                if hasattr(scale, "gamma"):
                    scale.gamma.uniform_(0.5, 1.5)
    return vit


def _images(shape: str) -> torch.Tensor:
    side = SHAPES[shape]["img_size"]
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


def _resolve(model, budget):
    if budget == "finest grid":
        return {"grid": model.grids[-1]}
    if budget == "coarsest grid":
        return {"grid": model.grids[0]}
    return budget


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", sorted(BUDGETS))
def test_adapted_model_gives_the_dense_logits_when_nothing_is_skipped_and_saves_otherwise(method, shape):
    vit, images = _vit(shape), _images(shape)
    options, nothing_skipped, cheaper = BUDGETS[method]
    model = dyntok.adapt(vit, method, **options)
    dense_logits = vit(images)
    dense_macs = dyntok.adapt(vit, "dense").predict(images).macs

    model.set_budget(**_resolve(model, nothing_skipped))
    torch.testing.assert_close(model.predict(images).logits, dense_logits, rtol=1e-5, atol=1e-5)

    if cheaper is not None:
        model.set_budget(**_resolve(model, cheaper))
        prediction = model.predict(images)
        assert torch.isfinite(prediction.logits).all()
        assert (prediction.macs < dense_macs).all()


@pytest.mark.parametrize("method", sorted(BUDGETS))
def test_adapted_model_shares_the_given_parameters(method):
    vit = _vit("patch4_at_32")
    model = dyntok.adapt(vit, method, **BUDGETS[method][0])
    held = {id(param) for param in model.parameters()}
    assert all(id(param) in held for param in vit.parameters())
    with torch.no_grad():  # a change to the user's model is a change to the adapted one
        vit.head.bias.add_(1.0)
    nothing_skipped = _resolve(model, BUDGETS[method][1])
    model.set_budget(**nothing_skipped)
    images = _images("patch4_at_32")
    torch.testing.assert_close(model.predict(images).logits, vit(images), rtol=1e-5, atol=1e-5)


def test_dvt_with_reuse_shares_what_keeps_its_shape_and_starts_the_rest_from_the_backbone():
    vit = _vit("patch4_at_32")
    model = dyntok.adapt(vit, "dvt")
    finest = model.stages[-1].vit
    assert finest.blocks[0].attn.qkv.weight is vit.blocks[0].attn.qkv.weight
    widened = finest.blocks[0].mlp.fc1.weight
    assert widened is not vit.blocks[0].mlp.fc1.weight
    torch.testing.assert_close(widened[:, :vit.embed_dim], vit.blocks[0].mlp.fc1.weight)
    coarse = model.stages[0].vit
    assert coarse.blocks[0].attn.qkv.weight is not vit.blocks[0].attn.qkv.weight
    torch.testing.assert_close(coarse.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_training_an_adapted_model_trains_the_given_vit():
    vit = _vit("patch4_at_32")
    before = vit.blocks[0].attn.qkv.weight.detach().clone()
    model = dyntok.adapt(vit, "tome", r=4).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(_images("patch4_at_32")).sum().backward()
    optimizer.step()
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, before)


@pytest.mark.parametrize("method", ["tome", "dynamicvit", "dvt"])
def test_adapted_model_round_trips_through_save_and_load(method, tmp_path):
    vit = _vit("average_pooling")
    model = dyntok.adapt(vit, method)
    path = dyntok.save_model(model, tmp_path / "adapted.safetensors")
    loaded = dyntok.load_model(path).eval()
    images = _images("average_pooling")
    assert torch.equal(loaded.predict(images).logits, model.predict(images).logits)


def test_every_timm_setting_adapt_records_rebuilds_the_model_from_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=24, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                            qk_norm=True, proj_bias=False, init_values=1e-4, no_embed_class=True, reg_tokens=1,
                            pre_norm=True, attn_drop_rate=0.1).eval()
    model = dyntok.adapt(vit, "tome", r=2)
    assert set(model.config["backbone"]["overrides"]) >= {"in_chans", "qk_norm", "proj_bias", "init_values",
                                                          "no_embed_class", "reg_tokens", "pre_norm"}
    loaded = dyntok.load_model(dyntok.save_model(model, tmp_path / "mine.safetensors")).eval()
    images = torch.randn(2, 1, 24, 24)
    assert torch.equal(loaded.predict(images).logits, model.predict(images).logits)


def test_a_timm_model_is_described_by_its_architecture_and_what_differs():
    with torch.device("meta"):
        vit = timm.create_model("deit_small_patch16_224", num_classes=10, drop_path_rate=0.1)
    spec = backbone_spec_of(vit)
    assert spec.name == "deit_small_patch16_224"
    assert spec.overrides == {"num_classes": 10, "drop_path_rate": pytest.approx(0.1)}


def test_a_saved_adapted_dense_model_starts_training_with_init(tmp_path):
    """``dyntok train --init`` reads the file: the dense model's config names the timm backbone it rebuilds."""
    from dyntok.training.state import check_dense_init

    vit = _vit("patch4_at_32")
    path = dyntok.save_model(dyntok.adapt(vit, "dense"), tmp_path / "mine.safetensors")
    dense = dyntok.load_model(path)
    backbone = dense.config["backbone"]
    student = dyntok.create_model(f"dynamicvit_{backbone['name']}", **backbone["overrides"])
    check_dense_init(dense, student, path)
    student.init_from_dense(dense.state_dict())
    student.set_budget(keep_ratio=1.0)
    images = _images("patch4_at_32")
    torch.testing.assert_close(student.eval().predict(images).logits, vit(images), rtol=1e-5, atol=1e-5)


def test_train_takes_the_backbone_from_a_saved_adapted_model(image_folder, tmp_path):
    """``dyntok train --init mine.safetensors --method tome`` trains on the ViT the file holds, no --model needed."""
    from dyntok.cli import build_parser
    from dyntok.cli.train import config_from_args
    from dyntok.training import train

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    path = dyntok.save_model(dyntok.adapt(vit, "dense"), tmp_path / "mine.safetensors")
    args = build_parser().parse_args(["train", "--init", str(path), "--method", "tome", "--dataset", str(image_folder),
                                      "--epochs", "0", "--batch-size", "8", "--holdout-size", "0",
                                      "--output-dir", str(tmp_path / "run"), "--no-progress"])
    config = config_from_args(args)
    assert config.model == "tome_vit_base_patch16_224"
    assert config.model_kwargs == {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    trained = dyntok.load_model(train(config).model_path)
    images = torch.randn(2, 3, 16, 16)
    trained.set_budget(r=0)
    torch.testing.assert_close(trained.eval().predict(images).logits, vit.eval()(images), rtol=1e-5, atol=1e-5)


def test_methods_that_need_a_class_token_name_it():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, class_token=False,
                            global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        dyntok.adapt(vit, "evit")
    with pytest.raises(ValueError, match="class token"):
        dyntok.adapt(vit, "adavit")


def test_a_model_timm_settings_cannot_describe_is_refused_naming_the_layer():
    vit = _vit("patch4_at_32")
    vit.blocks[2].mlp.act = nn.ReLU()
    with pytest.raises(ValueError, match=r"blocks\.2\.mlp\.act: ReLU"):
        dyntok.adapt(vit, "tome")


def test_a_model_that_is_not_a_timm_vit_is_refused():
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        dyntok.adapt(nn.Linear(3, 3), "tome")


def test_adapt_leaves_the_given_model_working_as_before():
    vit = _vit("patch4_at_32")
    twin = copy.deepcopy(vit)
    for method in ("tome", "evit", "dvt"):
        dyntok.adapt(vit, method).predict(_images("patch4_at_32"))
    images = _images("patch4_at_32")
    assert torch.equal(vit(images), twin(images))
    assert str(vit) == str(twin)
