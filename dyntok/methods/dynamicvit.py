"""DynamicViT: learned per-image token pruning (Rao et al., "DynamicViT: Efficient Vision Transformers with
Dynamic Token Sparsification", NeurIPS 2021).

Before a few blocks, a small prediction module scores every patch token still in play and the least useful
ones are pruned, so that later blocks run on fewer tokens. With keep ratio ``rho`` the stages keep
``rho, rho^2, rho^3...`` of the patch tokens; prefix tokens (class, distillation, register) are always kept.

* Training keeps the shapes fixed: hard Gumbel-softmax decisions become an additive attention mask passed
  through timm's ``Block.forward(x, attn_mask=...)`` seam, so no timm forward is copied.
* Inference (:meth:`DynamicViT.predict`) really removes tokens: the top-k patches by keep score are gathered,
  in their original order, and the remaining blocks run on them. MACs count the prediction modules.

See docs/methods/dynamicvit.md for the recipe and for what differs from the official code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..measure.macs import linear_macs, vit_macs
from ..models.vit import BackboneSpec, embed_tokens
from .base import (Criterion, LossOutput, Prediction, SingleViT, TrainingPhase, dense_backbone_state,
                   split_weight_decay)
from .budget import Interval, KnobSpace
from .registry import register_method
from .token_reduction import check_pooling, check_prune_locations, default_prune_locations, keep_attention_mask

__all__ = ["DynamicViT", "DynamicViTOutput", "KeepPredictor", "default_prune_locations", "keep_attention_mask",
           "predictor_macs"]

#: Keep ratios the benchmark sweeps by default (the paper trains at 0.7).
_SWEEP_KEEP_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9)


# --------------------------------------------------------------------------------------------- building blocks
class KeepPredictor(nn.Module):
    """The prediction module: per-token log-probabilities of (keep, drop).

    Each token is embedded (LayerNorm, Linear, GELU); the first half of the channels is the token's local
    feature, the second half is averaged over the tokens still kept into a global feature; their
    concatenation goes through an MLP ``C -> C/2 -> C/4 -> 2``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.classify = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, patches: Tensor, keep: Tensor | None = None) -> Tensor:
        """``patches`` (B, N, C), ``keep`` (B, N) 0/1 weights or None (all kept) -> (B, N, 2) log-probs."""
        features = self.embed(patches)
        half = features.shape[-1] // 2
        local, to_pool = features[..., :half], features[..., half:]
        if keep is None:
            pooled = to_pool.mean(dim=1, keepdim=True)
        else:
            weights = keep.unsqueeze(-1).to(to_pool.dtype)
            # clamp: an image whose patches were all dropped gets a zero global feature, not 0/0 = NaN.
            pooled = (to_pool * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        return self.classify(torch.cat([local, pooled.expand_as(to_pool)], dim=-1))


def predictor_macs(predictor: KeepPredictor, tokens: int | float) -> float:
    """MACs of one :class:`KeepPredictor` over ``tokens`` tokens (its linear layers; pooling is a sum)."""
    return sum(linear_macs(layer, tokens) for layer in predictor.modules() if isinstance(layer, nn.Linear))


def hard_gumbel_keep(log_probs: Tensor) -> Tensor:
    """Hard Gumbel-softmax keep decisions (B, N) from (B, N, 2) log-probs, with straight-through gradients."""
    decision = F.gumbel_softmax(log_probs, hard=True)[..., 0]
    # gumbel_softmax's straight-through sum (hard - soft + soft) leaves values a rounding error away from
    # 0 and 1; snap the forward value exactly (the log-mask needs keep >= 0) and keep the gradient.
    return decision + (decision.detach().round() - decision.detach())


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """``tokens`` (B, N, C) at positions ``index`` (B, K) -> (B, K, C)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@dataclass
class DynamicViTOutput:
    """What the training forward returns for :meth:`DynamicViT.compute_loss`.

    ``decisions`` holds, per pruning stage, the (B, num_patches) cumulative keep mask (0/1 values carrying
    straight-through gradients in training). The teacher fields are set when a teacher is attached.
    """

    logits: Tensor
    patch_tokens: Tensor
    decisions: list[Tensor]
    teacher_logits: Tensor | None = None
    teacher_patch_tokens: Tensor | None = None


# --------------------------------------------------------------------------------------------- the method
@register_method
class DynamicViT(SingleViT):
    """A timm ViT whose patch tokens are pruned, per image, by learned prediction modules.

    Args:
        backbone: the ViT to prune (any timm plain ViT pooling by class token or by average).
        keep_ratio: ``rho``; stage ``s`` (1-based) keeps ``floor(rho^s * num_patches)`` patch tokens (>= 1).
            A budget knob: :meth:`set_budget` changes it after training.
        prune_locations: indices of the blocks the prediction modules run before
            (default :func:`default_prune_locations`).
        ratio_weight: weight of the keep-ratio loss.
        distill_weight: weight of the KL divergence to the teacher's logits.
        token_distill_weight: weight of the MSE to the teacher's final tokens, on tokens still kept.
        backbone_lr_scale: learning rate of the backbone relative to the prediction modules.
        predictor_warmup: share of training during which only the prediction modules learn (the official
            recipe freezes the backbone for its first 5 of 30 epochs); 0 trains everything from the start.
    """

    method_name = "dynamicvit"
    wants_teacher = True

    def __init__(self, backbone: BackboneSpec, keep_ratio: float = 0.7,
                 prune_locations: Sequence[int] | None = None, ratio_weight: float = 2.0,
                 distill_weight: float = 0.5, token_distill_weight: float = 0.5, backbone_lr_scale: float = 0.01,
                 predictor_warmup: float = 5 / 30) -> None:
        vit = backbone.build()
        locations = check_prune_locations(prune_locations, len(vit.blocks))
        if not 0.0 <= predictor_warmup < 1.0:
            raise ValueError(f"predictor_warmup is a share of training in [0, 1), got {predictor_warmup}")
        super().__init__(backbone, keep_ratio=keep_ratio, prune_locations=locations, ratio_weight=ratio_weight,
                         distill_weight=distill_weight, token_distill_weight=token_distill_weight,
                         backbone_lr_scale=backbone_lr_scale, predictor_warmup=predictor_warmup)
        check_pooling(vit, "DynamicViT")
        self.vit = vit
        self.predictors = nn.ModuleList(KeepPredictor(vit.embed_dim) for _ in locations)
        self.prune_locations = tuple(locations)
        self.ratio_weight = ratio_weight
        self.distill_weight = distill_weight
        self.token_distill_weight = token_distill_weight
        self.backbone_lr_scale = backbone_lr_scale
        self.predictor_warmup = predictor_warmup
        self.keep_ratio = 1.0
        self.set_budget(keep_ratio=keep_ratio)

    def stage_keep_ratios(self) -> list[float]:
        """Target share of patch tokens kept after each pruning stage: ``rho, rho^2, ...``."""
        return [self.keep_ratio ** (stage + 1) for stage in range(len(self.prune_locations))]

    def stage_keep_counts(self, num_patches: int | None = None) -> list[int]:
        """Patch tokens kept after each stage at inference: ``floor(rho^s * num_patches)``, at least 1."""
        num_patches = self.num_patches if num_patches is None else num_patches
        # The tiny epsilon keeps 0.7**2 * 100 = 48.999999... at 49.
        return [max(1, math.floor(ratio * num_patches + 1e-9)) for ratio in self.stage_keep_ratios()]

    # ----------------------------------------------------------------- shared pieces of both forwards
    def _stage_before(self, block_index: int) -> int | None:
        """The pruning stage that runs before block ``block_index``, if any."""
        try:
            return self.prune_locations.index(block_index)
        except ValueError:
            return None

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> DynamicViTOutput:
        """Masked forward: every token flows through every block, dropped ones masked out of attention.

        In training mode decisions are hard Gumbel-softmax samples; in eval mode they are the top-k tokens
        :meth:`predict` keeps, so this path and the gathering one can be compared.
        """
        self.check_images(x)
        prefix = self.vit.num_prefix_tokens
        tokens = embed_tokens(self.vit, x)
        batch, num_patches = tokens.shape[0], tokens.shape[1] - prefix
        keep = torch.ones(batch, num_patches, device=tokens.device)
        prefix_keep = keep.new_ones(batch, prefix)
        counts = self.stage_keep_counts(num_patches)
        decisions, mask = [], None
        for index, block in enumerate(self.vit.blocks):
            stage = self._stage_before(index)
            if stage is not None:
                log_probs = self.predictors[stage](tokens[:, prefix:], keep)
                keep = self._decide(log_probs, keep, counts[stage])
                decisions.append(keep)
                mask = keep_attention_mask(torch.cat([prefix_keep, keep], dim=1)).to(tokens.dtype)
            tokens = block(tokens, attn_mask=mask)
        tokens = self.vit.norm(tokens)
        output = DynamicViTOutput(self._masked_head(tokens, keep), tokens[:, prefix:], decisions)
        if self.teacher is not None:
            output.teacher_logits, output.teacher_patch_tokens = self._teacher_outputs(x)
        return output

    def _decide(self, log_probs: Tensor, keep: Tensor, count: int) -> Tensor:
        """New cumulative keep mask: a dropped token stays dropped."""
        if self.training:
            return hard_gumbel_keep(log_probs) * keep
        scores = log_probs[..., 0].masked_fill(keep == 0, float("-inf"))
        chosen = scores.topk(count, dim=1).indices
        return torch.zeros_like(keep).scatter_(1, chosen, 1.0)

    def _masked_head(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """timm's head on the kept tokens only (average pooling must skip the dropped ones)."""
        if self.vit.global_pool == "avg":
            prefix = self.vit.num_prefix_tokens
            weights = keep.unsqueeze(-1).to(tokens.dtype)
            mean = (tokens[:, prefix:] * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1.0)
            # forward_head averages the patch tokens: hand it their masked mean as the only one.
            tokens = torch.cat([tokens[:, :prefix], mean], dim=1)
        return self.vit.forward_head(tokens)

    @torch.no_grad()
    def _teacher_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        teacher = self.teacher.vit
        features = teacher.forward_features(x)
        return teacher.forward_head(features), features[:, teacher.num_prefix_tokens:]

    def compute_loss(self, output: DynamicViTOutput, target: Tensor, criterion: Criterion) -> LossOutput:
        """Task loss + keep-ratio loss, plus logit and token distillation when a teacher is attached."""
        task = criterion(output.logits, target)
        ratio = torch.stack([((decision.mean(dim=1) - goal) ** 2).mean()
                             for decision, goal in zip(output.decisions, self.stage_keep_ratios())]).mean()
        total = task + self.ratio_weight * ratio
        terms = {"task": task.item(), "ratio": ratio.item()}
        if output.teacher_logits is not None:
            distill = F.kl_div(F.log_softmax(output.logits.float(), dim=-1),
                               F.log_softmax(output.teacher_logits.float(), dim=-1),
                               reduction="batchmean", log_target=True)
            token_distill = _kept_token_mse(output.patch_tokens, output.teacher_patch_tokens,
                                            output.decisions[-1].detach())
            total = total + self.distill_weight * distill + self.token_distill_weight * token_distill
            terms.update(distill=distill.item(), token_distill=token_distill.item())
        return LossOutput(total, terms)

    def training_phases(self) -> list[TrainingPhase]:
        if self.predictor_warmup == 0:
            return [TrainingPhase()]
        return [TrainingPhase("warmup", self.predictor_warmup), TrainingPhase("main", 1.0 - self.predictor_warmup)]

    def set_phase(self, name: str) -> None:
        """``warmup`` freezes the backbone (only predictors learn), ``main`` trains both."""
        super().set_phase(name)
        self.vit.requires_grad_(name == "main")

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        groups = split_weight_decay(self.predictors.named_parameters(), weight_decay)
        if self.phase == "main":
            groups += split_weight_decay(self.vit.named_parameters(), weight_decay, lr_scale=self.backbone_lr_scale)
        return groups

    def init_from_dense(self, state_dict: dict[str, Tensor]) -> None:
        """Load a ``DenseViT.state_dict()`` into the backbone; the predictors keep their fresh weights."""
        self.vit.load_state_dict(dense_backbone_state(state_dict))

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        """Prune by gathering: after each stage only the top-k patch tokens, in their original order, go on.

        Extras (when :attr:`explain`): ``kept_patches`` per stage and ``kept_tokens``, the patch tokens left.
        """
        self.check_images(x)
        prefix = self.vit.num_prefix_tokens
        tokens = embed_tokens(self.vit, x)
        batch, num_patches = tokens.shape[0], tokens.shape[1] - prefix
        counts = self.stage_keep_counts(num_patches)
        # Original position of each patch token still present, to report what was kept.
        positions = torch.arange(num_patches, device=tokens.device).expand(batch, -1) if self.explain else None
        kept_patches = []
        for index, block in enumerate(self.vit.blocks):
            stage = self._stage_before(index)
            if stage is not None:
                # A stage that keeps every token has nothing to decide: its predictor is skipped, not run.
                if counts[stage] < tokens.shape[1] - prefix:
                    scores = self.predictors[stage](tokens[:, prefix:])[..., 0]
                    chosen = scores.topk(counts[stage], dim=1).indices.sort(dim=1).values
                    tokens = torch.cat([tokens[:, :prefix], gather_tokens(tokens[:, prefix:], chosen)], dim=1)
                    positions = None if positions is None else positions.gather(1, chosen)
                if positions is not None:
                    kept_patches.append(torch.zeros(batch, num_patches, dtype=torch.bool, device=tokens.device)
                                        .scatter_(1, positions, True))
            tokens = block(tokens)
        logits = self.vit.forward_head(self.vit.norm(tokens))
        macs = torch.full((batch,), self._macs_per_image(num_patches), dtype=torch.float64)
        if not self.explain:
            return Prediction(logits, macs)
        kept_tokens = torch.full((batch,), tokens.shape[1] - prefix, dtype=torch.long)
        return Prediction(logits, macs, {"kept_patches": kept_patches, "kept_tokens": kept_tokens})

    def _macs_per_image(self, num_patches: int) -> float:
        """Blocks at the token counts they really see, plus the prediction modules (same for every image),
        counted once per keep ratio and input size (:meth:`per_budget`)."""
        return self.per_budget("macs", lambda: self._count_macs(num_patches), num_patches)

    def _count_macs(self, num_patches: int) -> float:
        prefix = self.vit.num_prefix_tokens
        patches_per_block, patches = [], num_patches
        predictor_total = 0.0
        counts = self.stage_keep_counts(num_patches)
        for index in range(len(self.vit.blocks)):
            stage = self._stage_before(index)
            if stage is not None and counts[stage] < patches:
                predictor_total += predictor_macs(self.predictors[stage], patches)
                patches = counts[stage]
            patches_per_block.append(patches + prefix)
        return vit_macs(self.vit, patches_per_block) + predictor_total

    def dense_macs(self) -> float:
        """The top of the budget range: every block sees every token and the predictors run (keep ratios just
        under 1; at exactly 1 nothing is pruned, so :meth:`predict` skips the predictors and costs the dense ViT)."""
        return vit_macs(self.vit) + sum(predictor_macs(predictor, self.num_patches) for predictor in self.predictors)

    # ----------------------------------------------------------------- budget knobs
    def get_budget(self) -> dict[str, Any]:
        return {"keep_ratio": self.keep_ratio}

    def budget_space(self) -> dict[str, KnobSpace]:
        return {"keep_ratio": Interval(0.0, 1.0, low_open=True)}

    def set_budget(self, **knobs: Any) -> None:
        self.keep_ratio = self.checked_budget(knobs).get("keep_ratio", self.keep_ratio)

    def paper_budget(self) -> dict[str, Any]:
        """The paper's headline keep ratio, 0.7 (196 -> 137 -> 96 -> 67 patch tokens on DeiT-S)."""
        return {"keep_ratio": 0.7}

    def speed_budgets(self, images: Tensor) -> dict[str, dict[str, Any]]:
        """The paper's keep ratio, and keep ratio 1 (nothing pruned: what the predictors alone cost)."""
        return {"keep 0.7 (paper)": self.paper_budget(), "keep 1.0 (nothing pruned)": {"keep_ratio": 1.0}}

    def budget_sweep(self) -> list[dict[str, Any]]:
        return [{"keep_ratio": ratio} for ratio in _SWEEP_KEEP_RATIOS]


# --------------------------------------------------------------------------------------------- helpers
def _kept_token_mse(student: Tensor, teacher: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error over the channels of the tokens ``keep`` marks (0 when none is kept)."""
    per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0)
