"""Numerical trouble: masked attention never gives NaN (a whole row masked, one token kept, bf16), and every
registered method trains and predicts with finite numbers under bf16 autocast, the trainer's --amp.

The trainer's handling of a non-finite loss (skip, warn, stop) is tested in tests/test_run_safety.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyntok
from dyntok.methods.dynamicvit import keep_attention_mask

from .conftest import TINY, tiny_model

METHODS = dyntok.list_methods()
criterion = nn.CrossEntropyLoss()


def keep_masks(tokens: int) -> dict[str, torch.Tensor]:
    one = torch.zeros(tokens)
    one[0] = 1.0
    return {"all-dropped": torch.zeros(tokens), "one-kept": one, "all-kept": torch.ones(tokens)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["all-dropped", "one-kept", "all-kept"])
def test_keep_mask_attention_is_finite_and_ignores_dropped_keys(case, dtype):
    torch.manual_seed(0)
    tokens, dim = 9, 8
    keep = keep_masks(tokens)[case][None]
    mask = keep_attention_mask(keep)
    assert torch.isfinite(mask).all()
    for scale in (1.0, 30.0):  # ordinary and huge logits: never NaN
        q, k, v = (torch.randn(1, 2, tokens, dim).mul(scale).to(dtype) for _ in range(3))
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(dtype))
        assert torch.isfinite(fused).all()
    attention = torch.softmax(q.float() @ k.float().transpose(-1, -2) / scale ** 2 / dim ** 0.5 + mask, dim=-1)
    torch.testing.assert_close(attention.sum(-1), torch.ones(1, 2, tokens))
    allowed = keep.bool().expand(tokens, -1) | torch.eye(tokens, dtype=torch.bool)
    assert (attention[0, :, ~allowed] < 1e-6).all(), "a query read a dropped key"  # eps-weighted, as in the paper


@pytest.mark.parametrize("method", METHODS)
def test_training_step_under_bf16_autocast_is_finite(method, images, labels):
    model = tiny_model(method).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.compute_loss(model(images), labels, criterion)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("method", METHODS)
def test_prediction_under_bf16_autocast_is_finite_at_the_cheapest_budget(method, images):
    model = tiny_model(method).eval()
    for name, knob in model.budget_space().items():
        model.set_budget(**{name: knob.extremes()[0]})  # the most aggressive setting: fewest tokens, earliest exit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = model.predict(images)
    assert torch.isfinite(prediction.logits).all()
    assert prediction.logits.shape == (len(images), TINY["num_classes"])


def test_dynamicvit_keeping_almost_nothing_trains_finitely_in_bf16(images, labels):
    model = tiny_model("dynamicvit", keep_ratio=0.01).train()
    for _ in range(3):  # several Gumbel draws; some drop every patch of an image
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.compute_loss(model(images), labels, criterion)
        assert torch.isfinite(loss.total)
        loss.total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
