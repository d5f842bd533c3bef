"""Analytic multiply-accumulate (MAC) counts for ViT parts, per image.

Counts are derived from layer shapes and token counts, so that a method can report the MACs it actually
executed for each image (tokens kept, stages run) without a profiler. Like torch's ``FlopCounterMode``
(2 FLOPs per MAC), only matrix products are counted: linear and convolution layers and the two attention
products. Norms, activations, softmax, interpolation and pooling are not (fvcore's default table does count
layer norm, upsampling and pooling; see docs/measurement.md for their size). ``tests/test_macs.py`` holds
these formulas to within 1% of ``FlopCounterMode``, counted so that fused attention kernels are seen.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "linear_macs", "attention_product_macs", "attention_macs", "mlp_macs", "block_macs", "patch_embed_macs",
    "head_macs", "vit_macs", "count_macs_with_torch", "count_uncounted_ops", "UNCOUNTED_OP_COSTS",
]


def linear_macs(layer: nn.Linear, tokens: int | float) -> float:
    """MACs of applying ``layer`` to ``tokens`` token vectors."""
    return float(tokens) * layer.in_features * layer.out_features


def attention_product_macs(tokens_q: int | float, tokens_k: int | float, dim: int) -> float:
    """MACs of ``q @ k^T`` plus ``attn @ v`` summed over heads (``dim`` = heads x head dim)."""
    return 2.0 * float(tokens_q) * float(tokens_k) * dim


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def block_macs(block: nn.Module, tokens: int | float) -> float:
    """MACs of one timm transformer ``Block`` over ``tokens`` tokens (class token included).

    Every linear layer inside the attention and MLP sub-modules is counted, so variants with qk-norm,
    LayerScale or a different MLP are covered without special cases. Token-reducing methods (ToMe, EViT)
    shrink the sequence between the two halves and count them apart.
    """
    return attention_macs(block.attn, tokens) + mlp_macs(block.mlp, tokens)


def attention_macs(attn: nn.Module, tokens: int | float, heads: int | None = None) -> float:
    """MACs of a timm ``Attention`` over ``tokens`` tokens, running ``heads`` of its heads (default: all).

    Every linear layer of the attention (qkv, proj, an output gate) grows linearly with the heads it runs,
    so a subset of the heads costs that share of the full count.
    """
    share = 1.0 if heads is None else heads / attn.num_heads
    attn_dim = attn.qkv.out_features // 3
    macs = sum(linear_macs(layer, tokens) for layer in _linears(attn))
    return share * (macs + attention_product_macs(tokens, tokens, attn_dim))


def mlp_macs(mlp: nn.Module, tokens: int | float) -> float:
    """MACs of a block's MLP over ``tokens`` tokens (every linear layer in it)."""
    return sum(linear_macs(layer, tokens) for layer in _linears(mlp))


def patch_embed_macs(patch_embed: nn.Module) -> float:
    """MACs of a timm ``PatchEmbed`` (a strided convolution) for one image."""
    conv = patch_embed.proj
    patches = patch_embed.num_patches
    kernel = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return float(patches) * kernel * conv.out_channels


def head_macs(model: nn.Module) -> float:
    """MACs of the classifier head of a timm ViT (zero when it is an ``Identity``)."""
    head = getattr(model, "head", None)
    return float(head.in_features * head.out_features) if isinstance(head, nn.Linear) else 0.0


def vit_macs(model: nn.Module, tokens_per_block: list[int | float] | None = None) -> float:
    """MACs for one image through a timm ``VisionTransformer``.

    ``tokens_per_block`` gives the tokens entering each block (prefix tokens included); by default every
    block sees all patch tokens plus the prefix tokens, i.e. the dense model.
    """
    if tokens_per_block is None:
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        tokens_per_block = [tokens] * len(model.blocks)
    macs = patch_embed_macs(model.patch_embed) + head_macs(model)
    macs += sum(block_macs(block, n) for block, n in zip(model.blocks, tokens_per_block))
    return macs


def count_macs_with_torch(fn, *args, **kwargs) -> float:
    """MACs that ``torch.utils.flop_counter.FlopCounterMode`` sees while running ``fn`` (FLOPs / 2).

    An independent check on the analytic counts; used by the tests, not on hot paths.

    Which kernel ``F.scaled_dot_product_attention`` dispatches to depends on the torch version and device,
    and the counter does not know every fused kernel (torch 2.14's CPU flash kernel counted zero). So the
    count runs under the math backend, which decomposes attention into matrix products the counter sees,
    and the fused kernels are also given their formula in case a kernel is called directly.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=_fused_attention_formulas()) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() / 2.0


def _attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of ``softmax(q k^T) v``: two batched matrix products (heads may be shared by keys/values)."""
    *batch, tokens_q, dim_qk = query_shape
    tokens_k, dim_v = key_shape[-2], value_shape[-1]
    rows = 1
    for size in batch:
        rows *= size
    return 2 * rows * tokens_q * tokens_k * (dim_qk + dim_v)


def _fused_attention_formulas() -> dict:
    """The attention formula for every fused forward kernel this torch has that the counter may lack."""
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_fused_attention_overrideable")
    return {getattr(torch.ops.aten, name): _attention_flops for name in names if hasattr(torch.ops.aten, name)}


#: Operations the MAC counts leave out, by kind: (aten ops, cost per element). Norms and bilinear
#: interpolation cost what fvcore's default table charges (5 per normalised element with an affine
#: transform, 4 per interpolated output element); softmax and GELU, which fvcore does not count, are
#: charged 1 per element, a lower bound (each needs an exp or erf and more).
UNCOUNTED_OP_COSTS = {
    "norm": (("native_layer_norm",), 5),
    "softmax": (("_softmax", "_safe_softmax", "_log_softmax"), 1),
    "gelu": (("gelu",), 1),
    "interpolation": (("upsample_bilinear2d", "_upsample_bilinear2d_aa"), 4),
}


def count_uncounted_ops(fn, *args, **kwargs) -> dict[str, float]:
    """Operations of the kinds in :data:`UNCOUNTED_OP_COSTS` that running ``fn`` executes, by kind.

    Counted from the aten ops actually dispatched (attention under the math backend, so that its softmax
    is seen); to say how much the MAC counts leave out, as a share of them (docs/measurement.md).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode

    kind_of = {name: kind for kind, (names, _) in UNCOUNTED_OP_COSTS.items() for name in names}
    totals = dict.fromkeys(UNCOUNTED_OP_COSTS, 0.0)

    class Tally(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            kind = kind_of.get(func.overloadpacket.__name__)
            if kind is not None:
                # The output's size (layer norm: its first output, the normalised input).
                out = result[0] if isinstance(result, tuple) else result
                totals[kind] += out.numel() * UNCOUNTED_OP_COSTS[kind][1]
            return result

    with sdpa_kernel(SDPBackend.MATH), Tally():
        fn(*args, **kwargs)
    return totals
