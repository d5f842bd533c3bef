"""AdaViT: per-image choice of patches, attention heads and blocks (Meng et al., "AdaViT: Adaptive Vision
Transformers for Efficient Image Recognition", CVPR 2022).

As in the released Ada-DeiT-S, every block has a patch policy, which reads each normed patch token and
decides whether the block computes it (a dropped patch rides the residual and is decided again in the next
block); every block after the first also has a head policy and a block policy, which read the block's input
class token and decide which heads run and whether attention and MLP run. A dropped head also drops its
share of the MLP's input channels (``fc1``'s columns ``h*D/H .. (h+1)*D/H``). The class token is always
computed.

* Training masks, so shapes stay fixed: hard Gumbel-sigmoid decisions with straight-through gradients gate
  each head's q, k, v, its ``attn.proj`` columns and its ``fc1`` columns (forward hooks, timm's seams), hide
  dropped patches through ``Attention(attn_mask=...)`` and zero the residual updates of dropped patches and
  skipped sub-blocks.
* Inference (:meth:`AdaViT.predict`) really skips: a sub-block runs only for the images that use it, on their
  kept tokens only, with their kept heads only (qkv, proj and fc1 sliced to those heads); every image is
  charged the MACs of what ran for it, decision modules included. That code lives in
  :mod:`~dyntok.methods.adavit_skipping`, which the ONNX export's runner shares.

See docs/methods/adavit.md for the recipe, the batching strategy and its measurements.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Iterator

import torch
from timm.layers import Attention, Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..measure.macs import head_macs, linear_macs, patch_embed_macs, vit_macs
from ..models.vit import BackboneSpec, embed_tokens
from .adavit_skipping import (ATTENTION_BATCHING, BlockCosts, Decisions, EagerBlock, SkippingPlan, _logit,
                              attention_on_heads, complete_decisions, export_plan, hard_decisions, mlp_channels,
                              mlp_on_channels, policy_logits, run_skipping)
from .base import Criterion, LossOutput, Prediction, SingleViT, dense_backbone_state
from .budget import Interval, KnobSpace
from .export_plan import ExportPlan
from .registry import register_method

__all__ = ["AdaViT", "AdaViTOutput", "BlockPolicy", "Decisions", "gumbel_sigmoid", "hard_decisions",
           "attention_on_heads", "mlp_on_channels", "mlp_channels", "patch_attention_mask", "POLICIES",
           "ATTENTION_BATCHING"]

#: The three kinds of decision, in the order of every per-policy setting.
POLICIES = ("patch", "head", "block")
#: Published decision thresholds on the sigmoid (training and, by default, inference).
_DEFAULT_THRESHOLDS = {"patch": 0.6, "head": 0.5, "block": 0.5}

#: How the decision modules' biases may start (see :class:`AdaViT`).
POLICY_BIASES = ("zero", "target")
#: Before :meth:`AdaViT.calibrate`, the sweep shifts the published thresholds by these amounts.
_SWEEP_SHIFTS = (-0.1, -0.03, 0.0, 0.03, 0.1)
#: After it, the sweep aims every policy at these usages on the held-out split (plus the trained thresholds).
_SWEEP_USAGES = (0.8, 0.65, 0.4, 0.3)
#: Guards the head usage's division when no image of the batch runs any sub-block (the official loss's 1e-6).
_EMPTY_SHARE_EPS = 1e-6


# --------------------------------------------------------------------------------------------- decisions
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


class BlockPolicy(nn.Module):
    """The decision modules of one block; a module is ``None`` when the block does not take that decision.

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
class AdaViTOutput:
    """The training forward's logits and, per block (0 .. depth-1), its :class:`Decisions`."""

    logits: Tensor
    decisions: list[Decisions] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- timm seams
def patch_attention_mask(keep: Tensor) -> Tensor:
    """Additive attention mask (B, 1, N, N) for a (B, N) 0/1 keep mask over all tokens, without gradient.

    The official mask: kept tokens attend to kept tokens only, a dropped token to itself only (so no row is
    ever empty). A dropped token's output is then discarded, but it is what the straight-through gradient of
    its decision sees.
    """
    keep = keep.detach().bool()
    allowed = (keep[:, :, None] & keep[:, None, :]) | torch.eye(keep.shape[1], dtype=torch.bool, device=keep.device)
    return torch.zeros(allowed.shape, device=keep.device).masked_fill_(~allowed, -math.inf).unsqueeze(1)


def _per_channel(gates: Tensor, width: int) -> Tensor:
    """(B, G) gates -> (B, 1, G * width): each gate repeated over its ``width`` consecutive channels."""
    return gates.repeat_interleave(width, dim=1).unsqueeze(1)


@contextlib.contextmanager
def _heads_gated(block: Block, heads: Tensor, gate_mlp: bool) -> Iterator[None]:
    """Multiply everything a head owns by its decision in ``heads`` (B, H), as the released AdaViT does.

    Forward hooks gate the head's q, k and v (``attn.qkv``'s output, so the decision's gradient flows through
    them too), its columns of ``attn.proj`` and, with ``gate_mlp``, its input channels of ``mlp.fc1``
    (:func:`mlp_channels`). They live only for the block's call.
    """
    attn, mlp = block.attn, block.mlp
    head_channels = _per_channel(heads, attn.head_dim)
    qkv_gate = head_channels.repeat(1, 1, 3)  # qkv's output is q, k, v side by side, each (H, head_dim)
    hooks = [attn.qkv.register_forward_hook(lambda _, args, out: out * qkv_gate.to(out.dtype)),
             attn.proj.register_forward_pre_hook(lambda _, args: (args[0] * head_channels.to(args[0].dtype),))]
    if gate_mlp:
        fc1_gate = _per_channel(heads, mlp.fc1.in_features // attn.num_heads)
        hooks.append(mlp.fc1.register_forward_pre_hook(lambda _, args: (args[0] * fc1_gate.to(args[0].dtype),)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


# --------------------------------------------------------------------------------------------- the method
@register_method
class AdaViT(SingleViT):
    """A timm ViT that decides, per image and per block, which patches, heads and sub-blocks to run.

    Args:
        backbone: a timm plain ViT with a class token and standard ``Block`` / ``Attention`` / ``Mlp`` modules.
        patch_policy, head_policy, block_policy: which decisions exist (all by default).
        head_gates_mlp: a dropped head also drops its ``fc1`` input channels in the same block's MLP (the
            released Ada-DeiT-S; False: heads gate the attention only).
        first_block_patch_policy: the patch policy decides in block 0 too (the released configuration; False:
            block 0 runs every patch). Head and block policies decide in blocks 1 .. depth-1, as published.
        patch_target, head_target, block_target: usage each policy is trained towards (share of tokens,
            heads, sub-blocks run where the policy decides); the training knob.
        patch_weight, head_weight, block_weight: weights of the usage losses (published: 2 each; the patch
            loss is squared, the others absolute).
        temperature: Gumbel-sigmoid temperature (published: 5).
        policy_bias: how the decision modules' biases start: ``"zero"`` (the official initialisation, with
            which a policy starts near half the heads and sub-blocks and ~12% of the patches, and long training
            pulls it to its target) or ``"target"`` (each policy starts at its usage target under the training
            noise: what a short fine-tune needs; docs/methods/adavit.md gives the measurement).
        patch_threshold, head_threshold, block_threshold: decision thresholds on the sigmoid, in [0, 1]
            (published 0.6, 0.5, 0.5); budget knobs, shifted after training to trade accuracy for MACs.
    """

    method_name = "adavit"
    #: Checkpoints saved before these options existed ran heads on the attention only and block 0 in full.
    defaults_for_old_configs = {"head_gates_mlp": False, "first_block_patch_policy": False}

    def __init__(self, backbone: BackboneSpec, patch_policy: bool = True, head_policy: bool = True,
                 block_policy: bool = True, head_gates_mlp: bool = True, first_block_patch_policy: bool = True,
                 patch_target: float = 0.5, head_target: float = 0.5,
                 block_target: float = 0.5, patch_weight: float = 2.0, head_weight: float = 2.0,
                 block_weight: float = 2.0, temperature: float = 5.0, policy_bias: str = "zero",
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
        if policy_bias not in POLICY_BIASES:
            raise ValueError(f"policy_bias must be one of {', '.join(POLICY_BIASES)}, got {policy_bias!r}")
        super().__init__(backbone, patch_policy=patch_policy, head_policy=head_policy, block_policy=block_policy,
                         head_gates_mlp=head_gates_mlp, first_block_patch_policy=first_block_patch_policy,
                         patch_target=patch_target, head_target=head_target, block_target=block_target,
                         patch_weight=patch_weight, head_weight=head_weight, block_weight=block_weight,
                         temperature=temperature, policy_bias=policy_bias, patch_threshold=patch_threshold, head_threshold=head_threshold,
                         block_threshold=block_threshold)
        self.vit = backbone.build()
        self.head_gates_mlp = head_gates_mlp and head_policy
        _check_backbone(self.vit, self.head_gates_mlp)
        self.policy_names = tuple(name for name in POLICIES if switches[name])
        self.targets = {name: targets[name] for name in self.policy_names}
        self.loss_weights = {"patch": patch_weight, "head": head_weight, "block": block_weight}
        self.temperature = temperature
        self.thresholds = dict(_DEFAULT_THRESHOLDS)
        self.set_budget(**{f"{name}_threshold": value for name, value in
                           zip(POLICIES, (patch_threshold, head_threshold, block_threshold)) if switches[name]})
        # Block 0's patch policy lives apart from blocks 1 .. depth-1's, so that checkpoints saved before it
        # existed keep their parameter names; with no decision it holds no parameter and block 0 runs in full.
        first_block = ("patch",) if first_block_patch_policy and patch_policy else ()
        self.first_block_policy = BlockPolicy(self.vit.embed_dim, self.num_heads, first_block)
        self.policies = nn.ModuleList(BlockPolicy(self.vit.embed_dim, self.num_heads, self.policy_names)
                                      for _ in self.vit.blocks[1:])
        self._init_policies(policy_bias)
        #: How predict batches attention (see ATTENTION_BATCHING); changes speed and padding, not results.
        self.attention_batching = "pad"
        #: Per policy, the sorted decision scores seen by :meth:`calibrate` (held-out split).
        self._held_out_scores: dict[str, Tensor] = {}
        self._score_log: dict[str, list[Tensor]] | None = None

    def _init_policies(self, bias: str) -> None:
        """Truncated-normal weights (std 0.02), as officially, and zero biases or biases at the usage targets.

        Under the training noise a policy keeps a share ``sigmoid(bias - T * logit(threshold))`` of a zero
        input: with zero biases half the heads and sub-blocks and about 12% of the patches at the patch
        threshold 0.6; with ``"target"`` biases, each policy's target.
        """
        for policy in self.block_policies():
            for name, layer in policy.modules_by_policy().items():
                trunc_normal_(layer.weight, std=0.02)
                start = self.temperature * _logit(self.thresholds[name]) + _logit(self.targets[name])
                nn.init.constant_(layer.bias, 0.0 if bias == "zero" else max(-10.0, min(10.0, start)))

    def block_policies(self) -> list[BlockPolicy]:
        """Each block's decision modules, block 0 first."""
        return [self.first_block_policy, *self.policies]

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    # ----------------------------------------------------------------- shared pieces of both forwards
    def _decide(self, policy: BlockPolicy, tokens: Tensor, normed: Tensor) -> Decisions:
        """The training forward's decisions, 0/1 floats: Gumbel-sigmoid samples in training, the deterministic
        ones :meth:`predict` takes in eval mode."""
        prefix = self.vit.num_prefix_tokens
        decided = {name: gumbel_sigmoid(logits, self.thresholds[name], self.temperature, self.training)
                   for name, logits in policy_logits(policy, tokens, normed, prefix).items()}
        return complete_decisions(decided, tokens.shape[0], tokens.shape[1] - prefix, self.num_heads, tokens,
                                  tokens.dtype)

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> AdaViTOutput:
        """Masked forward: every token flows through every block; skipped work is multiplied by zero.

        Decisions are Gumbel-sigmoid samples in training and the deterministic ones :meth:`predict` takes in
        eval mode, so this path and the skipping one can be compared.
        """
        self.check_images(x)
        tokens = embed_tokens(self.vit, x)
        decisions = []
        for policy, block in zip(self.block_policies(), self.vit.blocks):
            normed = block.norm1(tokens)
            decided = self._decide(policy, tokens, normed)
            tokens = self._masked_block(block, policy, tokens, normed, decided)
            decisions.append(decided)
        logits = self.vit.forward_head(self.vit.norm(tokens))
        return AdaViTOutput(logits, decisions)

    def _masked_block(self, block: Block, policy: BlockPolicy, tokens: Tensor, normed: Tensor,
                      decided: Decisions) -> Tensor:
        """timm's ``Block.forward`` with each residual update gated per image (sub-block) and per token.

        As in the official code, the attention mask of dropped patches passes no gradient (the patch policy
        learns through the gated updates), and a block whose sub-blocks are gated has no drop-path.
        """
        if not policy.modules_by_policy():
            return block(tokens)
        keep = torch.cat([decided.patches.new_ones(tokens.shape[0], self.vit.num_prefix_tokens),
                          decided.patches], dim=1)
        mask = patch_attention_mask(keep).to(tokens.dtype) if policy.patch is not None else None
        gated = policy.block is not None
        drop_path1, drop_path2 = (nn.Identity(), nn.Identity()) if gated else (block.drop_path1, block.drop_path2)
        heads_gated = (_heads_gated(block, decided.heads, self.head_gates_mlp) if policy.head is not None
                       else contextlib.nullcontext())
        with heads_gated:
            update = drop_path1(block.ls1(block.attn(normed, attn_mask=mask)))
            tokens = tokens + update * (decided.blocks[:, :1] * keep).unsqueeze(-1)
            update = drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
        return tokens + update * (decided.blocks[:, 1:] * keep).unsqueeze(-1)

    def compute_loss(self, output: AdaViTOutput, target: Tensor, criterion: Criterion) -> LossOutput:
        """Task loss + the usage losses: ``w * |usage - target|`` (heads, blocks), ``w * (usage - target)^2``
        (patches), each usage a batch mean over the blocks where that policy decides (:meth:`_usage`)."""
        task = criterion(output.logits, target)
        total, terms = task, {"task": task.item()}
        for name in self.policy_names:
            usage = self._usage(name, output.decisions)
            gap = usage - self.targets[name]
            loss = gap.pow(2) if name == "patch" else gap.abs()
            total = total + self.loss_weights[name] * loss
            terms[f"{name}_usage"] = usage.item()
        return LossOutput(total, terms)

    def _usage(self, name: str, decisions: list[Decisions]) -> Tensor:
        """The share of ``name`` decisions that are on, defined as the official loss does.

        Over the images and the blocks where the policy decides. Patches: the class token counts as a kept
        token. Heads: blocks in which an image runs neither attention nor MLP are left out for that image.
        """
        decided = [d for policy, d in zip(self.block_policies(), decisions) if getattr(policy, name) is not None]
        if name == "patch":
            prefix = decided[0].patches.new_ones(decided[0].patches.shape[0], 1)
            return torch.stack([torch.cat([prefix, d.patches], dim=1) for d in decided]).mean()
        if name == "block":
            return torch.stack([d.blocks for d in decided]).mean()
        heads = torch.stack([d.heads for d in decided])  # (blocks, B, H)
        running = (torch.stack([d.blocks for d in decided]).sum(dim=-1, keepdim=True) > 0).expand_as(heads)
        return (heads * running).sum() / (running.sum() + _EMPTY_SHARE_EPS)

    def init_from_dense(self, state_dict: dict[str, Tensor]) -> None:
        """Load a ``DenseViT.state_dict()`` into the backbone; the decision modules keep their fresh weights."""
        self.vit.load_state_dict(dense_backbone_state(state_dict))

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        """Skip for real: each sub-block runs for the images that use it, on their kept tokens and heads
        (:func:`~dyntok.methods.adavit_skipping.run_skipping`, which the ONNX export runs too)."""
        self.check_images(x)
        plan = self.skipping_plan()
        on_logits = self._log_scores if self._score_log is not None else None
        blocks = [EagerBlock(policy, block, costs, self.vit.num_prefix_tokens, on_logits)
                  for policy, block, costs in zip(self.block_policies(), self.vit.blocks, plan.blocks)]
        return run_skipping(x, partial(embed_tokens, self.vit), blocks,
                            lambda tokens: self.vit.forward_head(self.vit.norm(tokens)), plan, self.explain,
                            always_decide=on_logits is not None)

    def skipping_plan(self) -> SkippingPlan:
        """What :meth:`predict`'s skipping needs besides the modules, at the current budget."""
        return SkippingPlan(
            thresholds={name: self.thresholds[name] for name in self.policy_names}, temperature=self.temperature,
            num_prefix_tokens=self.vit.num_prefix_tokens, num_heads=self.num_heads,
            head_gates_mlp=self.head_gates_mlp, attention_batching=self.attention_batching,
            fixed_macs=patch_embed_macs(self.vit.patch_embed) + head_macs(self.vit),
            blocks=self.per_budget("block_costs", self._block_costs))

    def _block_costs(self) -> list[BlockCosts]:
        tokens = self.num_patches + self.vit.num_prefix_tokens
        return [BlockCosts.of(block, policy.macs(self.num_patches), tokens)
                for policy, block in zip(self.block_policies(), self.vit.blocks)]

    def _log_scores(self, logits: dict[str, Tensor]) -> None:
        """Record each decision's score ``sigmoid(logits / temperature)`` for :meth:`calibrate`."""
        for name, values in logits.items():
            self._score_log[name].append(torch.sigmoid(values / self.temperature).flatten().float().cpu())

    def export_plan(self, example_images: Tensor) -> ExportPlan:
        """Per block, its decision modules, its whole block, its attention on given heads and tokens and its
        MLP on given tokens and channels as graphs, run by the same skipping code as :meth:`predict`
        (:mod:`~dyntok.methods.adavit_skipping`); the thresholds stay knobs of the loaded export."""
        return export_plan(self.vit, self.block_policies(), self.skipping_plan(), example_images)

    def dense_macs(self) -> float:
        """Every patch, head and block run, plus the decision modules: the top of the budget range."""
        return vit_macs(self.vit) + sum(policy.macs(self.num_patches) for policy in self.block_policies())

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
        patch, head and block runs; no decision is taken, as none could skip anything: the dense model's cost)."""
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
def _check_backbone(vit: nn.Module, head_gates_mlp: bool) -> None:
    """Policies read the class token; skipping needs timm's plain ``Block`` and per-head ``Attention`` (and
    with ``head_gates_mlp``, timm's ``Mlp`` on an embedding the heads split evenly)."""
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
        if head_gates_mlp and (type(block.mlp) is not Mlp or block.mlp.fc1.in_features % attn.num_heads):
            raise ValueError(f"head_gates_mlp drops each head's share of fc1's input channels: it needs timm's Mlp "
                             f"on an embedding divisible by the {attn.num_heads} heads, got {type(block.mlp).__name__}"
                             f" on {block.mlp.fc1.in_features} channels; pass head_gates_mlp=False")
