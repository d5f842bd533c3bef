"""ToMe: token merging, training-free (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

Between the attention and the MLP of every block, the tokens are split into two alternating sets A and B
(over the whole sequence, the class token first in A, as the official code does); each A token is matched to
its most similar B token (cosine similarity of the attention keys, averaged over heads) and the ``r``
best-matched A tokens are merged into their B partners by size-weighted averaging. The sequence really gets
shorter, so every later layer costs less. Merged tokens keep their size (how many source patches they hold)
and proportional attention adds ``log(size)`` to the attention logits, so a token made of ``s`` patches weighs
in attention as those ``s`` patches did. Prefix tokens (class, registers) never merge and receive no merge.

It needs no training: ``init_from_dense`` takes any trained dense checkpoint (or build it from a timm model
with ``pretrained=True``), and ``r`` is a budget knob that can change at any time. Training with merging
switched on is possible too (the same forward runs in training mode); a model trained so does without
proportional attention, as the official code trains (:meth:`ToMe.begin_training`).

See docs/methods/tome.md for what follows the paper and what is a choice.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from ..measure.macs import attention_macs, head_macs, mlp_macs, patch_embed_macs, vit_macs
from ..models.vit import BackboneSpec, embed_tokens
from .base import Prediction, SingleViT
from .budget import Choice, Interval, KnobSpace
from .registry import register_method
from .token_reduction import (KeyTap, PatchGroups, attention_half, check_plain_blocks, check_pooling,
                              gather_tokens, mlp_half, pooled_head, run_block)

__all__ = ["ToMe", "Matching", "bipartite_soft_matching", "merge_by_size", "r_schedule", "largest_constant_r"]

#: How ``r`` (an int) spreads over the blocks: the same in every block, or from ``2r`` down to 0 (about the
#: same total, never more).
SCHEDULES = ("constant", "decreasing")

#: The benchmark's default points: these shares of the largest constant ``r`` the backbone allows.
_SWEEP_SHARES = (0.2, 0.4, 0.6, 0.8, 1.0)


# --------------------------------------------------------------------------------------------- merging
class Matching(NamedTuple):
    """One block's merges in a sequence of ``prefix`` tokens that never merge followed by the n tokens that may.
    Set A is every other one of the n, from the first at an even position of the whole sequence; set B the
    others. Positions below are within A or within B."""

    prefix: int
    unmerged: Tensor  #: (B, |A| - r) the A tokens that stay, in order
    merged: Tensor  #: (B, r) the A tokens that merge
    partner: Tensor  #: (B, r) the B token each of them merges into

    @property
    def first_a(self) -> int:
        """Position of A's first token among the n (the class token, at 0 of the whole sequence, is in A)."""
        return self.prefix % 2

    def merge_sum(self, x: Tensor) -> Tensor:
        """(B, prefix + n, C) -> (B, prefix + n - r, C): the prefix as it is, the unmerged A tokens, then the B
        tokens plus what merged into them (one concatenation: at batch 1 every kernel counts)."""
        patches = x[:, self.prefix:]
        set_a, set_b = patches[:, self.first_a::2], patches[:, 1 - self.first_a::2]
        into_b = self.partner.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.cat([x[:, :self.prefix], gather_tokens(set_a, self.unmerged),
                          set_b.scatter_add(1, into_b, gather_tokens(set_a, self.merged))], dim=1)

    def destination(self, num: int) -> Tensor:
        """(B, num): where each of the ``num`` tokens went in the merged sequence (what :class:`PatchGroups`
        follows)."""
        batch, kept_a = self.unmerged.shape
        size_a, device = kept_a + self.merged.shape[1], self.unmerged.device
        destination_a = torch.empty(batch, size_a, dtype=torch.long, device=device)
        destination_a.scatter_(1, self.unmerged, torch.arange(kept_a, device=device).expand(batch, -1))
        destination_a.scatter_(1, self.merged, kept_a + self.partner)
        destination = torch.empty(batch, num, dtype=torch.long, device=device)
        destination[:, self.first_a::2] = destination_a
        destination[:, 1 - self.first_a::2] = kept_a + torch.arange(num - size_a, device=device)
        return destination


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int, offset: int = 0) -> Matching:
    """Which tokens merge where when ``r`` of them are merged.

    ``metric`` (B, n, d) describes the n tokens that may merge; ``offset`` tokens that may not (the prefix)
    come before them in the sequence. Set A is the tokens at even positions of the whole sequence, set B
    those at odd positions, so with one class token the first patch token is in B. Every A token picks its
    most similar B token (cosine similarity) and the ``r`` A tokens with the most similar partners go to that
    partner. The merged sequence is the unmerged A tokens (in their order), then the B tokens (in theirs).
    Needs ``r <= n // 2``, which is at most the size of A.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    # The official split keeps the class token (position 0, in A) but never merges it; leaving every prefix
    # token out of the matching protects it the same way, and the prefix's length still decides which patch
    # tokens are in A.
    first_a = offset % 2
    set_a, set_b = metric[:, first_a::2], metric[:, 1 - first_a::2]
    best_score, partner = (set_a @ set_b.transpose(-1, -2)).max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    merged = order[:, :r]
    return Matching(offset, order[:, r:].sort(dim=-1).values, merged, partner.gather(1, merged))


def merge_by_size(tokens: Tensor, sizes: Tensor, matching: Matching) -> tuple[Tensor, Tensor]:
    """Size-weighted mean of the tokens merged into each, and the summed sizes.

    ``tokens`` (B, N, C), ``sizes`` (B, N), the matching's prefix first -> (B, N - r, C), (B, N - r). The
    size-weighted mean over all tokens is unchanged by merging; the prefix tokens come out as they went in.
    The sizes ride along as one more channel: one merge instead of two.
    """
    weights = sizes.unsqueeze(-1).to(tokens.dtype)
    merged = matching.merge_sum(torch.cat([tokens * weights, weights], dim=-1))
    merged_sizes = merged[..., -1:]
    return merged[..., :-1] / merged_sizes, merged_sizes.squeeze(-1).to(sizes.dtype)


# --------------------------------------------------------------------------------------------- schedules of r
def r_schedule(r: int | Sequence[int], schedule: str, depth: int) -> list[int]:
    """Tokens merged in each block: ``r`` everywhere, ``2r`` decreasing linearly to 0, or a list as given.

    The decreasing schedule is ``floor(2r * (depth - 1 - i) / (depth - 1))`` in block ``i``, computed in
    integers: a float expression truncates 2.0 computed as 1.9999... to 1 and loses merges.
    """
    if not isinstance(r, int):
        return list(r)
    if schedule == "decreasing" and depth > 1:
        return [2 * r * (depth - 1 - index) // (depth - 1) for index in range(depth)]
    return [r] * depth


def patch_counts(r_per_block: Sequence[int], num_patches: int) -> list[int]:
    """Patch tokens entering each block when ``r_per_block`` are merged (no check that it is possible)."""
    counts = [num_patches]
    for r in r_per_block[:-1]:
        counts.append(counts[-1] - r)
    return counts


def largest_constant_r(num_patches: int, depth: int) -> int:
    """The largest ``r`` that every block can merge (a block merges at most half its patch tokens)."""
    r = 0
    while all(r + 1 <= n // 2 for n in patch_counts([r + 1] * depth, num_patches)):
        r += 1
    return r


def _valid_r(r: Any, schedule: Any, depth: int, num_patches: int) -> bool:
    try:
        _check_r(r, schedule, depth, num_patches)
    except ValueError:
        return False
    return True


def _check_r(r: Any, schedule: Any, depth: int, num_patches: int) -> list[int]:
    """``r`` per block for valid knobs; a ``ValueError`` saying what is possible otherwise."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule is one of {', '.join(SCHEDULES)}; got {schedule!r}")
    is_count = isinstance(r, int) and not isinstance(r, bool)
    is_list = isinstance(r, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
    if not (is_count or is_list) or (is_list and len(r) != depth):
        raise ValueError(f"r is the number of tokens merged per block (an int) or a list of {depth} ints, "
                         f"one per block; got {r!r}")
    if is_list and schedule != "constant":
        raise ValueError("a list r already gives every block its count; leave schedule='constant'")
    per_block = r_schedule(r, schedule, depth)
    counts = patch_counts(per_block, num_patches)
    for index, (merge, tokens) in enumerate(zip(per_block, counts)):
        if merge < 0 or merge > tokens // 2:
            raise ValueError(f"r={r!r} ({schedule}) asks block {index} to merge {merge} of its {tokens} patch "
                             f"tokens; a block merges between 0 and half its patch tokens. The largest constant "
                             f"r for {num_patches} patches and {depth} blocks is "
                             f"{largest_constant_r(num_patches, depth)}")
    return per_block


# --------------------------------------------------------------------------------------------- the method
@register_method
class ToMe(SingleViT):
    """A timm ViT whose patch tokens are merged in every block, ``r`` at a time.

    Args:
        backbone: any timm plain ViT with pre-norm blocks (LayerScale, qk-norm, registers and fused attention
            are fine) pooling by class token or by average.
        r: tokens merged per block (a budget knob). An int follows ``schedule``; a list gives each block its
            own count. Default: half the largest constant ``r`` the backbone allows.
        schedule: ``constant`` (r in every block) or ``decreasing`` (2r in the first block down to 0 in the
            last, about the same total). A budget knob.
        proportional_attention: add ``log(size)`` to the attention logits of merged tokens. Default (None):
            on for a model used as its dense weights were trained (off the shelf, the paper's setting), off
            once dyntok's trainer trains it with merging (:meth:`begin_training`), as the official code trains
            and then evaluates what it trained.
    """

    method_name = "tome"

    def __init__(self, backbone: BackboneSpec, r: int | Sequence[int] | None = None, schedule: str = "constant",
                 proportional_attention: bool | None = None) -> None:
        vit = backbone.build()
        check_plain_blocks(vit, "ToMe")
        check_pooling(vit, "ToMe")
        super().__init__(backbone, r=list(r) if isinstance(r, tuple) else r, schedule=schedule,
                         proportional_attention=proportional_attention)
        self.vit = vit
        self.proportional_attention = proportional_attention is not False
        self._taps = [KeyTap(block) for block in vit.blocks]
        default_r = largest_constant_r(self.num_patches, len(vit.blocks)) // 2
        self.r: int | list[int] = 0
        self.schedule = "constant"
        self.set_budget(r=default_r if r is None else r, schedule=schedule)

    def r_per_block(self) -> list[int]:
        return r_schedule(self.r, self.schedule, len(self.vit.blocks))

    def begin_training(self) -> None:
        """Train (and from then on evaluate) without proportional attention, unless it was chosen explicitly.

        The official code turns it off for training: a model that learns with merged tokens learns to weigh
        them itself. The choice is recorded in :attr:`config`, so the trained model is rebuilt the same way.
        """
        if self.method_kwargs["proportional_attention"] is None:
            self.method_kwargs["proportional_attention"] = self.proportional_attention = False

    # ----------------------------------------------------------------- the forward (training and inference)
    def _merge_forward(self, x: Tensor, track: bool = False) -> tuple[Tensor, PatchGroups | None]:
        """Logits with ``r`` tokens merged after each block's attention, and (``track``) where every source
        patch went."""
        self.check_images(x)
        vit, prefix = self.vit, self.vit.num_prefix_tokens
        tokens = embed_tokens(vit, x)
        batch, num_patches = tokens.shape[0], tokens.shape[1] - prefix
        sizes = tokens.new_ones(batch, tokens.shape[1])
        groups = PatchGroups(batch, num_patches, tokens.device) if track else None
        bias = None
        for block, tap, r in zip(vit.blocks, self._taps, self.r_per_block()):
            tap.enable(r > 0)
            if r == 0 and bias is None:
                # Nothing to merge and no sizes to weigh attention by: timm's block (r = 0 is dense).
                tokens = run_block(block, tokens)
                continue
            tokens = attention_half(block, tokens, attn_mask=bias, tap=tap)
            if r > 0:
                metric = tap.pop().mean(dim=1)[:, prefix:]  # the patch tokens' keys, averaged over heads
                matching = bipartite_soft_matching(metric, r, offset=prefix)
                if groups is not None:
                    groups.move(matching.destination(metric.shape[1]))
                tokens, sizes = merge_by_size(tokens, sizes, matching)
                if self.proportional_attention:
                    bias = sizes.log()[:, None, None, :]  # a token of s patches weighs in attention as s patches
            tokens = mlp_half(block, tokens)
        return pooled_head(vit, tokens, sizes[:, prefix:]), groups

    def forward(self, x: Tensor) -> Tensor:
        """Training forward: merging is on (ToMe can be trained or fine-tuned with it); returns logits."""
        return self._merge_forward(x)[0]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        logits, groups = self._merge_forward(x, track=self.explain)
        batch = x.shape[0]
        macs = torch.full((batch,), self.per_budget("macs", self._macs_per_image), dtype=torch.float64)
        if groups is None:
            return Prediction(logits, macs)
        final_tokens = self.num_patches - sum(self.r_per_block())
        # Per merging block, which token each patch is part of. Merging drops no patch (each still lives on in
        # some token), so there is no kept_patches mask: pictures tint the merged groups instead of greying any.
        extras = {"patch_groups": groups.history,
                  "token_length": torch.full((batch,), final_tokens, dtype=torch.long)}
        return Prediction(logits, macs, extras)

    def _macs_per_image(self) -> float:
        """Attention at the tokens a block receives, matching, MLP at the tokens left after merging."""
        prefix, head_dim = self.vit.num_prefix_tokens, self.vit.blocks[0].attn.head_dim
        macs = patch_embed_macs(self.vit.patch_embed) + head_macs(self.vit)
        per_block = self.r_per_block()
        for block, r, patches in zip(self.vit.blocks, per_block, patch_counts(per_block, self.num_patches)):
            macs += attention_macs(block.attn, patches + prefix) + mlp_macs(block.mlp, patches - r + prefix)
            if r > 0:
                macs += (patches + 1) // 2 * (patches // 2) * head_dim  # cosine similarities of A x B
        return macs

    def dense_macs(self) -> float:
        return vit_macs(self.vit)

    def init_from_dense(self, state_dict: dict[str, Tensor]) -> None:
        """Load a ``DenseViT.state_dict()``: ToMe has no weights of its own."""
        self.load_state_dict(state_dict)

    # ----------------------------------------------------------------- budget knobs
    def get_budget(self) -> dict[str, Any]:
        return {"r": self.r, "schedule": self.schedule}

    def budget_space(self) -> dict[str, KnobSpace]:
        """A constant ``r`` valid under both schedules (per-block lists are accepted too, checked by
        :meth:`set_budget`)."""
        depth, largest = len(self.vit.blocks), largest_constant_r(self.num_patches, len(self.vit.blocks))
        while largest > 0 and not _valid_r(largest, "decreasing", depth, self.num_patches):
            largest -= 1
        return {"r": Interval(0, largest, integer=True), "schedule": Choice(("constant", "decreasing"))}

    def set_budget(self, **knobs: Any) -> None:
        unknown = sorted(set(knobs) - {"r", "schedule"})
        if unknown:
            raise ValueError(f"ToMe's budget knobs are r and schedule; got {unknown}")
        r, schedule = knobs.get("r", self.r), knobs.get("schedule", self.schedule)
        try:
            _check_r(r, schedule, len(self.vit.blocks), self.num_patches)
        except ValueError as error:
            raise ValueError(f"{error} (with either schedule, r is {self.budget_space()['r'].describe()})") from None
        self.r, self.schedule = (list(r) if isinstance(r, (list, tuple)) else r), schedule

    def paper_budget(self) -> dict[str, Any]:
        """The paper's off-the-shelf DeiT setting, r = 13 in every block (fewer where a block cannot merge 13)."""
        return {"r": min(13, largest_constant_r(self.num_patches, len(self.vit.blocks))), "schedule": "constant"}

    def speed_budgets(self, images: Tensor) -> dict[str, dict[str, Any]]:
        """The paper's r, and r = 0 (nothing merged: every block runs as timm's, so this should cost what dense
        does)."""
        paper = self.paper_budget()
        return {f"r={paper['r']} (paper)": paper, "r=0 (nothing merged)": {"r": 0, "schedule": "constant"}}

    def budget_sweep(self) -> list[dict[str, Any]]:
        largest = largest_constant_r(self.num_patches, len(self.vit.blocks))
        values = sorted({max(1, round(share * largest)) for share in _SWEEP_SHARES}) if largest else [0]
        return [{"r": r, "schedule": "constant"} for r in values]

