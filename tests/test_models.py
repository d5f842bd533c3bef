"""Backbones by name, presets, overrides and pretrained weights from a local file."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import dyntok
from dyntok.models import PRESETS, create_backbone


def test_create_model_applies_overrides():
    model = dyntok.create_model("vit_cifar_tiny", depth=2, embed_dim=48, num_heads=3, num_classes=7)
    assert len(model.vit.blocks) == 2 and model.vit.embed_dim == 48 and model.num_classes == 7


def test_timm_names_work_as_backbones():
    model = dyntok.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    assert model.predict(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_are_cifar_sized(preset):
    vit = create_backbone(preset)
    assert vit.patch_embed.img_size == (32, 32) and vit.num_classes == 10


def test_unknown_and_non_plain_vit_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backbone"):
        dyntok.create_model("not_a_model")
    with pytest.raises(ValueError, match="plain timm VisionTransformer"):
        create_backbone("resnet18")


def test_list_models_names_every_method_on_every_preset():
    names = dyntok.list_models()
    for method in dyntok.list_methods():
        for preset in PRESETS:
            assert (preset if method == "dense" else f"{method}_{preset}") in names
    assert dyntok.list_models("vit_cifar_t*") == ["vit_cifar_tiny"]


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3, num_classes=4)
    source = timm.create_model("vit_tiny_patch16_224", **kwargs)
    weights = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(weights))
    model = dyntok.create_model("vit_tiny_patch16_224", pretrained_file=str(weights), **kwargs)
    loaded = model.vit.state_dict()
    # timm re-initialises the classifier when num_classes differs from the published 1000 classes.
    body = [name for name in source.state_dict() if not name.startswith("head.")]
    assert body and all(torch.equal(loaded[name], source.state_dict()[name]) for name in body)
    assert not torch.equal(loaded["head.weight"], source.state_dict()["head.weight"])


def test_a_preset_without_shipped_weights_says_how_to_make_them(monkeypatch, tmp_path):
    from dyntok import pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path)  # whatever this installation ships
    with pytest.raises(ValueError, match="ships no weights for 'vit_cifar_base'.*dyntok pretrain vit_cifar_base"):
        dyntok.create_model("vit_cifar_base", pretrained=True)
