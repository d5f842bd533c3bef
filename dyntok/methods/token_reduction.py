"""Pieces shared by the methods that shrink the token sequence inside a block (ToMe, EViT).

Both act between the attention and the MLP of a timm ``Block``, so a block is run as its two residual halves
(:func:`attention_half`, :func:`mlp_half`), built from the block's own sub-modules (``norm1``, ``attn``,
``ls1``, ``drop_path1``...). LayerScale, qk-norm, fused attention and stochastic depth therefore come from
timm itself; ``tests/test_tome.py`` holds the two halves to timm's ``Block.forward``.

Both also need what the attention computed: ToMe matches tokens by their keys, EViT ranks them by the class
token's attention. :class:`AttentionTap` reads the queries and keys from forward hooks on the attention's
``q_norm`` and ``k_norm`` (identities when qk-norm is off), so timm's ``Attention.forward`` stays untouched,
fused kernel included, and checkpoints keep timm's parameter names.

:class:`PatchGroups` follows which source patch each remaining token stands for (``extras['patch_groups']``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from timm.models.vision_transformer import Block

__all__ = ["attention_half", "mlp_half", "check_plain_blocks", "check_pooling", "pooled_head",
           "gather_tokens", "AttentionTap", "class_attention", "PatchGroups"]


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
