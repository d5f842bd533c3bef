"""The analytic MAC counter agrees with torch's FlopCounterMode (2 FLOPs per MAC) within 1%."""
from __future__ import annotations

import pytest
import torch

from dyntok.measure.macs import (attention_product_macs, block_macs, count_macs_with_torch, count_uncounted_ops,
                                 vit_macs)
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


def test_flop_counter_sees_fused_attention():
    """The independent count must include q k^T and attn v whichever SDPA kernel this torch picks."""
    query, key, value = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 5)
    counted = count_macs_with_torch(torch.nn.functional.scaled_dot_product_attention, query, key, value)
    assert counted == 2 * 3 * 17 * 11 * (8 + 5)


def test_flop_counter_sees_the_attention_products_of_a_fused_timm_block():
    vit = create_backbone("vit_cifar_tiny").eval()
    attn = vit.blocks[0].attn
    assert attn.fused_attn, "timm's fused attention path is the one this test must cover"
    tokens = 65
    counted = count_macs_with_torch(attn, torch.randn(1, tokens, vit.embed_dim))
    linear_only = tokens * vit.embed_dim * (attn.qkv.out_features + attn.proj.out_features)
    assert counted - linear_only == attention_product_macs(tokens, tokens, vit.embed_dim) > 0


def test_uncounted_ops_are_tallied_by_kind_at_their_cost_per_element():
    from timm.models.vision_transformer import Attention

    tokens = torch.randn(2, 5, 8)
    attention = Attention(8, num_heads=2).eval()  # fused attention: its softmax must still be seen

    def run():
        torch.nn.functional.layer_norm(tokens, (8,))
        torch.nn.functional.gelu(tokens)
        torch.nn.functional.interpolate(torch.randn(1, 2, 4, 4), size=(8, 8), mode="bilinear")
        attention(tokens)

    with torch.no_grad():
        counts = count_uncounted_ops(run)
    assert counts == {"norm": 5 * 80, "softmax": 2 * 2 * 5 * 5, "gelu": 80, "interpolation": 4 * 2 * 64}
