"""EViT: keep the attentive tokens, fuse the rest (Liang et al., "Not All Patches are What You Need:
Expediting Vision Transformers via Token Reorganizations", ICLR 2022).

In a few blocks, after the attention, the patch tokens are ranked by the attention the class token pays them
(averaged over heads). The top ``ceil(keep_rate * n)`` go on; the others are fused into one token, their sum
weighted by that attention, appended after the kept ones (or, with ``fuse_inattentive=False``, dropped). The
MLP and every later block run on the shorter sequence. The fused token is an ordinary token for later blocks
(it may be kept or fused again).

EViT has no weights of its own: it runs on any dense checkpoint as is, or is trained. Fine-tuned from a
trained model it trains at its target keep rate from the first step (the official fine-tune); trained from
scratch, its keep rate falls from 1 to the target on the published schedule (:meth:`EViT.training_keep_rate`).

See docs/methods/evit.md for what follows the paper and what is a choice.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ..measure.macs import attention_macs, head_macs, mlp_macs, patch_embed_macs, vit_macs
from ..models.vit import BackboneSpec, embed_tokens
from .base import Prediction, SingleViT
from .budget import Interval, KnobSpace
from .registry import register_method
from .token_reduction import (ClassAttentionTap, PatchGroups, attention_half, check_plain_blocks, check_pooling,
                              check_prune_locations, gather_tokens, mlp_half, pooled_head, run_block)

__all__ = ["EViT", "reorganise", "destinations", "kept_count", "KEEP_RATE_SCHEDULES"]

#: Keep rates the benchmark sweeps by default (the paper reports 0.5 to 0.9 on DeiT-S).
_SWEEP_KEEP_RATES = (0.5, 0.6, 0.7, 0.8, 0.9)

#: The keep rate while training: from 1 down to the target (from scratch), or the target throughout (fine-tune).
KEEP_RATE_SCHEDULES = ("warmup", "constant")


def kept_count(keep_rate: float, num_patches: int) -> int:
    """Patch tokens kept out of ``num_patches``: ``ceil(keep_rate * n)``, at least 1.

    The small epsilon keeps ``0.7 * 100 = 70.00000000000001`` at 70 rather than 71.
    """
    return max(1, math.ceil(keep_rate * num_patches - 1e-9))


def reorganise(tokens: Tensor, scores: Tensor, keep: int, fuse: bool = True, prefix: int = 0) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` patch tokens with the highest scores; fuse the others into one token, or drop them.

    ``tokens`` (B, prefix + n, C): ``prefix`` tokens that stay as they are, then the n patch tokens ``scores``
    (B, n) ranks -> the prefix, the kept tokens in their original order, and when ``fuse`` the score-weighted
    sum of the others: (B, prefix + keep + 1, C) or (B, prefix + keep, C); and the positions kept among the n
    (B, keep), in order (:func:`destinations` turns them into where every token went).
    """
    patches = tokens[:, prefix:]
    top = scores.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
    parts = [tokens[:, :prefix], gather_tokens(patches, top)]
    if fuse:
        # One product over every token, the kept ones weighted 0, instead of gathering the others first: n x C
        # MACs instead of (n - keep) x C, and two kernels fewer, which is what counts at batch 1.
        parts.append(scores.scatter(1, top, 0.0).to(patches.dtype).unsqueeze(1) @ patches)
    return torch.cat(parts, dim=1), top


def destinations(top: Tensor, num: int, fuse: bool) -> Tensor:
    """Where each of ``num`` tokens went when those at ``top`` (B, keep) were kept: its new position, ``keep``
    when fused, -1 when dropped. (B, num)."""
    batch, keep = top.shape
    destination = torch.full((batch, num), keep if fuse else -1, dtype=torch.long, device=top.device)
    return destination.scatter_(1, top, torch.arange(keep, device=top.device).expand(batch, -1))


@register_method
class EViT(SingleViT):
    """A timm ViT that keeps its attentive patch tokens and fuses the others at a few blocks.

    Args:
        backbone: any timm plain ViT with a class token and pre-norm blocks (LayerScale, qk-norm, registers and
            fused attention are fine).
        keep_rate: share of the patch tokens kept at each reorganising block (a budget knob, in (0, 1]).
        prune_locations: blocks that reorganise after their attention. Default: at 1/4, 1/2 and 3/4 of the depth
            (the paper's 4th, 7th and 10th of 12 blocks; blocks 1, 2, 3 of a 4-block CIFAR preset).
        fuse_inattentive: fuse the inattentive tokens into one (the paper's EViT; the official ``--fuse_token``)
            or drop them (half of the released DeiT-S checkpoints were trained so).
        keep_rate_schedule: the keep rate while training. ``constant``: ``keep_rate`` from the first step (the
            official fine-tune of a trained model); ``warmup``: 1, then a cosine down to ``keep_rate`` between
            ``shrink_start`` and ``shrink_end`` (the official training from scratch). Default (None):
            ``constant`` once started from a trained model (:meth:`init_from_dense`, or a backbone built with
            pretrained weights), ``warmup`` otherwise.
        shrink_start, shrink_end: shares of training between which the ``warmup`` keep rate falls from 1 to
            ``keep_rate`` (published: epochs 10 to 110 of 300). Before, every token is kept.
    """

    method_name = "evit"

    def __init__(self, backbone: BackboneSpec, keep_rate: float = 0.7, prune_locations: Sequence[int] | None = None,
                 fuse_inattentive: bool = True, keep_rate_schedule: str | None = None,
                 shrink_start: float = 10 / 300, shrink_end: float = 110 / 300) -> None:
        vit = backbone.build()
        check_plain_blocks(vit, "EViT")
        check_pooling(vit, "EViT")
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("EViT ranks tokens by the class token's attention; the backbone has no class token")
        if keep_rate_schedule not in (None, *KEEP_RATE_SCHEDULES):
            raise ValueError(f"keep_rate_schedule is one of {', '.join(KEEP_RATE_SCHEDULES)} (or None: constant "
                             f"when started from a trained model, warmup otherwise); got {keep_rate_schedule!r}")
        if not 0.0 <= shrink_start <= shrink_end <= 1.0:
            raise ValueError(f"shrink_start <= shrink_end are shares of training in [0, 1]; "
                             f"got {shrink_start}, {shrink_end}")
        locations = check_prune_locations(prune_locations, len(vit.blocks))
        super().__init__(backbone, keep_rate=keep_rate, prune_locations=locations, fuse_inattentive=fuse_inattentive,
                         keep_rate_schedule=keep_rate_schedule, shrink_start=shrink_start, shrink_end=shrink_end)
        self.vit = vit
        self.prune_locations = tuple(locations)
        self.fuse_inattentive = fuse_inattentive
        self.keep_rate_schedule = keep_rate_schedule or "warmup"
        self.shrink_start, self.shrink_end = shrink_start, shrink_end
        if backbone.pretrained or backbone.pretrained_file is not None:
            self._started_trained()
        self._taps = {index: ClassAttentionTap(vit.blocks[index]) for index in locations}
        self._training_progress: float | None = None
        self.keep_rate = 1.0
        self.set_budget(keep_rate=keep_rate)

    # ----------------------------------------------------------------- training
    def set_training_progress(self, fraction: float) -> None:
        self._training_progress = fraction

    def training_keep_rate(self) -> float:
        """The keep rate of the current training step.

        ``constant``: ``keep_rate``. ``warmup``: 1, then a cosine down to ``keep_rate``, then it; without progress
        reports from a trainer, ``keep_rate``.
        """
        progress = self._training_progress
        if self.keep_rate_schedule == "constant" or progress is None or progress >= self.shrink_end:
            return self.keep_rate
        if progress < self.shrink_start:
            return 1.0
        done = (progress - self.shrink_start) / (self.shrink_end - self.shrink_start)
        return self.keep_rate + (1.0 - self.keep_rate) * 0.5 * (1.0 + math.cos(math.pi * done))

    def forward(self, x: Tensor) -> Tensor:
        """Training forward: tokens really removed at the scheduled keep rate; returns logits."""
        return self._reorganising_forward(x, self.training_keep_rate())[0]

    def init_from_dense(self, state_dict: dict[str, Tensor]) -> None:
        """Load a ``DenseViT.state_dict()`` (EViT has no weights of its own).

        Training from here is a fine-tune (:meth:`_started_trained`).
        """
        self.load_state_dict(state_dict)
        self._started_trained()

    def _started_trained(self) -> None:
        """A model that starts trained needs no warm-up: unless a schedule was chosen, training keeps
        ``keep_rate`` from the first step, as the official fine-tune does (recorded in :attr:`config`)."""
        if self.method_kwargs["keep_rate_schedule"] is None:
            self.method_kwargs["keep_rate_schedule"] = self.keep_rate_schedule = "constant"

    # ----------------------------------------------------------------- the forward
    def _reorganising_forward(self, x: Tensor, keep_rate: float,
                              track: bool = False) -> tuple[Tensor, PatchGroups | None, list[Tensor]]:
        """Logits and (``track``) where each source patch went and, per reorganisation, which are still kept."""
        self.check_images(x)
        vit, prefix = self.vit, self.vit.num_prefix_tokens
        tokens = embed_tokens(vit, x)
        batch, num_patches = tokens.shape[0], tokens.shape[1] - prefix
        groups = PatchGroups(batch, num_patches, tokens.device) if track else None
        set_aside = tokens.new_zeros(batch, num_patches, dtype=torch.bool) if track else None  # fused or dropped
        kept_patches = []
        reorganising = self._reorganising_blocks(keep_rate)
        for index, tap in self._taps.items():
            tap.enable(index in reorganising)
        for index, block in enumerate(vit.blocks):
            if index not in reorganising:
                tokens = run_block(block, tokens)
                continue
            tokens = attention_half(block, tokens, tap=self._taps[index])
            keep = kept_count(keep_rate, tokens.shape[1] - prefix)
            scores = self._taps[index].pop()[:, prefix:]
            tokens, top = reorganise(tokens, scores, keep, self.fuse_inattentive, prefix)
            if groups is not None:
                groups.move(destinations(top, scores.shape[1], self.fuse_inattentive))
                set_aside |= (groups.index == keep) | (groups.index < 0)  # fused (at position keep) or dropped
                kept_patches.append(~set_aside)
            tokens = mlp_half(block, tokens)
        return pooled_head(vit, tokens), groups, kept_patches

    def _reorganising_blocks(self, keep_rate: float) -> set[int]:
        """The prune locations where keeping ``keep_rate`` shortens the sequence; the other blocks run as timm's.

        Where keeping all but one token and fusing that one would not shorten it (short CIFAR sequences at high
        keep rates), reorganising would cost the class-attention row and the fusion and save nothing.
        """
        blocks, patches = set(), self.num_patches
        for index in self.prune_locations:
            keep = kept_count(keep_rate, patches)
            if keep + int(self.fuse_inattentive) < patches:
                blocks.add(index)
                patches = keep + int(self.fuse_inattentive)
        return blocks

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        logits, groups, kept_patches = self._reorganising_forward(x, self.keep_rate, track=self.explain)
        batch = x.shape[0]
        # How the attention runs decides whether the class row costs extra: it is part of the cache's key.
        kernels = tuple(tap.recomputes for tap in self._taps.values())
        macs, final_patches = self.per_budget("macs", self._macs_and_final_patches, kernels)
        if groups is None:
            return Prediction(logits, torch.full((batch,), macs, dtype=torch.float64))
        extras = {"kept_patches": kept_patches, "token_length": torch.full((batch,), final_patches, dtype=torch.long)}
        if self.fuse_inattentive:  # only fusing puts several patches in one token; dropping leaves single ones
            extras["patch_groups"] = groups.history
        return Prediction(logits, torch.full((batch,), macs, dtype=torch.float64), extras)

    def _macs_and_final_patches(self) -> tuple[float, int]:
        """MACs per image (the class-attention row and the fusion included) and the patch tokens at the end."""
        prefix, patches = self.vit.num_prefix_tokens, self.num_patches
        macs = patch_embed_macs(self.vit.patch_embed) + head_macs(self.vit)
        reorganising = self._reorganising_blocks(self.keep_rate)
        for index, block in enumerate(self.vit.blocks):
            macs += attention_macs(block.attn, patches + prefix)
            if index in reorganising:
                if self._taps[index].recomputes:  # the fused kernel kept no probabilities: the class row again
                    macs += (patches + prefix) * (block.attn.qkv.out_features // 3)
                keep = kept_count(self.keep_rate, patches)
                if self.fuse_inattentive:
                    macs += patches * block.attn.proj.out_features  # the weighted sum into one token (reorganise)
                patches = keep + int(self.fuse_inattentive)
            macs += mlp_macs(block.mlp, patches + prefix)
        return macs, patches

    def dense_macs(self) -> float:
        return vit_macs(self.vit)

    # ----------------------------------------------------------------- budget knobs
    def get_budget(self) -> dict[str, Any]:
        return {"keep_rate": self.keep_rate}

    def budget_space(self) -> dict[str, KnobSpace]:
        # The share of patch tokens each reorganising block keeps.
        return {"keep_rate": Interval(0.0, 1.0, low_open=True)}

    def set_budget(self, **knobs: Any) -> None:
        self.keep_rate = self.checked_budget(knobs).get("keep_rate", self.keep_rate)

    def paper_budget(self) -> dict[str, Any]:
        """The paper's DeiT-S headline keep rate, 0.7."""
        return {"keep_rate": 0.7}

    def speed_budgets(self, images: Tensor) -> dict[str, dict[str, Any]]:
        """The paper's keep rate, and keep rate 1 (nothing fused: every block runs as timm's, so this should cost
        what dense does)."""
        return {"keep 0.7 (paper)": self.paper_budget(), "keep 1.0 (nothing pruned)": {"keep_rate": 1.0}}

    def budget_sweep(self) -> list[dict[str, Any]]:
        return [{"keep_rate": rate} for rate in _SWEEP_KEEP_RATES]
