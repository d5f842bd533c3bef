"""AdaViT's inference that really skips, over eager modules or over the graphs of its ONNX export.

:func:`run_skipping` is the whole of it: per block, the decisions from the policies' logits, then the
attention batched by head set over each image's kept tokens and the MLP over the kept tokens (and, with
``head_gates_mlp``, only the ``fc1`` columns of each image's kept heads), every image charged the MACs of what
ran for it. It calls a block only through a :class:`SkippingBlock`: :class:`EagerBlock` wraps timm's modules
(:meth:`AdaViT.predict <dyntok.methods.adavit.AdaViT.predict>`), :class:`ExportedBlock` wraps the graphs of
:func:`export_plan` (:func:`run_exported`, the export's runner). Both go through this one function, so an
export groups, gathers and decides exactly like the model.

An export is two graphs for the whole model (``embed``: images to tokens; ``head``: tokens to logits) and four
per block ``k``, each with dynamic axes so that one graph serves every group:

* ``block{k}_decide``: tokens -> ``normed`` (``norm1``) and each policy's logits (thresholds stay outside,
  in the runner, so they are budget knobs of the loaded export);
* ``block{k}_whole``: the plain timm block, for a batch that keeps everything in it;
* ``block{k}_attention``: a group's gathered tokens (batch x tokens dynamic), the padding mask and the
  indices of the heads the group runs (dynamic): q, k, v and the output projection computed for those heads
  only (their rows and columns gathered inside the graph);
* ``block{k}_mlp``: packed kept tokens (dynamic) and the ``fc1`` input channels to read (dynamic, may be
  empty).

``tests/test_adavit.py`` holds the rewritten attention and MLP to timm's own output.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..measure.macs import attention_macs, attention_product_macs, block_macs, linear_macs, mlp_macs
from ..models.vit import embed_tokens
from .base import Prediction
from .export_plan import Axis, ExportPlan, Graph, GraphFn

__all__ = ["ATTENTION_BATCHING", "Decisions", "hard_decisions", "policy_logits", "complete_decisions",
           "attention_on_heads", "mlp_on_channels", "mlp_channels", "BlockCosts", "SkippingPlan", "SkippingBlock",
           "EagerBlock", "ExportedBlock", "run_skipping", "export_plan", "run_exported"]

#: How :func:`run_skipping` batches the attention of images with different decisions (docs/methods/adavit.md):
#: ``pad`` groups images by head set and pads to the longest, ``regroup`` groups by head set and token count
#: (no padding), ``per_image`` runs each image alone.
ATTENTION_BATCHING = ("pad", "regroup", "per_image")
#: Most (image, token) pairs one MLP graph call takes: 4096 images of 4096 tokens.
_MAX_PACKED_TOKENS = 1 << 24
#: The kinds of decision, in the order of every per-policy setting, and the field of :class:`Decisions` each fills.
_DECISION_FIELDS = {"patch": "patches", "head": "heads", "block": "blocks"}


# --------------------------------------------------------------------------------------------- decisions
def _logit(probability: float) -> float:
    """``log(p / (1 - p))``, with -inf at 0 and +inf at 1 (a threshold of 0 keeps all, of 1 keeps none)."""
    if probability <= 0.0:
        return -math.inf
    if probability >= 1.0:
        return math.inf
    return math.log(probability) - math.log1p(-probability)


def hard_decisions(logits: Tensor, threshold: float, temperature: float) -> Tensor:
    """Deterministic bool decisions ``sigmoid(logits / temperature) > threshold``, as inference takes them."""
    return logits.float() / temperature > _logit(threshold)


@dataclass
class Decisions:
    """One block's decisions for a batch: ``patches`` (B, N), ``heads`` (B, H), ``blocks`` (B, 2) (attention,
    MLP); 0/1 floats in training, bools when skipping. A decision the block does not take is all on."""

    patches: Tensor
    heads: Tensor
    blocks: Tensor


def policy_logits(policy: nn.Module, tokens: Tensor, normed: Tensor, num_prefix_tokens: int) -> dict[str, Tensor]:
    """Each decision module's logits (a ``BlockPolicy``): the head and block policies read the class token
    entering the block, the patch policy each patch token after the block's ``norm1`` (``normed``)."""
    class_token = tokens[:, 0]
    return {name: layer(normed[:, num_prefix_tokens:]).squeeze(-1) if name == "patch" else layer(class_token)
            for name, layer in policy.modules_by_policy().items()}


def complete_decisions(decided: Mapping[str, Tensor], batch: int, num_patches: int, num_heads: int,
                       like: Tensor, dtype: torch.dtype) -> Decisions:
    """:class:`Decisions` from those a block takes (by policy name), the others all on (``dtype``)."""
    shapes = {"patch": (batch, num_patches), "head": (batch, num_heads), "block": (batch, 2)}
    return Decisions(**{field: decided[name] if name in decided else like.new_ones(shapes[name], dtype=dtype)
                        for name, field in _DECISION_FIELDS.items()})


def _keeps_everything(decided: Decisions) -> bool:
    """Whether every image of the batch runs every patch, head and sub-block of this block."""
    return all(bool(decisions.all()) for decisions in (decided.blocks, decided.heads, decided.patches))


# --------------------------------------------------------------------------------------- timm forwards on a subset
def _channels_of(heads: Tensor, width: int) -> Tensor:
    """Indices of the channels of ``heads`` (1-d index) when head ``h`` owns channels ``h*width .. (h+1)*width``."""
    return (heads[:, None] * width + torch.arange(width, device=heads.device)).flatten()


def mlp_channels(mlp: Mlp, num_heads: int, heads: Tensor) -> Tensor:
    """The input channels of ``mlp.fc1`` that ``heads`` (1-d index) gate: head ``h`` owns the ``h``-th of
    ``num_heads`` equal consecutive slices of the embedding, the released AdaViT's mapping."""
    return _channels_of(heads, mlp.fc1.in_features // num_heads)


def _head_weights(attn: Attention, heads: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """``attn.qkv``'s weight and bias restricted to the q, k and v rows of ``heads`` (1-d index), and
    ``attn.proj``'s weight to their columns."""
    columns = _channels_of(heads, attn.head_dim)
    rows = torch.cat([columns + part * attn.attn_dim for part in range(3)])
    bias = attn.qkv.bias[rows] if attn.qkv.bias is not None else None
    return attn.qkv.weight[rows], bias, attn.proj.weight[:, columns]


def _attention_with(attn: Attention, x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                    key_valid: Tensor | None) -> Tensor:
    """timm's ``Attention`` forward with the given qkv and proj weights (as many heads as they hold)."""
    batch, tokens, _ = x.shape
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(batch, tokens, 3, -1, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    return F.linear(out.transpose(1, 2).flatten(2), proj_weight, attn.proj.bias)


def attention_on_heads(attn: Attention, x: Tensor, heads: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """timm's ``Attention`` forward computing only the heads ``heads`` (sorted 1-d index): the rest cost nothing.

    The qkv projection is restricted to those heads' rows and the output projection to their columns, so
    with every head this is ``attn(x)`` (a test holds it to timm's output). ``key_valid`` (B, N) bool hides
    padding keys.
    """
    if len(heads) == attn.num_heads:  # every head: the weights as they are, no copies
        return _attention_with(attn, x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, key_valid)
    return _attention_with(attn, x, *_head_weights(attn, heads), key_valid)


def _mlp_after_fc1(mlp: Mlp, hidden: Tensor) -> Tensor:
    return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(hidden)))))


def _fc1_on_channels(mlp: Mlp, x: Tensor, channels: Tensor) -> Tensor:
    return F.linear(x[..., channels], mlp.fc1.weight[:, channels], mlp.fc1.bias)


def mlp_on_channels(mlp: Mlp, x: Tensor, channels: Tensor) -> Tensor:
    """timm's ``Mlp`` forward reading only the input ``channels`` (sorted 1-d index): the others cost nothing.

    ``fc1`` is restricted to those columns, so with every channel this is ``mlp(x)`` (a test holds it to
    timm's output) and with none it is the MLP of ``fc1``'s bias.
    """
    if len(channels) == mlp.fc1.in_features:  # every channel: the weights as they are, no copies
        return _mlp_after_fc1(mlp, mlp.fc1(x))
    return _mlp_after_fc1(mlp, _fc1_on_channels(mlp, x, channels))


def _head_set_key(heads: Tensor) -> Tensor:
    """(B, H) bool -> (B,) long, equal for images that keep the same heads."""
    return (heads.long() * 2 ** torch.arange(heads.shape[1], device=heads.device)).sum(dim=1)


def _whole_block(block: Block, tokens: Tensor, normed: Tensor) -> Tensor:
    """timm's ``Block.forward`` in eval mode, given ``normed = block.norm1(tokens)``."""
    tokens = tokens + block.ls1(block.attn(normed))
    return tokens + block.ls2(block.mlp(block.norm2(tokens)))


# --------------------------------------------------------------------------------------------- what a run needs
@dataclass(frozen=True)
class BlockCosts:
    """MACs of one block's pieces, as plain numbers (an export carries them in its settings).

    Per image: ``decisions`` (the block's decision modules) and ``whole`` (the block on every token). Per
    token: ``attention_linear`` (qkv and proj with every head), ``mlp`` and ``fc1`` (fc1 alone, every input
    channel). Per pair of tokens: ``attention_product`` (``q k^T`` and ``attention v`` with every head).
    """

    decisions: float
    whole: float
    attention_linear: float
    attention_product: float
    mlp: float
    fc1: float
    num_heads: int

    @classmethod
    def of(cls, block: Block, decisions: float, num_tokens: int) -> BlockCosts:
        attn = block.attn
        product = attention_product_macs(1, 1, attn.attn_dim)
        # MACs are whole numbers well below 2**53: the split and its sums are exact.
        return cls(decisions=decisions, whole=block_macs(block, num_tokens),
                   attention_linear=attention_macs(attn, 1) - product, attention_product=product,
                   mlp=mlp_macs(block.mlp, 1), fc1=linear_macs(block.mlp.fc1, 1), num_heads=attn.num_heads)

    def attention(self, tokens: int, heads: int) -> float:
        """MACs of the attention over ``tokens`` tokens running ``heads`` heads (``measure.attention_macs``)."""
        return heads / self.num_heads * (tokens * self.attention_linear + tokens * tokens * self.attention_product)


@dataclass(frozen=True)
class SkippingPlan:
    """Everything :func:`run_skipping` needs besides the blocks' computations, as plain values.

    ``thresholds``: per policy the model has, its threshold on the decision sigmoid; ``fixed_macs``: MACs
    every image runs outside the blocks (patch embedding and classifier); ``blocks``: each block's costs.
    """

    thresholds: dict[str, float]
    temperature: float
    num_prefix_tokens: int
    num_heads: int
    head_gates_mlp: bool
    attention_batching: str
    fixed_macs: float
    blocks: list[BlockCosts]

    @property
    def skips_nothing(self) -> bool:
        """Whether every threshold is 0, where each decision keeps whatever it decides on (a finite score)."""
        return all(threshold <= 0.0 for threshold in self.thresholds.values())

    def settings(self) -> dict[str, Any]:
        """Plain JSON, each threshold as its budget knob ``<policy>_threshold`` (a runtime knob of an export)."""
        values = asdict(self)
        thresholds = values.pop("thresholds")
        return {**{f"{name}_threshold": value for name, value in thresholds.items()}, **values}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> SkippingPlan:
        names = {field.name for field in fields(cls)} - {"thresholds", "blocks"}
        return cls(thresholds={knob.removesuffix("_threshold"): value for knob, value in settings.items()
                               if knob.endswith("_threshold")},
                   blocks=[BlockCosts(**costs) for costs in settings["blocks"]],
                   **{name: settings[name] for name in names})


class SkippingBlock(Protocol):
    """A block as :func:`run_skipping` calls it, whatever runs it (eager modules or exported graphs)."""

    costs: BlockCosts
    #: What the attention adds to the kept tokens of an image that keeps no head: ``ls1(proj.bias)``, or None.
    no_head_update: Tensor | None

    def decide(self, tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``norm1(tokens)`` and each of the block's policies' logits, by policy name."""

    def whole(self, tokens: Tensor, normed: Tensor | None) -> Tensor:
        """The block on every token; ``normed`` is ``norm1(tokens)`` where the caller has it (None: no decision
        was taken)."""

    def attention(self, normed: Tensor, heads: Tensor, key_valid: Tensor | None) -> Tensor:
        """``ls1`` of the attention of ``normed`` (G, L, D) on ``heads`` (1-d index); ``key_valid`` hides padding."""

    def mlp(self, tokens: Tensor, channels: Tensor | None) -> Tensor:
        """``ls2(mlp(norm2(tokens)))`` reading only ``fc1`` input ``channels`` (None: all)."""


# --------------------------------------------------------------------------------------------- the run
def run_skipping(images: Tensor, embed: Callable[[Tensor], Tensor], blocks: Sequence[SkippingBlock],
                 classify: Callable[[Tensor], Tensor], plan: SkippingPlan, explain: bool = True,
                 always_decide: bool = False) -> Prediction:
    """AdaViT's skipping inference: each sub-block runs for the images that use it, on their kept tokens and
    heads; logits, per-image MACs and (``explain``) the decisions (``kept_patches``, ``kept_heads``,
    ``kept_blocks``).

    At thresholds of 0 every finite score is kept, so the decisions could skip nothing and are not taken
    (nor counted): the blocks run as timm's. ``always_decide`` takes them anyway, for whoever records them.
    """
    tokens = embed(images)
    batch, prefix = tokens.shape[0], plan.num_prefix_tokens
    num_patches = tokens.shape[1] - prefix
    # What every image of the batch runs, summed as a Python float; ``macs``: what each ran beyond it.
    shared_macs = plan.fixed_macs
    macs = torch.zeros(batch, dtype=torch.float64)
    full_patches = torch.ones(batch, num_patches, dtype=torch.bool, device=tokens.device)
    full_heads = torch.ones(batch, plan.num_heads, dtype=torch.bool, device=tokens.device)
    full_blocks = full_heads.new_ones(batch, 2)
    kept_patches, kept_heads, kept_blocks = [], [], []
    decides = always_decide or not plan.skips_nothing
    for block in blocks:
        normed = None
        if decides:
            normed, logits = block.decide(tokens)
            decided = complete_decisions({name: hard_decisions(value, plan.thresholds[name], plan.temperature)
                                          for name, value in logits.items()},
                                         batch, num_patches, plan.num_heads, tokens, torch.bool)
            shared_macs += block.costs.decisions
        if not decides or _keeps_everything(decided):
            # The whole batch runs the whole block (it keeps everything, or nothing could be skipped): timm's
            # sub-blocks as they are, without the grouping, gathers and per-image bookkeeping below (at batch 1
            # those cost ~10% of a DeiT-S block).
            tokens = block.whole(tokens, normed)
            shared_macs += block.costs.whole
            if explain:
                kept_patches.append(full_patches)
                kept_heads.append(full_heads)
                kept_blocks.append(full_blocks)
            continue
        keep = torch.cat([full_patches.new_ones(batch, prefix), decided.patches], dim=1)
        heads = decided.heads
        runs_attention, runs_mlp = decided.blocks.unbind(dim=1)
        macs += _skipping_attention(block, tokens, normed, keep & runs_attention[:, None], heads,
                                    plan.attention_batching)
        macs += _skipping_mlp(block, tokens, keep & runs_mlp[:, None], heads, plan)
        if explain:
            runs_attention = runs_attention & heads.any(dim=1)  # an attention without heads computed nothing
            kept_patches.append(decided.patches & (runs_attention | runs_mlp)[:, None])
            kept_heads.append(heads & runs_attention[:, None])
            kept_blocks.append(torch.stack([runs_attention, runs_mlp], dim=1))
    if not explain:
        return Prediction(classify(tokens), macs + shared_macs)
    extras = {"kept_patches": kept_patches, "kept_heads": kept_heads, "kept_blocks": torch.stack(kept_blocks, dim=1)}
    return Prediction(classify(tokens), macs + shared_macs, extras)


def _skipping_attention(block: SkippingBlock, tokens: Tensor, normed: Tensor, keep: Tensor, heads: Tensor,
                        batching: str) -> Tensor:
    """Add the attention update in place for the (image, token) pairs ``keep`` marks; per-image MACs.

    Images are batched in groups sharing a head set (``batching``); inside a group each image's kept tokens
    are gathered, in order, and padded to the group's longest (padding keys are hidden; the padded rows are
    computed and charged to their image). Images that keep no head get what the masked forward gives them,
    the output projection's bias: no MACs.
    """
    no_head = keep & ~heads.any(dim=1, keepdim=True)
    if block.no_head_update is not None and no_head.any():
        tokens[no_head] += block.no_head_update.to(tokens.dtype)
    keep = keep & ~no_head
    macs = torch.zeros(tokens.shape[0], dtype=torch.float64)
    for images, head_index in _attention_groups(keep, heads, batching):
        counts = keep[images].sum(dim=1)
        length = int(counts.max())
        if int(counts.min()) == keep.shape[1]:  # every token of every image in the group: no gather
            whole = len(images) == len(tokens)
            update = block.attention(normed if whole else normed[images], head_index, None).to(tokens.dtype)
            if whole:
                tokens += update
            else:
                tokens[images] += update
            macs[images.cpu()] += block.costs.attention(length, len(head_index))
            continue
        # Stable sort puts each image's kept tokens first, in their original order.
        order = keep[images].to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :length]
        valid = torch.arange(length, device=tokens.device) < counts[:, None]
        rows = images[:, None].expand_as(order)
        update = block.attention(normed[rows, order], head_index, None if bool(valid.all()) else valid)
        tokens.index_put_((rows[valid], order[valid]), update[valid].to(tokens.dtype), accumulate=True)
        macs[images.cpu()] += block.costs.attention(length, len(head_index))
    return macs


def _attention_groups(keep: Tensor, heads: Tensor, batching: str) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, heads they run) for every batch of images whose attention runs together."""
    images = keep.any(dim=1).nonzero().squeeze(1)
    key = _head_set_key(heads[images])
    if batching == "regroup":
        key = key * (keep.shape[1] + 1) + keep[images].sum(dim=1)
    elif batching == "per_image":
        key = images
    elif batching != "pad":
        raise ValueError(f"attention_batching is one of {ATTENTION_BATCHING}, got {batching!r}")
    for value in key.unique():
        group = images[key == value]
        yield group, heads[group[0]].nonzero().squeeze(1)


def _skipping_mlp(block: SkippingBlock, tokens: Tensor, keep: Tensor, heads: Tensor, plan: SkippingPlan) -> Tensor:
    """Add the MLP update in place for the (image, token) pairs ``keep`` marks, all packed in one batch;
    per-image MACs.

    With ``plan.head_gates_mlp``, ``fc1`` reads only the input channels of each image's kept heads: the packed
    tokens go through the MLP in groups sharing a head set.
    """
    counts = keep.sum(dim=1).cpu()
    gated = plan.head_gates_mlp and not bool(heads.all())
    if int(counts.min()) == keep.shape[1] and not gated:  # every token and channel of every image: timm's
        tokens += block.mlp(tokens, None).to(tokens.dtype)
    elif int(counts.max()) > 0:
        packed = tokens[keep]
        update = (_mlp_by_head_set(block, packed, keep.nonzero()[:, 0], heads, plan.num_heads) if gated
                  else block.mlp(packed, None))
        tokens[keep] = (packed + update).to(tokens.dtype)
    # The share of fc1's input channels an image's MLP did not read.
    unread = 1.0 - heads.sum(dim=1).cpu().double() / plan.num_heads if gated else 0.0
    return counts.double() * (block.costs.mlp - unread * block.costs.fc1)


def _mlp_by_head_set(block: SkippingBlock, packed: Tensor, owner: Tensor, heads: Tensor, num_heads: int) -> Tensor:
    """The MLP update of ``packed`` tokens (T, D), token ``t`` of image ``owner[t]``, reading only the ``fc1``
    input channels of that image's kept ``heads`` (B, H): one group of tokens per head set."""
    token_key = _head_set_key(heads)[owner]
    width = packed.shape[-1] // num_heads  # fc1 reads the embedding: head h owns its h-th slice
    out = torch.empty_like(packed)
    for value in token_key.unique():
        rows = (token_key == value).nonzero().squeeze(1)
        channels = _channels_of(heads[owner[rows[0]]].nonzero().squeeze(1), width)
        out[rows] = block.mlp(packed[rows], channels).to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------- eager blocks
class EagerBlock:
    """A timm ``Block`` and its ``BlockPolicy`` as a :class:`SkippingBlock` (``on_logits`` sees each decision's
    logits, for calibration)."""

    def __init__(self, policy: nn.Module, block: Block, costs: BlockCosts, num_prefix_tokens: int,
                 on_logits: Callable[[dict[str, Tensor]], None] | None = None) -> None:
        self.policy, self.block, self.costs = policy, block, costs
        self.num_prefix_tokens, self.on_logits = num_prefix_tokens, on_logits

    @property
    def no_head_update(self) -> Tensor | None:
        bias = self.block.attn.proj.bias
        return None if bias is None else self.block.ls1(bias)

    def decide(self, tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        normed = self.block.norm1(tokens)
        logits = policy_logits(self.policy, tokens, normed, self.num_prefix_tokens)
        if self.on_logits is not None:
            self.on_logits(logits)
        return normed, logits

    def whole(self, tokens: Tensor, normed: Tensor | None) -> Tensor:
        return self.block(tokens) if normed is None else _whole_block(self.block, tokens, normed)

    def attention(self, normed: Tensor, heads: Tensor, key_valid: Tensor | None) -> Tensor:
        return self.block.ls1(attention_on_heads(self.block.attn, normed, heads, key_valid))

    def mlp(self, tokens: Tensor, channels: Tensor | None) -> Tensor:
        normed = self.block.norm2(tokens)
        mlp = self.block.mlp
        return self.block.ls2(mlp(normed) if channels is None else mlp_on_channels(mlp, normed, channels))


# --------------------------------------------------------------------------------------------- export
def export_plan(vit: nn.Module, policies: Sequence[nn.Module], plan: SkippingPlan, example_images: Tensor
                ) -> ExportPlan:
    """The graphs of the module docstring for ``vit`` with each block's ``BlockPolicy``; the runner
    (:func:`run_exported`) reads ``plan`` from the settings, its thresholds as runtime knobs."""
    prefix = plan.num_prefix_tokens
    by_heads = "head" in plan.thresholds and plan.num_heads > 1  # else every attention runs every head
    graphs = {}
    with torch.no_grad():
        tokens = _EmbedGraph(vit)(example_images)
        graphs["embed"] = Graph(_EmbedGraph(vit), (example_images,), ("images",), ("tokens",))
        for k, (policy, block) in enumerate(zip(policies, vit.blocks)):
            decide = _DecideGraph(policy, block, prefix)
            normed = decide(tokens)[0]
            graphs[f"block{k}_decide"] = Graph(decide, (tokens,), ("tokens",), decide.output_names)
            graphs[f"block{k}_whole"] = Graph(block, (tokens,), ("tokens",), ("updated",))
            graphs[f"block{k}_attention"] = _attention_graph(block, normed, by_heads, plan.num_heads)
            graphs[f"block{k}_mlp"] = _mlp_graph(block, tokens.flatten(0, 1), plan.head_gates_mlp)
            tokens = _whole_block(block, tokens, normed)
        graphs["head"] = Graph(_HeadGraph(vit), (tokens,), ("tokens",), ("logits",))
    no_head_updates = [None if (bias := block.attn.proj.bias) is None else block.ls1(bias).tolist()
                       for block in vit.blocks]
    settings = {**plan.settings(), "no_head_updates": no_head_updates}
    knobs = tuple(f"{name}_threshold" for name in plan.thresholds)
    return ExportPlan(graphs, "dyntok.methods.adavit_skipping:run_exported", settings, runtime_knobs=knobs)


def run_exported(graphs: Mapping[str, GraphFn], settings: dict[str, Any], images: Tensor) -> Prediction:
    """The runner of :func:`export_plan`: :func:`run_skipping` over the exported graphs."""
    plan = SkippingPlan.from_settings(settings)
    blocks = [ExportedBlock(graphs, k, costs, update)
              for k, (costs, update) in enumerate(zip(plan.blocks, settings["no_head_updates"]))]
    return run_skipping(images, lambda batch: graphs["embed"](images=batch)["tokens"], blocks,
                        lambda tokens: graphs["head"](tokens=tokens)["logits"], plan)


class ExportedBlock:
    """Block ``k``'s exported graphs as a :class:`SkippingBlock` (each graph takes the inputs it declares)."""

    def __init__(self, graphs: Mapping[str, GraphFn], k: int, costs: BlockCosts,
                 no_head_update: list[float] | None) -> None:
        self.graphs = {part: graphs[f"block{k}_{part}"] for part in ("decide", "whole", "attention", "mlp")}
        self.costs = costs
        self.no_head_update = None if no_head_update is None else torch.tensor(no_head_update)

    def decide(self, tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        outputs = self.graphs["decide"](tokens=tokens)
        return outputs["normed"], {name.removesuffix("_logits"): value for name, value in outputs.items()
                                   if name.endswith("_logits")}

    def whole(self, tokens: Tensor, normed: Tensor | None) -> Tensor:
        return self.graphs["whole"](tokens=tokens)["updated"]  # the graph is timm's block: it norms itself

    def attention(self, normed: Tensor, heads: Tensor, key_valid: Tensor | None) -> Tensor:
        if key_valid is None:
            key_valid = torch.ones(normed.shape[:2], dtype=torch.bool)
        return self.graphs["attention"](normed=normed, key_valid=key_valid, heads=heads)["update"]

    def mlp(self, tokens: Tensor, channels: Tensor | None) -> Tensor:
        dim = tokens.shape[-1]
        channels = torch.arange(dim) if channels is None else channels
        update = self.graphs["mlp"](tokens=tokens.reshape(-1, dim), channels=channels)["update"]
        return update.reshape(tokens.shape)


class _EmbedGraph(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: Tensor) -> Tensor:
        return embed_tokens(self.vit, images)


class _HeadGraph(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, tokens: Tensor) -> Tensor:
        return self.vit.forward_head(self.vit.norm(tokens))


class _DecideGraph(nn.Module):
    """``norm1`` and the policies' logits (:meth:`EagerBlock.decide`), outputs named ``normed``, ``<policy>_logits``."""

    def __init__(self, policy: nn.Module, block: Block, num_prefix_tokens: int) -> None:
        super().__init__()
        self.policy, self.norm1, self.num_prefix_tokens = policy, block.norm1, num_prefix_tokens
        self.output_names = ("normed", *(f"{name}_logits" for name in policy.modules_by_policy()))

    def forward(self, tokens: Tensor) -> tuple[Tensor, ...]:
        normed = self.norm1(tokens)
        return normed, *policy_logits(self.policy, tokens, normed, self.num_prefix_tokens).values()



class _AttentionGraph(nn.Module):
    """:meth:`EagerBlock.attention` with the heads' weights always gathered (no branch on their count)."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(self, normed: Tensor, key_valid: Tensor, heads: Tensor | None = None) -> Tensor:
        attn = self.block.attn
        weights = (attn.qkv.weight, attn.qkv.bias, attn.proj.weight) if heads is None else _head_weights(attn, heads)
        return self.block.ls1(_attention_with(attn, normed, *weights, key_valid))


class _MlpGraph(nn.Module):
    """:meth:`EagerBlock.mlp` with ``fc1``'s columns always gathered (no branch on their count)."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(self, tokens: Tensor, channels: Tensor | None = None) -> Tensor:
        mlp, normed = self.block.mlp, self.block.norm2(tokens)
        hidden = mlp.fc1(normed) if channels is None else _fc1_on_channels(mlp, normed, channels)
        return self.block.ls2(_mlp_after_fc1(mlp, hidden))


def _attention_graph(block: Block, normed: Tensor, by_heads: bool, num_heads: int) -> Graph:
    """Batch and token axes dynamic (the padding mask's too), and the head index's length when ``by_heads``."""
    batch, tokens = Axis("batch"), Axis("tokens", max=normed.shape[1])
    inputs = (normed, torch.ones(normed.shape[:2], dtype=torch.bool))
    axes = ({0: batch, 1: tokens}, {0: batch, 1: tokens})
    if by_heads:
        inputs, axes = inputs + (torch.arange(num_heads),), axes + ({0: Axis("heads", max=num_heads)},)
    names = ("normed", "key_valid", "heads")[:len(inputs)]
    return Graph(_AttentionGraph(block), inputs, names, ("update",), axes)


def _mlp_graph(block: Block, packed: Tensor, by_channels: bool) -> Graph:
    """Packed tokens on a dynamic axis, and the channel index's length (0 to all) when ``by_channels``."""
    dim = packed.shape[-1]
    inputs, axes = (packed,), ({0: Axis("tokens", max=_MAX_PACKED_TOKENS)},)
    if by_channels:
        inputs, axes = inputs + (torch.arange(dim),), axes + ({0: Axis("channels", min=0, max=dim)},)
    return Graph(_MlpGraph(block), inputs, ("tokens", "channels")[:len(inputs)], ("update",), axes)
