"""A plain-tensor ViT block, written out from the weights, for checking ToMe and EViT independently.

Nothing here calls a timm module's forward or dyntok's code: layer norms, attention (always the explicit
softmax, with the full attention map), LayerScale and the MLP are computed from the parameters, one image at
a time where the methods work in batches, so that an error in the library's batched indexing or in how it
reuses timm's sub-modules shows up as a difference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def layer_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm`` applied from its parameters (an ``nn.Identity`` when qk-norm is off)."""
    if isinstance(norm, nn.Identity):
        return x
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def layer_scale(scale: nn.Module, x: Tensor) -> Tensor:
    return x * scale.gamma if hasattr(scale, "gamma") else x


def attention(block: nn.Module, x: Tensor, key_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One image's attention branch (N, C) -> (branch output, attention map (H, N, N), keys (H, N, d)).

    ``key_bias`` (N,) is added to every query's logits (ToMe's log sizes).
    """
    attn = block.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    h = layer_norm(block.norm1, x)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(len(x), 3, heads, head_dim).permute(1, 2, 0, 3)
    q, k, v = layer_norm(attn.q_norm, qkv[0]), layer_norm(attn.k_norm, qkv[1]), qkv[2]
    logits = q @ k.transpose(-1, -2) / head_dim ** 0.5
    if key_bias is not None:
        logits = logits + key_bias
    weights = logits.softmax(dim=-1)
    out = (weights @ v).transpose(0, 1).reshape(len(x), heads * head_dim)
    out = F.linear(out, attn.proj.weight, attn.proj.bias)
    return layer_scale(block.ls1, out), weights, k


def mlp(block: nn.Module, x: Tensor) -> Tensor:
    """One image's MLP branch."""
    h = layer_norm(block.norm2, x)
    h = F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias))
    return layer_scale(block.ls2, F.linear(h, block.mlp.fc2.weight, block.mlp.fc2.bias))


def head(vit: nn.Module, x: Tensor, sizes: Tensor | None = None) -> Tensor:
    """One image's logits from its final tokens: class token, or patch average weighted by ``sizes``."""
    x = layer_norm(vit.norm, x)
    prefix = vit.num_prefix_tokens
    if vit.global_pool == "avg":
        patches = x[prefix:]
        weights = torch.ones(len(patches)) if sizes is None else sizes
        pooled = (patches * weights[:, None]).sum(0) / weights.sum()
    else:
        pooled = x[0]
    return F.linear(layer_norm(vit.fc_norm, pooled), vit.head.weight, vit.head.bias)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter so that norms, LayerScale and biases all matter (fresh ones are 1s and 0s)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def set_fused_attention(vit: nn.Module, fused: bool) -> None:
    for block in vit.blocks:
        block.attn.fused_attn = fused
