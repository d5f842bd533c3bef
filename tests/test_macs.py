"""The analytic MAC counter agrees with torch's FlopCounterMode (2 FLOPs per MAC) within 1%."""
from __future__ import annotations

import pytest
import torch

from dyntok.measure.macs import block_macs, count_macs_with_torch, vit_macs
from dyntok.models import create_backbone

SIZES = [
    dict(name="vit_cifar_micro"),
    dict(name="vit_cifar_tiny"),
    dict(name="vit_cifar_small", depth=2),
    dict(name="vit_cifar_tiny", img_size=48, patch_size=6, mlp_ratio=3.0),
    dict(name="deit_tiny_patch16_224", depth=2),
    dict(name="vit_small_patch16_224", depth=1, qkv_bias=False),
]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_dense_vit_macs_match_flop_counter(size):
    size = dict(size)
    vit = create_backbone(size.pop("name"), **size).eval()
    side = vit.patch_embed.img_size[0]
    counted = count_macs_with_torch(vit, torch.randn(1, 3, side, side))
    assert vit_macs(vit) == pytest.approx(counted, rel=0.01)


def test_block_macs_follow_the_token_count():
    vit = create_backbone("vit_cifar_tiny").eval()
    block = vit.blocks[0]
    for tokens in (1, 17, 65):
        counted = count_macs_with_torch(block, torch.randn(1, tokens, vit.embed_dim))
        assert block_macs(block, tokens) == pytest.approx(counted, rel=0.01)
