"""AdaViT: per-image choice of patches, attention heads and blocks (Meng et al., "AdaViT: Adaptive Vision
Transformers for Efficient Image Recognition", CVPR 2022).

Every block after the first gets three small decision modules: a head policy and a block policy read the
block's input class token (which heads run; whether attention and MLP run), a patch policy reads each normed
patch token (whether the block computes it; a dropped patch rides the residual and is decided again in the
next block). The class token is always computed.

* Training masks, so shapes stay fixed: hard Gumbel-sigmoid decisions with straight-through gradients gate
  the heads before ``attn.proj`` mixes them (a forward pre-hook, timm's seam), hide dropped patches through
  ``Attention(attn_mask=...)`` and zero the residual updates of dropped patches and skipped sub-blocks.
* Inference (:meth:`AdaViT.predict`) really skips: a sub-block runs only for the images that use it, on their
  kept tokens only, with their kept heads only (qkv and proj sliced to those heads); every image is charged
  the MACs of what ran for it, decision modules included.

See docs/methods/adavit.md for the recipe, the batching strategy and its measurements.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..measure.macs import (attention_macs, block_macs, head_macs, linear_macs, mlp_macs, patch_embed_macs,
                            vit_macs)
from ..models.vit import BackboneSpec, embed_tokens
from .base import Criterion, LossOutput, Prediction, SingleViT, dense_backbone_state
from .budget import Interval, KnobSpace
from .registry import register_method
from .token_reduction import keep_attention_mask

__all__ = ["AdaViT", "AdaViTOutput", "BlockPolicy", "Decisions", "gumbel_sigmoid", "hard_decisions",
           "attention_on_heads", "POLICIES", "ATTENTION_BATCHING"]

#: The three kinds of decision, in the order of every per-policy setting.
POLICIES = ("patch", "head", "block")
#: How :meth:`AdaViT.predict` batches the attention of images with different decisions (docs/methods/adavit.md):
#: ``pad`` groups images by head set and pads to the longest, ``regroup`` groups by head set and token count
#: (no padding), ``per_image`` runs each image alone.
ATTENTION_BATCHING = ("pad", "regroup", "per_image")
#: Published decision thresholds on the sigmoid (training and, by default, inference).
_DEFAULT_THRESHOLDS = {"patch": 0.6, "head": 0.5, "block": 0.5}
#: Before :meth:`AdaViT.calibrate`, the sweep shifts the published thresholds by these amounts.
_SWEEP_SHIFTS = (-0.1, -0.03, 0.0, 0.03, 0.1)
#: After it, the sweep aims every policy at these usages on the held-out split (plus the trained thresholds).
_SWEEP_USAGES = (0.8, 0.65, 0.4, 0.3)


# --------------------------------------------------------------------------------------------- decisions
def _logit(probability: float) -> float:
    """``log(p / (1 - p))``, with -inf at 0 and +inf at 1 (a threshold of 0 keeps all, of 1 keeps none)."""
    if probability <= 0.0:
        return -math.inf
    if probability >= 1.0:
        return math.inf
    return math.log(probability) - math.log1p(-probability)


def gumbel_sigmoid(logits: Tensor, threshold: float, temperature: float, training: bool) -> Tensor:
    """0/1 decisions ``sigmoid((logits + noise) / temperature) > threshold``.

    In training the noise is logistic (the difference of two Gumbel samples) and the hard decision carries
    the soft sigmoid's gradient (straight-through); the forward value is exactly 0 or 1. Without training
    there is no noise: the decision is deterministic.
    """
    logits = logits.float()  # the noise needs float32: in bfloat16, 1 - 1e-6 rounds to 1 and its log1p to -inf
    if not training:
        return hard_decisions(logits, threshold, temperature).to(logits.dtype)
    boundary = _logit(threshold)
    uniform = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
    scaled = (logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature
    soft = torch.sigmoid(scaled)
    return (scaled > boundary).to(logits.dtype) + (soft - soft.detach())


def hard_decisions(logits: Tensor, threshold: float, temperature: float) -> Tensor:
    """Deterministic bool decisions ``sigmoid(logits / temperature) > threshold``, as inference takes them."""
    return logits.float() / temperature > _logit(threshold)


class BlockPolicy(nn.Module):
    """The decision modules of one block; a module is ``None`` when its policy is switched off.

    ``head``: Linear(D, H) and ``block``: Linear(D, 2) (attention, MLP) read the class token entering the
    block; ``patch``: Linear(D, 1) reads each patch token after the block's ``norm1``. Each returns logits.
    """

    def __init__(self, dim: int, num_heads: int, policies: tuple[str, ...]) -> None:
        super().__init__()
        self.patch = nn.Linear(dim, 1) if "patch" in policies else None
        self.head = nn.Linear(dim, num_heads) if "head" in policies else None
        self.block = nn.Linear(dim, 2) if "block" in policies else None

    def modules_by_policy(self) -> dict[str, nn.Linear]:
        return {name: getattr(self, name) for name in POLICIES if getattr(self, name) is not None}

    def macs(self, num_patches: int) -> float:
        """MACs of running every decision module of this block for one image."""
        return sum(linear_macs(layer, num_patches if name == "patch" else 1)
                   for name, layer in self.modules_by_policy().items())


@dataclass
class Decisions:
    """One block's decisions for a batch, 0/1 floats: ``patches`` (B, N), ``heads`` (B, H), ``blocks`` (B, 2).

    A switched-off policy decides all ones.
    """

    patches: Tensor
    heads: Tensor
    blocks: Tensor



@dataclass
class AdaViTOutput:
    """The training forward's logits and, per decided block (1 .. depth-1), its :class:`Decisions`."""

    logits: Tensor
    decisions: list[Decisions] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- timm seams
@contextlib.contextmanager
def _heads_gated(attn: Attention, heads: Tensor) -> Iterator[None]:
    """Scale each head's output by ``heads`` (B, H) before ``attn.proj`` mixes the heads.

    A forward pre-hook on ``proj``: its input is the heads' outputs side by side (B, N, H * head_dim).
    """
    gate = heads.repeat_interleave(attn.head_dim, dim=1).unsqueeze(1)
    handle = attn.proj.register_forward_pre_hook(lambda _, args: (args[0] * gate.to(args[0].dtype),))
    try:
        yield
    finally:
        handle.remove()


def _head_rows(attn: Attention, heads: Tensor) -> Tensor:
    """Indices of the q, k and v rows of ``attn.qkv`` (and of the proj columns, first third) for ``heads``."""
    within = torch.arange(attn.head_dim, device=heads.device)
    columns = (heads[:, None] * attn.head_dim + within).flatten()
    return torch.cat([columns + part * attn.attn_dim for part in range(3)]), columns


def attention_on_heads(attn: Attention, x: Tensor, heads: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """timm's ``Attention`` forward computing only the heads ``heads`` (1-d index): the rest cost nothing.

    The qkv projection is restricted to those heads' rows and the output projection to their columns, so
    with every head this is ``attn(x)`` (a test holds it to timm's output). ``key_valid`` (B, N) bool hides
    padding keys.
    """
    batch, tokens, _ = x.shape
    if len(heads) == attn.num_heads:  # every head (``heads`` is sorted): the weights as they are, no copies
        qkv_weight, bias, proj_weight = attn.qkv.weight, attn.qkv.bias, attn.proj.weight
    else:
        rows, columns = _head_rows(attn, heads)
        qkv_weight, proj_weight = attn.qkv.weight[rows], attn.proj.weight[:, columns]
        bias = attn.qkv.bias[rows] if attn.qkv.bias is not None else None
    qkv = F.linear(x, qkv_weight, bias).reshape(batch, tokens, 3, len(heads), attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, tokens, len(heads) * attn.head_dim)
    return F.linear(out, proj_weight, attn.proj.bias)


# --------------------------------------------------------------------------------------------- the method
@register_method
class AdaViT(SingleViT):
    """A timm ViT that decides, per image and per block, which patches, heads and sub-blocks to run.

    Args:
        backbone: a timm plain ViT with a class token and standard ``Block`` / ``Attention`` modules.
        patch_policy, head_policy, block_policy: which decisions exist (all by default).
        patch_target, head_target, block_target: usage each policy is trained towards (share of patches,
            heads, sub-blocks run in blocks 1 .. depth-1); the training knob.
        patch_weight, head_weight, block_weight: weights of the usage losses (published: 2 each; the patch
            loss is squared, the others absolute).
        temperature: Gumbel-sigmoid temperature (published: 5).
        patch_threshold, head_threshold, block_threshold: decision thresholds on the sigmoid, in [0, 1]
            (published 0.6, 0.5, 0.5); budget knobs, shifted after training to trade accuracy for MACs.
    """

    method_name = "adavit"

    def __init__(self, backbone: BackboneSpec, patch_policy: bool = True, head_policy: bool = True,
                 block_policy: bool = True, patch_target: float = 0.5, head_target: float = 0.5,
                 block_target: float = 0.5, patch_weight: float = 2.0, head_weight: float = 2.0,
                 block_weight: float = 2.0, temperature: float = 5.0,
                 patch_threshold: float = _DEFAULT_THRESHOLDS["patch"],
                 head_threshold: float = _DEFAULT_THRESHOLDS["head"],
                 block_threshold: float = _DEFAULT_THRESHOLDS["block"]) -> None:
        switches = {"patch": patch_policy, "head": head_policy, "block": block_policy}
        targets = {"patch": patch_target, "head": head_target, "block": block_target}
        if not any(switches.values()):
            raise ValueError("AdaViT needs at least one of patch_policy, head_policy, block_policy")
        if not all(0.0 <= target <= 1.0 for target in targets.values()):
            raise ValueError(f"usage targets are shares in [0, 1], got {targets}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(backbone, patch_policy=patch_policy, head_policy=head_policy, block_policy=block_policy,
                         patch_target=patch_target, head_target=head_target, block_target=block_target,
                         patch_weight=patch_weight, head_weight=head_weight, block_weight=block_weight,
                         temperature=temperature, patch_threshold=patch_threshold, head_threshold=head_threshold,
                         block_threshold=block_threshold)
        self.vit = backbone.build()
        _check_backbone(self.vit)
        self.policy_names = tuple(name for name in POLICIES if switches[name])
        self.targets = {name: targets[name] for name in self.policy_names}
        self.loss_weights = {"patch": patch_weight, "head": head_weight, "block": block_weight}
        self.temperature = temperature
        self.thresholds = dict(_DEFAULT_THRESHOLDS)
        self.set_budget(**{f"{name}_threshold": value for name, value in
                           zip(POLICIES, (patch_threshold, head_threshold, block_threshold)) if switches[name]})
        self.policies = nn.ModuleList(BlockPolicy(self.vit.embed_dim, self.num_heads, self.policy_names)
                                      for _ in self.vit.blocks[1:])
        self._init_policies()
        #: How predict batches attention (see ATTENTION_BATCHING); changes speed and padding, not results.
        self.attention_batching = "pad"
        #: Per policy, the sorted decision scores seen by :meth:`calibrate` (held-out split).
        self._held_out_scores: dict[str, Tensor] = {}
        self._score_log: dict[str, list[Tensor]] | None = None

    def _init_policies(self) -> None:
        """Small weights, and a bias at which each policy starts at its usage target under training noise.

        With logistic noise, P(keep) = sigmoid(bias - temperature * logit(threshold)) for a zero input.
        """
        for policy in self.policies:
            for name, layer in policy.modules_by_policy().items():
                trunc_normal_(layer.weight, std=0.02)
                start = self.temperature * _logit(self.thresholds[name]) + _logit(self.targets[name])
                nn.init.constant_(layer.bias, max(-10.0, min(10.0, start)))

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    # ----------------------------------------------------------------- shared pieces of both forwards
    def _decide(self, policy: BlockPolicy, tokens: Tensor, normed: Tensor, skipping: bool = False) -> Decisions:
        """The block's decisions: Gumbel-sigmoid samples in training, thresholded sigmoids otherwise.

        ``skipping`` (:meth:`predict`): bool decisions rather than floats that gate updates, taken in as few
        small kernels as possible, since at batch 1 they are most of what a block costs beyond timm's own.
        """
        batch, prefix = tokens.shape[0], self.vit.num_prefix_tokens
        class_token = tokens[:, 0]
        decided = {}
        for name, layer in policy.modules_by_policy().items():
            logits = layer(normed[:, prefix:]).squeeze(-1) if name == "patch" else layer(class_token)
            if skipping and not self.training:
                decision = hard_decisions(logits, self.thresholds[name], self.temperature)
            else:
                decision = gumbel_sigmoid(logits, self.thresholds[name], self.temperature, self.training)
            decided[name] = decision.bool() if skipping else decision
            if self._score_log is not None:
                self._score_log[name].append(torch.sigmoid(logits / self.temperature).flatten().float().cpu())
        shapes = {"patch": (batch, tokens.shape[1] - prefix), "head": (batch, self.num_heads),
                  "block": (batch, 2)}
        for name in shapes.keys() - decided.keys():  # switched-off policies decide all ones
            decided[name] = tokens.new_ones(shapes[name], dtype=torch.bool if skipping else tokens.dtype)
        return Decisions(decided["patch"], decided["head"], decided["block"])

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> AdaViTOutput:
        """Masked forward: every token flows through every block; skipped work is multiplied by zero.

        Decisions are Gumbel-sigmoid samples in training and the deterministic ones :meth:`predict` takes in
        eval mode, so this path and the skipping one can be compared.
        """
        self.check_images(x)
        tokens = self.vit.blocks[0](embed_tokens(self.vit, x))
        decisions = []
        for policy, block in zip(self.policies, self.vit.blocks[1:]):
            normed = block.norm1(tokens)
            decided = self._decide(policy, tokens, normed)
            tokens = self._masked_block(block, tokens, normed, decided)
            decisions.append(decided)
        logits = self.vit.forward_head(self.vit.norm(tokens))
        return AdaViTOutput(logits, decisions)

    def _masked_block(self, block: Block, tokens: Tensor, normed: Tensor, decided: Decisions) -> Tensor:
        """timm's ``Block.forward`` with each residual update gated per image (sub-block) and per token."""
        keep = torch.cat([decided.patches.new_ones(tokens.shape[0], self.vit.num_prefix_tokens),
                          decided.patches], dim=1)
        mask = keep_attention_mask(keep).to(tokens.dtype) if "patch" in self.policy_names else None
        with _heads_gated(block.attn, decided.heads):
            update = block.drop_path1(block.ls1(block.attn(normed, attn_mask=mask)))
        tokens = tokens + update * (decided.blocks[:, :1] * keep).unsqueeze(-1)
        update = block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
        return tokens + update * (decided.blocks[:, 1:] * keep).unsqueeze(-1)

    def compute_loss(self, output: AdaViTOutput, target: Tensor, criterion: Criterion) -> LossOutput:
        """Task loss + the usage losses: ``w * |usage - target|`` (heads, blocks), ``w * (usage - target)^2``
        (patches); usage is the batch's share of decisions that are "on" over blocks 1 .. depth-1."""
        task = criterion(output.logits, target)
        total, terms = task, {"task": task.item()}
        for name in self.policy_names:
            usage = torch.stack([_decisions_of(decided, name).mean() for decided in output.decisions]).mean()
            gap = usage - self.targets[name]
            loss = gap.pow(2) if name == "patch" else gap.abs()
            total = total + self.loss_weights[name] * loss
            terms[f"{name}_usage"] = usage.item()
        return LossOutput(total, terms)

    def init_from_dense(self, state_dict: dict[str, Tensor]) -> None:
        """Load a ``DenseViT.state_dict()`` into the backbone; the decision modules keep their fresh weights."""
        self.vit.load_state_dict(dense_backbone_state(state_dict))

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        """Skip for real: each sub-block runs for the images that use it, on their kept tokens and heads."""
        self.check_images(x)
        tokens = self.vit.blocks[0](embed_tokens(self.vit, x))
        batch, num_patches = tokens.shape[0], self.num_patches
        shared_macs = self._fixed_macs()  # what every image of the batch runs, summed as a Python float
        full_patches = torch.ones(batch, num_patches, dtype=torch.bool, device=x.device)
        full_heads = torch.ones(batch, self.num_heads, dtype=torch.bool, device=x.device)
        full_blocks = full_heads.new_ones(batch, 2)
        macs = torch.zeros(batch, dtype=torch.float64)  # what each image ran beyond ``shared_macs``
        kept_patches, kept_heads, kept_blocks = [full_patches], [full_heads], [full_blocks]
        for policy, block in zip(self.policies, self.vit.blocks[1:]):
            normed = block.norm1(tokens)
            decided = self._decide(policy, tokens, normed, skipping=True)
            shared_macs += policy.macs(num_patches)
            if _keeps_everything(decided):
                # The whole batch runs the whole block: timm's sub-blocks as they are, without the grouping,
                # gathers and per-image bookkeeping below (at batch 1 those cost ~10% of a DeiT-S block).
                tokens = tokens + block.ls1(block.attn(normed))
                tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
                shared_macs += block_macs(block, num_patches + self.vit.num_prefix_tokens)
                kept_patches.append(full_patches)
                kept_heads.append(full_heads)
                kept_blocks.append(full_blocks)
                continue
            keep = torch.cat([full_patches.new_ones(batch, self.vit.num_prefix_tokens), decided.patches], dim=1)
            heads = decided.heads
            runs_attention, runs_mlp = decided.blocks.unbind(dim=1)
            macs += self._skipping_attention(block, tokens, normed, keep & runs_attention[:, None], heads)
            macs += self._skipping_mlp(block, tokens, keep & runs_mlp[:, None])
            runs_attention = runs_attention & heads.any(dim=1)  # an attention without heads computed nothing
            kept_patches.append(decided.patches & (runs_attention | runs_mlp)[:, None])
            kept_heads.append(heads & runs_attention[:, None])
            kept_blocks.append(torch.stack([runs_attention, runs_mlp], dim=1))
        logits = self.vit.forward_head(self.vit.norm(tokens))
        extras = {"kept_patches": kept_patches, "kept_heads": kept_heads,
                  "kept_blocks": torch.stack(kept_blocks, dim=1)}
        return Prediction(logits, macs + shared_macs, extras)

    def _skipping_attention(self, block: Block, tokens: Tensor, normed: Tensor, keep: Tensor,
                            heads: Tensor) -> Tensor:
        """Add the attention update in place for the (image, token) pairs ``keep`` marks; per-image MACs.

        Images are batched in groups sharing a head set (:attr:`attention_batching`); inside a group each
        image's kept tokens are gathered, in order, and padded to the group's longest (padding keys are
        hidden; the padded rows are computed and charged to their image). Images that keep no head get
        what the masked forward gives them, the output projection's bias: no MACs.
        """
        no_head = keep & ~heads.any(dim=1, keepdim=True)
        if block.attn.proj.bias is not None and no_head.any():
            tokens[no_head] += block.ls1(block.attn.proj.bias).to(tokens.dtype)
        keep = keep & ~no_head
        macs = torch.zeros(tokens.shape[0], dtype=torch.float64)
        for images, head_index in self._attention_groups(keep, heads):
            counts = keep[images].sum(dim=1)
            length = int(counts.max())
            if int(counts.min()) == keep.shape[1]:  # every token of every image in the group: no gather
                whole = len(images) == len(tokens)
                update = attention_on_heads(block.attn, normed if whole else normed[images], head_index, None)
                update = block.ls1(update).to(tokens.dtype)
                if whole:
                    tokens += update
                else:
                    tokens[images] += update
                macs[images.cpu()] += attention_macs(block.attn, length, len(head_index))
                continue
            # Stable sort puts each image's kept tokens first, in their original order.
            order = keep[images].to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :length]
            valid = torch.arange(length, device=tokens.device) < counts[:, None]
            rows = images[:, None].expand_as(order)
            update = attention_on_heads(block.attn, normed[rows, order], head_index,
                                        None if bool(valid.all()) else valid)
            update = block.ls1(update)[valid].to(tokens.dtype)
            tokens.index_put_((rows[valid], order[valid]), update, accumulate=True)
            macs[images.cpu()] += attention_macs(block.attn, length, len(head_index))
        return macs

    def _attention_groups(self, keep: Tensor, heads: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, heads they run) for every batch of images whose attention runs together."""
        images = keep.any(dim=1).nonzero().squeeze(1)
        weights = 2 ** torch.arange(heads.shape[1], device=heads.device)
        key = (heads[images].long() * weights).sum(dim=1)
        if self.attention_batching == "regroup":
            key = key * (keep.shape[1] + 1) + keep[images].sum(dim=1)
        elif self.attention_batching == "per_image":
            key = images
        elif self.attention_batching != "pad":
            raise ValueError(f"attention_batching is one of {ATTENTION_BATCHING}, got {self.attention_batching!r}")
        for value in key.unique():
            group = images[key == value]
            yield group, heads[group[0]].nonzero().squeeze(1)

    @staticmethod
    def _skipping_mlp(block: Block, tokens: Tensor, keep: Tensor) -> Tensor:
        """Add the MLP update in place for the (image, token) pairs ``keep`` marks, all packed in one batch."""
        counts = keep.sum(dim=1).cpu()
        if int(counts.min()) == keep.shape[1]:  # every token of every image: no packing
            tokens += block.ls2(block.mlp(block.norm2(tokens))).to(tokens.dtype)
        else:
            packed = tokens[keep]
            tokens[keep] = (packed + block.ls2(block.mlp(block.norm2(packed)))).to(tokens.dtype)
        return counts.double() * mlp_macs(block.mlp, 1)

    def _fixed_macs(self) -> float:
        """What every image runs: patch embedding, the first block and the head."""
        tokens = self.num_patches + self.vit.num_prefix_tokens
        return patch_embed_macs(self.vit.patch_embed) + block_macs(self.vit.blocks[0], tokens) + head_macs(self.vit)

    def dense_macs(self) -> float:
        """Every patch, head and block run, plus the decision modules: the top of the budget range."""
        return vit_macs(self.vit) + sum(policy.macs(self.num_patches) for policy in self.policies)

    # ----------------------------------------------------------------- budget knobs
    def get_budget(self) -> dict[str, Any]:
        return {f"{name}_threshold": self.thresholds[name] for name in self.policy_names}

    def budget_space(self) -> dict[str, KnobSpace]:
        # A threshold on each policy's decision sigmoid: 0 keeps everything, 1 drops everything it may drop.
        return {f"{name}_threshold": Interval(0.0, 1.0) for name in self.policy_names}

    def set_budget(self, **knobs: Any) -> None:
        for knob, value in self.checked_budget(knobs).items():
            self.thresholds[knob.removesuffix("_threshold")] = value

    def paper_budget(self) -> dict[str, Any]:
        """The published thresholds (0.6 patches, 0.5 heads and blocks), trained towards usage 0.5."""
        return {f"{name}_threshold": _DEFAULT_THRESHOLDS[name] for name in self.policy_names}

    def speed_budgets(self, images: Tensor) -> dict[str, dict[str, Any]]:
        """The paper's usage targets forced on ``images`` (thresholds fitted so each policy keeps 0.5 there:
        untrained policies keep an arbitrary share at the published thresholds), and thresholds 0 (every
        patch, head and block runs: what the decisions alone cost)."""
        fitted = self.calibrate([(chunk, None) for chunk in images.split(64)], usage=0.5)
        return {"usage 0.5 (paper targets)": fitted,
                "thresholds 0 (nothing skipped)": {knob: 0.0 for knob in self.get_budget()}}

    def budget_sweep(self) -> list[dict[str, Any]]:
        """Thresholds from generous (more compute) to aggressive, the published ones among them.

        After :meth:`calibrate`, each point aims every policy at one usage on the held-out split, so the
        points spread whatever the scale of the learned logits; before it, fixed shifts of the published
        thresholds.
        """
        published = {f"{name}_threshold": _DEFAULT_THRESHOLDS[name] for name in self.policy_names}
        if not self._held_out_scores:
            return [{knob: round(min(1.0, max(0.0, value + shift)), 3) for knob, value in published.items()}
                    for shift in _SWEEP_SHIFTS]
        generous, aggressive = _SWEEP_USAGES[:2], _SWEEP_USAGES[2:]
        return ([self._thresholds_for_usage(usage) for usage in generous] + [published]
                + [self._thresholds_for_usage(usage) for usage in aggressive])

    def calibrate(self, loader: Iterable[tuple[Tensor, Tensor]], usage: float | None = None) -> dict[str, Any]:
        """Record every policy's decision scores (``sigmoid(logits / temperature)``) over a held-out split.

        ``usage=``: also set each policy's threshold so that it keeps that share on these images (blocks
        decide on what earlier decisions left them, so the share reached at other thresholds is close, not
        exact). Returns the budget.
        """
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        self._score_log = {name: [] for name in self.policy_names}
        try:
            for images, _ in loader:
                self.predict(images.to(device))
            if not self._score_log[self.policy_names[0]]:
                raise ValueError("the calibration split is empty")
            self._held_out_scores = {name: torch.cat(scores).sort().values for name, scores in self._score_log.items()}
        finally:
            self._score_log = None
            self.train(was_training)
        if usage is not None:
            self.set_budget(**self._thresholds_for_usage(usage))
        return self.get_budget()

    def _thresholds_for_usage(self, usage: float) -> dict[str, float]:
        """Per policy, the held-out score quantile above which a share ``usage`` of its decisions lies."""
        if not 0.0 <= usage <= 1.0:
            raise ValueError(f"usage is a share in [0, 1], got {usage}")
        knobs = {}
        for name, scores in self._held_out_scores.items():
            # A decision is kept iff its score > threshold: put the threshold on the last score to drop.
            dropped = round((1.0 - usage) * len(scores))
            knobs[f"{name}_threshold"] = float(scores[dropped - 1]) if dropped > 0 else 0.0
        return knobs


# --------------------------------------------------------------------------------------------- helpers
def _keeps_everything(decided: Decisions) -> bool:
    """Whether every image of the batch runs every patch, head and sub-block of this block."""
    return all(bool(decisions.all()) for decisions in (decided.blocks, decided.heads, decided.patches))


def _decisions_of(decided: Decisions, name: str) -> Tensor:
    return {"patch": decided.patches, "head": decided.heads, "block": decided.blocks}[name]


def _check_backbone(vit: nn.Module) -> None:
    """Policies read the class token; skipping needs timm's plain ``Block`` and per-head ``Attention``."""
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("AdaViT's head and block policies read the class token: the backbone needs one")
    for block in vit.blocks:
        attn = block.attn
        if type(block) is not Block or type(attn) is not Attention:
            raise ValueError(f"AdaViT supports timm's Block with Attention, got {type(block).__name__} "
                             f"with {type(attn).__name__}")
        if not isinstance(attn.norm, nn.Identity) or attn.gate is not None:
            raise ValueError("AdaViT drops heads before attn.proj: attention output norms and gates mix "
                             "heads and are not supported")
