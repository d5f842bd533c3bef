"""Pieces several methods share, so that no method imports another.

Token grids (DVT, ReViT); where to prune and the training-time keep mask (DynamicViT, EViT, AdaViT); and, for
the methods that shrink the token sequence inside a block (ToMe, EViT), the block's two residual halves and
what its attention computed.

ToMe and EViT both act between the attention and the MLP of a timm ``Block``, so a block is run as its two
residual halves (:func:`attention_half`, :func:`mlp_half`), built from the block's own sub-modules (``norm1``,
``attn``, ``ls1``, ``drop_path1``...). LayerScale, qk-norm, fused attention and stochastic depth therefore come from
timm itself; ``tests/test_tome.py`` holds the two halves to timm's ``Block.forward``.

Both also need what the attention computed: ToMe matches tokens by their keys (:class:`KeyTap`), EViT ranks
them by the class token's attention (:class:`ClassAttentionTap`). Taps read them from forward hooks on the
attention's sub-modules (``q_norm`` and ``k_norm``, identities when qk-norm is off; ``attn_drop``, which receives
the probabilities on the explicit path), so timm's ``Attention.forward`` stays untouched, fused kernel
included, and checkpoints keep timm's parameter names. A tap is only hooked where the budget reads it.

:class:`PatchGroups` follows which source patch each remaining token stands for (``extras['patch_groups']``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from timm.models.vision_transformer import Block

__all__ = ["default_grids", "default_prune_locations", "check_prune_locations", "keep_attention_mask",
           "attention_half", "mlp_half", "check_plain_blocks", "check_pooling", "pooled_head",
           "gather_tokens", "KeyTap", "ClassAttentionTap", "class_attention", "PatchGroups"]


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


class _Tap:
    """Forward hooks on some of a timm ``Attention``'s sub-modules, registered only while :attr:`enabled`.

    A method switches a tap off (:meth:`enable`) in the blocks where its budget reads nothing (ToMe merging 0
    tokens, EViT keeping every token): a module with hooks takes PyTorch's slower call path, which shows at
    batch 1.
    """

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self._handles: list[Any] = []

    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def enable(self, on: bool) -> None:
        """Hook (``on``) or unhook the attention. Cheap when nothing changes: methods call it before every
        forward, with what that forward's budget reads."""
        if on == self.enabled and not (on and self._stale()):
            return
        for handle in self._handles:
            handle.remove()
        self._handles = self._register() if on else []

    def _stale(self) -> bool:
        """Whether the hooks in place no longer fit how the attention runs."""
        return False

    def _register(self) -> list[Any]:
        raise NotImplementedError


class KeyTap(_Tap):
    """Records the keys (B, heads, N, head_dim) a timm ``Attention`` used, after qk-norm (ToMe's matching).

    A hook on ``attn.k_norm`` (an identity when qk-norm is off) sees exactly the keys the attention product
    uses, whether the fused kernel or the explicit path runs. :meth:`pop` hands them over and forgets them, so
    that no activation outlives the forward that made it.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__(attn)
        self._key: Tensor | None = None

    def _register(self) -> list[Any]:
        return [self.attn.k_norm.register_forward_hook(self._record)]

    def _record(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._key = output

    def pop(self) -> Tensor:
        key, self._key = self._key, None
        if key is None:
            raise RuntimeError("the key tap recorded nothing: it is disabled, or the attention did not run")
        return key


class ClassAttentionTap(_Tap):
    """The class token's attention over all tokens, averaged over heads, (B, N), of a timm ``Attention``'s last
    call (EViT's ranking).

    Where the attention runs its explicit path (``attn.fused_attn`` off) the probabilities exist: a hook on
    ``attn.attn_drop``, which receives them, reads the class token's row for free. The fused kernel never
    materialises them, so there the row is recomputed from the queries and keys (hooks on ``q_norm`` and
    ``k_norm``): ``N x dim`` MACs, which the method counts.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__(attn)
        self._fused = bool(attn.fused_attn)
        self._recorded: dict[str, Tensor] = {}

    @property
    def recomputes(self) -> bool:
        """Whether the row costs extra work (the fused kernel runs)."""
        return bool(self.attn.fused_attn)

    def _register(self) -> list[Any]:
        self._fused = self.recomputes
        if self._fused:
            return [self.attn.q_norm.register_forward_hook(self._recorder("query")),
                    self.attn.k_norm.register_forward_hook(self._recorder("key"))]
        return [self.attn.attn_drop.register_forward_pre_hook(self._record_probabilities)]

    def _recorder(self, name: str):
        def record(module: nn.Module, args: Any, output: Tensor) -> None:
            self._recorded[name] = output
        return record

    def _record_probabilities(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._recorded["row"] = args[0][:, :, 0]  # (B, heads, N): the class token's row, before dropout

    def _stale(self) -> bool:
        return self._fused != self.recomputes  # fused_attn was switched after the hooks were placed

    def pop(self) -> Tensor:
        recorded, self._recorded = self._recorded, {}
        if "row" in recorded:
            return recorded["row"].float().mean(dim=1)
        if "query" not in recorded or "key" not in recorded:
            raise RuntimeError("the class-attention tap recorded nothing: it is disabled or the attention did not run")
        return class_attention(recorded["query"], recorded["key"], self.attn.scale)


def class_attention(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """The class token's attention over all tokens, averaged over heads: (B, N) from (B, H, N, d) q and k.

    Only the class token's row is computed, ``N x dim`` MACs.
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
