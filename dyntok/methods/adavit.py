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
  charged the MACs of what ran for it, decision modules included.

See docs/methods/adavit.md for the recipe, the batching strategy and its measurements.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..measure.macs import attention_macs, block_macs, head_macs, linear_macs, mlp_macs, patch_embed_macs, vit_macs
from ..models.vit import BackboneSpec, embed_tokens
from .base import Criterion, LossOutput, Prediction, SingleViT, dense_backbone_state
from .budget import Interval, KnobSpace
from .registry import register_method
from .token_reduction import keep_attention_mask

__all__ = ["AdaViT", "AdaViTOutput", "BlockPolicy", "Decisions", "gumbel_sigmoid", "hard_decisions",
           "attention_on_heads", "mlp_on_channels", "patch_attention_mask", "POLICIES", "ATTENTION_BATCHING"]

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
#: Guards the head usage's division when no image of the batch runs any sub-block (the official loss's 1e-6).
_EMPTY_SHARE_EPS = 1e-6


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
class Decisions:
    """One block's decisions for a batch, 0/1 floats: ``patches`` (B, N), ``heads`` (B, H), ``blocks`` (B, 2).

    A decision the block does not take is all ones.
    """

    patches: Tensor
    heads: Tensor
    blocks: Tensor



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


def _channels_of(heads: Tensor, width: int) -> Tensor:
    """Indices of the channels of ``heads`` (1-d index) when head ``h`` owns channels ``h*width .. (h+1)*width``."""
    return (heads[:, None] * width + torch.arange(width, device=heads.device)).flatten()


def mlp_channels(mlp: Mlp, num_heads: int, heads: Tensor) -> Tensor:
    """The input channels of ``mlp.fc1`` that ``heads`` (1-d index) gate: head ``h`` owns the ``h``-th of
    ``num_heads`` equal consecutive slices of the embedding, the released AdaViT's mapping."""
    return _channels_of(heads, mlp.fc1.in_features // num_heads)


def _head_rows(attn: Attention, heads: Tensor) -> Tensor:
    """Indices of the q, k and v rows of ``attn.qkv`` (and of the proj columns, first third) for ``heads``."""
    columns = _channels_of(heads, attn.head_dim)
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


def mlp_on_channels(mlp: Mlp, x: Tensor, channels: Tensor) -> Tensor:
    """timm's ``Mlp`` forward reading only the input ``channels`` (sorted 1-d index): the others cost nothing.

    ``fc1`` is restricted to those columns, so with every channel this is ``mlp(x)`` (a test holds it to
    timm's output) and with none it is the MLP of ``fc1``'s bias.
    """
    if len(channels) == mlp.fc1.in_features:  # every channel: the weights as they are, no copies
        hidden = mlp.fc1(x)
    else:
        hidden = F.linear(x[..., channels], mlp.fc1.weight[:, channels], mlp.fc1.bias)
    return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(hidden)))))


def _head_set_key(heads: Tensor) -> Tensor:
    """(B, H) bool -> (B,) long, equal for images that keep the same heads."""
    return (heads.long() * 2 ** torch.arange(heads.shape[1], device=heads.device)).sum(dim=1)


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
                         head_gates_mlp=head_gates_mlp, first_block_patch_policy=first_block_patch_policy,
                         patch_target=patch_target, head_target=head_target, block_target=block_target,
                         patch_weight=patch_weight, head_weight=head_weight, block_weight=block_weight,
                         temperature=temperature, patch_threshold=patch_threshold, head_threshold=head_threshold,
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
        self._init_policies()
        #: How predict batches attention (see ATTENTION_BATCHING); changes speed and padding, not results.
        self.attention_batching = "pad"
        #: Per policy, the sorted decision scores seen by :meth:`calibrate` (held-out split).
        self._held_out_scores: dict[str, Tensor] = {}
        self._score_log: dict[str, list[Tensor]] | None = None

    def _init_policies(self) -> None:
        """The official initialisation: truncated-normal weights (std 0.02) and zero biases.

        Under the training noise a policy then starts by keeping a share ``sigmoid(-T * logit(threshold))``:
        half the heads and sub-blocks, about 12% of the patches at the patch threshold 0.6.
        """
        for policy in self.block_policies():
            for layer in policy.modules_by_policy().values():
                trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def block_policies(self) -> list[BlockPolicy]:
        """Each block's decision modules, block 0 first."""
        return [self.first_block_policy, *self.policies]

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
        """Skip for real: each sub-block runs for the images that use it, on their kept tokens and heads."""
        self.check_images(x)
        tokens = embed_tokens(self.vit, x)
        batch, num_patches = tokens.shape[0], self.num_patches
        # What every image of the batch runs, summed as a Python float: patch embedding and head to start.
        shared_macs = patch_embed_macs(self.vit.patch_embed) + head_macs(self.vit)
        full_patches = torch.ones(batch, num_patches, dtype=torch.bool, device=x.device)
        full_heads = torch.ones(batch, self.num_heads, dtype=torch.bool, device=x.device)
        full_blocks = full_heads.new_ones(batch, 2)
        macs = torch.zeros(batch, dtype=torch.float64)  # what each image ran beyond ``shared_macs``
        kept_patches, kept_heads, kept_blocks = [], [], []
        for policy, block in zip(self.block_policies(), self.vit.blocks):
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
            macs += self._skipping_mlp(block, tokens, keep & runs_mlp[:, None], heads)
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
        key = _head_set_key(heads[images])
        if self.attention_batching == "regroup":
            key = key * (keep.shape[1] + 1) + keep[images].sum(dim=1)
        elif self.attention_batching == "per_image":
            key = images
        elif self.attention_batching != "pad":
            raise ValueError(f"attention_batching is one of {ATTENTION_BATCHING}, got {self.attention_batching!r}")
        for value in key.unique():
            group = images[key == value]
            yield group, heads[group[0]].nonzero().squeeze(1)

    def _skipping_mlp(self, block: Block, tokens: Tensor, keep: Tensor, heads: Tensor) -> Tensor:
        """Add the MLP update in place for the (image, token) pairs ``keep`` marks, all packed in one batch;
        per-image MACs.

        With :attr:`head_gates_mlp`, ``fc1`` reads only the input channels of each image's kept heads: the
        packed tokens go through it in groups sharing a head set, and on together from its output.
        """
        counts = keep.sum(dim=1).cpu()
        gated = self.head_gates_mlp and not bool(heads.all())
        if int(counts.min()) == keep.shape[1] and not gated:  # every token and channel of every image: timm's
            tokens += block.ls2(block.mlp(block.norm2(tokens))).to(tokens.dtype)
        else:
            packed = tokens[keep]
            normed = block.norm2(packed)
            update = (self._mlp_by_head_set(block.mlp, normed, keep.nonzero()[:, 0], heads) if gated
                      else block.mlp(normed))
            tokens[keep] = (packed + block.ls2(update)).to(tokens.dtype)
        # The share of fc1's input channels an image's MLP did not read.
        unread = 1.0 - heads.sum(dim=1).cpu().double() / self.num_heads if gated else 0.0
        return counts.double() * (mlp_macs(block.mlp, 1) - unread * linear_macs(block.mlp.fc1, 1))

    def _mlp_by_head_set(self, mlp: Mlp, packed: Tensor, owner: Tensor, heads: Tensor) -> Tensor:
        """The MLP of ``packed`` tokens (T, D), token ``t`` of image ``owner[t]``, reading only the ``fc1``
        input channels of that image's kept ``heads`` (B, H): one group of tokens per head set."""
        token_key = _head_set_key(heads)[owner]
        out = torch.empty_like(packed)
        for value in token_key.unique():
            rows = (token_key == value).nonzero().squeeze(1)
            channels = mlp_channels(mlp, self.num_heads, heads[owner[rows[0]]].nonzero().squeeze(1))
            out[rows] = mlp_on_channels(mlp, packed[rows], channels).to(out.dtype)
        return out

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
