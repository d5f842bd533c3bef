"""Pieces several methods share, so that no method imports another.

Token grids (DVT, ReViT); where to prune and the training-time keep mask (DynamicViT, EViT, AdaViT); and, for
the methods that shrink the token sequence inside a block (ToMe, EViT), the block's two residual halves and
what its attention computed.

ToMe and EViT both act between the attention and the MLP of a timm ``Block``, so a block is run as its two
residual halves (:func:`attention_half`, :func:`mlp_half`). Both also need what the attention computed: ToMe
matches tokens by their keys (:class:`KeyTap`), EViT ranks them by the class token's attention
(:class:`ClassAttentionTap`). A half runs one of two ways:

- **lean** (:func:`runs_lean`), in eval mode for a block without LayerScale, qk-norm, the attention's output
  norm or gate: the block's sub-modules (norms, linears, activation) are called directly, skipping timm's
  identity placeholders (``ls1``, ``drop_path1``, ``q_norm``, ``attn_drop``...), and the attention hands its
  queries, keys and (explicit path) probabilities straight to the tap. At batch 1 on a short sequence the
  module calls and hooks saved are a sixth of the model's time (the micro preset's 65 tokens). The attention runs the kernel timm would run
  (``attn.fused_attn``), in timm's order of operations, so the result is bit for bit timm's;
  ``tests/test_tome.py`` holds both ways to timm's ``Block.forward``.
- **timm's own modules** otherwise (training, LayerScale, qk-norm...): LayerScale, qk-norm, fused attention
  and stochastic depth come from timm itself, and a tap reads what the attention computed from forward hooks
  on its sub-modules (``q_norm`` and ``k_norm``, identities when qk-norm is off; ``attn_drop``, which receives
  the probabilities on the explicit path), so timm's ``Attention.forward`` stays untouched and checkpoints
  keep timm's parameter names. Hooks are only placed where the budget reads the tap and this way runs.

:class:`PatchGroups` follows which source patch each remaining token stands for (``extras['patch_groups']``).
"""
from __future__ import annotations

import weakref
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import Attention, Mlp, maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block

__all__ = ["default_grids", "default_prune_locations", "check_prune_locations", "keep_attention_mask",
           "attention_half", "mlp_half", "run_block", "runs_lean", "check_plain_blocks", "check_pooling", "pooled_head",
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


def attention_half(block: Block, x: Tensor, attn_mask: Tensor | None = None, tap: _Tap | None = None) -> Tensor:
    """The first residual branch of timm's ``Block.forward``: ``x + attention(norm1(x))``. A ``tap`` that is
    enabled records what the attention computed."""
    if not runs_lean(block):
        return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask)))
    attended = _lean_attention(block.attn, block.norm1(x), attn_mask)
    if tap is not None and tap.enabled:
        tap.take(attended)
    return x + attended.output


def mlp_half(block: Block, x: Tensor) -> Tensor:
    """The second residual branch of timm's ``Block.forward``: ``x + mlp(norm2(x))``."""
    if not runs_lean(block):
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    mlp = block.mlp
    return x + mlp.fc2(mlp.act(mlp.fc1(block.norm2(x))))


def run_block(block: Block, x: Tensor) -> Tensor:
    """timm's ``Block.forward``, the lean way where :func:`runs_lean` (bit for bit the same result)."""
    return mlp_half(block, attention_half(block, x))


#: Whether each block seen so far has the lean structure (:func:`runs_lean`); read once per block.
_LEAN_STRUCTURE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runs_lean(block: Block) -> bool:
    """Whether :func:`attention_half` and :func:`mlp_half` run ``block`` from its sub-modules, skipping timm's
    placeholders: in eval mode (dropout and drop path do nothing then), for timm's own ``Attention`` and ``Mlp``
    without LayerScale, qk-norm, the attention's output norm or gate, or the MLP's norm. The structure is read
    once per block (replacing a sub-module of a block already run is not noticed); the mode on every call."""
    if block.training:
        return False
    lean = _LEAN_STRUCTURE.get(block)
    if lean is None:
        lean = _LEAN_STRUCTURE[block] = _has_lean_structure(block)
    return lean


def _has_lean_structure(block: Block) -> bool:
    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention or type(mlp) is not Mlp or getattr(attn, "gate", None) is not None:
        return False
    placeholders = (block.ls1, block.ls2, attn.q_norm, attn.k_norm, attn.norm, mlp.norm)
    return all(type(module) is nn.Identity for module in placeholders)


class Attended(NamedTuple):
    """What a lean attention computed: the branch's output and, for taps, its queries and keys (B, H, N, d) and
    its probabilities (B, H, N, N) where the explicit path made them (None on the fused kernel)."""

    output: Tensor
    query: Tensor
    key: Tensor
    probabilities: Tensor | None


def _lean_attention(attn: Attention, x: Tensor, attn_mask: Tensor | None) -> Attended:
    """timm's ``Attention.forward`` without its placeholders, in eval mode, on the kernel it would choose."""
    batch, length, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    if attn.fused_attn:
        probabilities = None
        mixed = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
    else:  # timm's explicit path, operation for operation
        logits = (query * attn.scale) @ key.transpose(-2, -1)
        probabilities = maybe_add_mask(logits, resolve_self_attn_mask(length, logits, attn_mask)).softmax(dim=-1)
        mixed = probabilities @ value
    output = attn.proj(mixed.transpose(1, 2).reshape(batch, length, attn.attn_dim))
    return Attended(output, query, key, probabilities)


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
    """What a block's attention computed, for a method to read after :func:`attention_half`.

    A method enables a tap (:meth:`enable`) in the blocks where its budget reads it (not where ToMe merges 0
    tokens, or EViT keeps every token). A lean half hands the tap its queries, keys and probabilities
    (:meth:`take`); where the block runs timm's modules instead, the tap reads them with forward hooks on the
    attention's sub-modules, placed only while enabled: a module with hooks takes PyTorch's slower call path,
    which shows at batch 1.
    """

    def __init__(self, block: Block) -> None:
        self.block, self.attn = block, block.attn
        self.enabled = False
        self._handles: list[Any] = []

    def enable(self, on: bool) -> None:
        """Record (``on``) or not in the coming forward; hooks go in or out as that forward needs. Cheap when
        nothing changes: methods call it before every forward, with what that forward's budget reads."""
        self.enabled = on
        hooked = on and not runs_lean(self.block)
        if hooked == bool(self._handles) and not (hooked and self._stale()):
            return
        for handle in self._handles:
            handle.remove()
        self._handles = self._register() if hooked else []

    def take(self, attended: Attended) -> None:
        """Record what a lean half computed."""
        raise NotImplementedError

    def _stale(self) -> bool:
        """Whether the hooks in place no longer fit how the attention runs."""
        return False

    def _register(self) -> list[Any]:
        raise NotImplementedError


class KeyTap(_Tap):
    """Records the keys (B, heads, N, head_dim) a timm ``Attention`` used, after qk-norm (ToMe's matching).

    Where timm's modules run, a hook on ``attn.k_norm`` (an identity when qk-norm is off) sees exactly the keys
    the attention product uses, whether the fused kernel or the explicit path runs. :meth:`pop` hands them
    over and forgets them, so that no activation outlives the forward that made it.
    """

    def __init__(self, block: Block) -> None:
        super().__init__(block)
        self._key: Tensor | None = None

    def take(self, attended: Attended) -> None:
        self._key = attended.key

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

    Where the attention runs its explicit path (``attn.fused_attn`` off) the probabilities exist and the class
    token's row is read for free (from the lean half, or from a hook on ``attn.attn_drop``, which receives
    them). The fused kernel never materialises them, so there the row is recomputed from the queries and keys
    (from the lean half, or hooks on ``q_norm`` and ``k_norm``): ``N x dim`` MACs, which the method counts.
    """

    def __init__(self, block: Block) -> None:
        super().__init__(block)
        self._fused = bool(self.attn.fused_attn)
        self._recorded: dict[str, Tensor] = {}

    @property
    def recomputes(self) -> bool:
        """Whether the row costs extra work (the fused kernel runs)."""
        return bool(self.attn.fused_attn)

    def take(self, attended: Attended) -> None:
        if attended.probabilities is not None:
            self._recorded["row"] = attended.probabilities[:, :, 0]
        else:
            self._recorded.update(query=attended.query, key=attended.key)

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
