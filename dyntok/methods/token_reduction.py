"""Pieces several methods share, so that no method imports another.

Token grids (DVT, ReViT); where to prune and the training-time keep mask (DynamicViT, EViT, AdaViT); and, for
the methods that shrink the token sequence inside a block (ToMe, EViT), the block's two residual halves and
what its attention computed.

ToMe and EViT both act between the attention and the MLP of a timm ``Block``, so a block is run as its two
residual halves (:func:`attention_half`, :func:`mlp_half`), built from the block's own sub-modules (``norm1``,
``attn``, ``ls1``, ``drop_path1``...). LayerScale, qk-norm, fused attention and stochastic depth therefore come from
timm itself; ``tests/test_tome.py`` holds the two halves to timm's ``Block.forward``.

Both also need what the attention computed: ToMe matches tokens by their keys, EViT ranks them by the class
token's attention. :class:`AttentionTap` reads the queries and keys from forward hooks on the attention's
``q_norm`` and ``k_norm`` (identities when qk-norm is off), so timm's ``Attention.forward`` stays untouched,
fused kernel included, and checkpoints keep timm's parameter names.

:class:`PatchGroups` follows which source patch each remaining token stands for (``extras['patch_groups']``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from timm.models.vision_transformer import Block

__all__ = ["default_grids", "default_prune_locations", "check_prune_locations", "keep_attention_mask",
           "attention_half", "mlp_half", "check_plain_blocks", "check_pooling", "pooled_head",
           "gather_tokens", "AttentionTap", "class_attention", "PatchGroups"]


#: Attention weight a dropped token keeps in training, relative to a kept one (its additive mask is the log
#: of this). Small enough that nothing measurable leaks, large enough that the attention probabilities of
#: dropped tokens stay normal floats in float32/bfloat16, so the gradient that tells the predictor what
#: keeping a dropped token would have changed survives (see :func:`keep_attention_mask`).
_DROPPED_WEIGHT = 1e-20


def default_grids(full_grid: int) -> list[int]:
    """Half-, three-quarter- and full-resolution grids of a backbone whose grid is ``full_grid``.

    Python's ``round`` (ties to even): 8 -> [4, 6, 8] (32px CIFAR, patch 4); 14 -> [7, 10, 14] (224px, patch 16),
    the published ImageNet grids.
    """
    return [max(1, round(full_grid / 2)), max(1, round(full_grid * 0.75)), full_grid]


def default_prune_locations(depth: int) -> list[int]:
    """Blocks before which tokens are pruned: at 1/4, 1/2 and 3/4 of the depth, rounded down.

    Depth 12 gives the paper's ``[3, 6, 9]``, depth 6 ``[1, 3, 4]``. Never before block 0 (the predictor needs
    some context), duplicates of shallow models removed (depth 2 gives ``[1]``).
    """
    if depth < 2:
        raise ValueError(f"DynamicViT needs a backbone of depth >= 2 to prune between blocks, got depth {depth}")
    return sorted({max(1, depth * quarter // 4) for quarter in (1, 2, 3)})


def keep_attention_mask(keep: Tensor) -> Tensor:
    """Additive float32 attention mask (B, 1, N, N) for a (B, N) 0/1 keep mask over all tokens.

    Query ``i`` ignores every dropped key ``j`` and always sees itself (the paper's mask
    ``G_ij = 1 if i == j else D_j``), so kept tokens never read dropped ones and no row is empty. The mask is
    ``log(D_j + eps)``: adding it before the softmax multiplies the exponentials by ``D_j + eps`` exactly like
    the official masked softmax, and its gradient with respect to ``D_j`` is the same, so the task loss
    reaches the predictors through the straight-through decisions. Every entry is finite: no NaN, whatever
    the keep ratio and the dtype the attention runs in.
    """
    keep = keep.float()
    num_tokens = keep.shape[1]
    bias = torch.log(keep + _DROPPED_WEIGHT)[:, None, None, :].expand(-1, 1, num_tokens, -1)
    itself = torch.eye(num_tokens, dtype=torch.bool, device=keep.device)
    return bias.masked_fill(itself, 0.0)


def check_prune_locations(locations: Sequence[int] | None, depth: int) -> list[int]:
    """``locations`` as block indices, checked against ``depth``; :func:`default_prune_locations` when None."""
    if locations is None:
        return default_prune_locations(depth)
    locations = [int(location) for location in locations]
    increasing = all(a < b for a, b in zip(locations, locations[1:]))
    if not locations or not increasing or locations[0] < 0 or locations[-1] >= depth:
        raise ValueError(f"prune_locations must be strictly increasing block indices in [0, {depth - 1}], "
                         f"got {locations}")
    return locations


def attention_half(block: Block, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """The first residual branch of timm's ``Block.forward``: ``x + attention(norm1(x))``."""
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask)))


def mlp_half(block: Block, x: Tensor) -> Tensor:
    """The second residual branch of timm's ``Block.forward``: ``x + mlp(norm2(x))``."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def check_plain_blocks(vit: nn.Module, method: str) -> None:
    """Splitting a block in halves is only right for timm's pre-norm ``Block`` with its own forward."""
    for index, block in enumerate(vit.blocks):
        if not isinstance(block, Block) or type(block).forward is not Block.forward:
            raise ValueError(f"{method} needs timm's pre-norm Block (attention then MLP, each a residual branch); "
                             f"block {index} is a {type(block).__name__}")


def pooled_head(vit: nn.Module, tokens: Tensor, sizes: Tensor | None = None) -> Tensor:
    """timm's head after the final norm; average pooling weights each patch token by the patches it holds.

    ``sizes`` (B, N) counts the source patches behind each patch token (None: one each). With it, the average
    over merged tokens equals the average over the dense model's patch tokens of the same values.
    """
    tokens = vit.norm(tokens)
    if vit.global_pool == "avg" and sizes is not None:
        prefix = vit.num_prefix_tokens
        weights = sizes.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens[:, prefix:] * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
        # forward_head averages the patch tokens: hand it their weighted mean as the only one.
        tokens = torch.cat([tokens[:, :prefix], mean], dim=1)
    return vit.forward_head(tokens)


def check_pooling(vit: nn.Module, method: str) -> None:
    """The head must read the class token, or average the patch tokens only (which sizes can weight)."""
    supported = vit.global_pool == "token" or (
        vit.global_pool == "avg" and not getattr(vit, "pool_include_prefix", False))
    if getattr(vit, "attn_pool", None) is not None or not supported:
        raise ValueError(f"{method} supports backbones pooling by class token or by average "
                         f"(global_pool='token' or 'avg'), got global_pool={vit.global_pool!r}")


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """``tokens`` (B, N, C) at positions ``index`` (B, K) -> (B, K, C)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class AttentionTap:
    """Records the queries and keys (B, heads, N, head_dim) a timm ``Attention`` used, after qk-norm.

    Hooks on ``attn.q_norm`` and ``attn.k_norm`` see exactly the tensors the attention product uses, whether
    the fused kernel or the explicit path runs. :meth:`pop` hands them over and forgets them, so that no
    activation outlives the forward that made it.
    """

    def __init__(self, attn: nn.Module) -> None:
        self.scale: float = attn.scale
        self._query: Tensor | None = None
        self._key: Tensor | None = None
        attn.q_norm.register_forward_hook(self._record_query)
        attn.k_norm.register_forward_hook(self._record_key)

    def _record_query(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._query = output

    def _record_key(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._key = output

    def pop(self) -> tuple[Tensor, Tensor]:
        """The queries and keys of the last call."""
        query, key = self._query, self._key
        self._query = self._key = None
        return query, key


def class_attention(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """The class token's attention over all tokens, averaged over heads: (B, N) from (B, H, N, d) q and k.

    Recomputed from the query and keys (the fused kernel never materialises the attention map); only the
    class token's row is computed, ``N x dim`` MACs.
    """
    logits = (query[:, :, :1] * scale) @ key.transpose(-2, -1)
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0]


class PatchGroups:
    """Which token each source patch is part of, as the patch tokens are merged, fused or dropped.

    ``index`` (B, num_patches) holds, for each source patch, the position among the current patch tokens of
    the token it has become part of (prefix tokens are not counted), or -1 once its token has been dropped.
    """

    def __init__(self, batch: int, num_patches: int, device: torch.device) -> None:
        self.index = torch.arange(num_patches, device=device).expand(batch, -1)
        self.history: list[Tensor] = []

    def move(self, destination: Tensor) -> None:
        """Apply a reduction: ``destination`` (B, n) is the new position of each of the n current tokens, -1
        for a token dropped."""
        dropped = self.index < 0
        self.index = destination.gather(1, self.index.clamp(min=0)).masked_fill(dropped, -1)
        self.history.append(self.index)
