"""DVT: a cascade of ViTs over ever finer token grids that stops as soon as it is confident.

Wang et al., "Not All Images are Worth 16x16 Words: Dynamic Transformers for Efficient Image Recognition",
NeurIPS 2021. Stage k is a timm ViT on a g_k x g_k token grid (coarse first); an image leaves after the first
stage whose softmax confidence reaches that stage's threshold. Later stages reuse the previous stage's final
features and attention logits (see :mod:`.dvt_reuse`).

Unlike the published code, which runs every stage and simulates the exits, :meth:`DVT.predict` really stops:
only the images still undecided (and their reuse tensors) go on to the next stage, and each image is charged
the MACs of the stages it ran. See docs/methods/dvt.md.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..measure.macs import vit_macs
from ..models.vit import BackboneSpec
from .base import AdaptiveViT, Criterion, LossOutput, Prediction
from .budget import Choice, Interval, KnobSpace
from .dvt_reuse import (RESAMPLING_MODES, FeatureReuse, RelationReuse, block_forward, check_block_supported,
                        widen_mlp_input)
from .export_plan import ExportPlan, Graph, GraphFn
from .registry import register_method
from .token_reduction import default_grids

__all__ = ["DVT", "DVTStage", "StageMemory", "default_grids", "default_reuse_widths", "stage_geometry",
           "geometric_exit_proportions",
           "thresholds_for_proportions", "exit_stages", "NEVER_EXIT", "SWEEP_Q"]

#: A threshold above any softmax probability: no image leaves at that stage.
NEVER_EXIT = 2.0
#: The q of the geometric exit proportions that :meth:`DVT.budget_sweep` visits (the paper sweeps 0.05-2.95).
SWEEP_Q = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


# --------------------------------------------------------------------------------------------- geometry
def default_reuse_widths(dim: int) -> tuple[int, int]:
    """(hidden, out) widths of the feature-reuse MLPs for a backbone of width ``dim``: ``D/3`` and ``D/8``.

    The published 128 and 48 were chosen for D = 384 (T2T-ViT-14, DeiT-S), where the reused features widen
    every ``fc1`` by 12.5%; kept fixed on a narrow backbone they would widen it by 50% at D = 96. Scaling
    keeps the published proportions at any width, and gives exactly 128 and 48 at D = 384.
    """
    return max(1, round(dim / 3)), max(1, round(dim / 8))


def stage_geometry(image_side: int, grid: int, padded: bool = False) -> tuple[int, int]:
    """(patch size, input side) of a stage: patch ``round(S / g)`` (at least 1), input side ``g * patch``.

    32px and grids 4, 6, 8 -> patch 8 on 32px, 5 on 30px, 4 on 32px; 224px and grids 7, 10, 14 -> 32 on 224px,
    22 on 220px, 16 on 224px. The image is resized to the input side when that differs from ``S``.

    ``padded``: patch ``ceil(S / g)`` instead, on the image zero-padded to ``g * patch`` (the published DeiT
    model's middle stage: a 23 x 23 kernel with padding 3 for 10 x 10 tokens on 224px).
    """
    patch = max(1, math.ceil(image_side / grid) if padded else round(image_side / grid))
    return patch, grid * patch


# --------------------------------------------------------------------------------------------- thresholds
def geometric_exit_proportions(q: float, stages: int) -> list[float]:
    """The published budget rule: the share of images leaving at stage k is proportional to q^k."""
    if not q > 0:
        raise ValueError(f"q must be positive, got {q}")
    weights = [q ** k for k in range(1, stages + 1)]
    return [weight / sum(weights) for weight in weights]


def thresholds_for_proportions(confidences: Tensor, proportions: Sequence[float]) -> list[float]:
    """Thresholds under which the given shares of these samples leave at each stage.

    ``confidences`` is (N, K): column k holds each sample's max softmax probability at exit k. Thresholds are
    picked stage by stage among the samples still remaining, aiming at the cumulative share that should have
    left by then (so ties that let a few too many leave early are made up at the next stage). A stage nobody
    should leave at gets :data:`NEVER_EXIT`. Returns K-1 floats (the last stage takes everything left).
    """
    samples, stages = confidences.shape
    shares = torch.as_tensor(proportions, dtype=torch.float64)
    if shares.shape != (stages,) or (shares < 0).any() or not shares.sum() > 0:
        raise ValueError(f"need {stages} non-negative proportions with a positive sum, got {list(proportions)}")
    wanted_by_stage = (shares / shares.sum()).cumsum(0).mul(samples).round().long().tolist()
    remaining = torch.ones(samples, dtype=torch.bool)
    thresholds: list[float] = []
    for stage in range(stages - 1):
        wanted = wanted_by_stage[stage] - (samples - int(remaining.sum()))
        candidates = confidences[remaining, stage].sort(descending=True).values
        if wanted <= 0 or len(candidates) == 0:
            threshold = NEVER_EXIT
        else:
            threshold = candidates[min(wanted, len(candidates)) - 1].item()
        remaining &= confidences[:, stage] < threshold
        thresholds.append(threshold)
    return thresholds


def exit_stages(confidences: Tensor, thresholds: Sequence[float]) -> Tensor:
    """The stage each sample leaves at (0-based): the first whose confidence reaches its threshold, else the last."""
    limits = torch.tensor(list(thresholds), dtype=confidences.dtype, device=confidences.device)
    leaves = confidences[:, :-1] >= limits
    leaves = torch.cat([leaves, leaves.new_ones(len(leaves), 1)], dim=1)
    return leaves.int().argmax(dim=1)


# --------------------------------------------------------------------------------------------- stages
@dataclass
class StageMemory:
    """What a stage hands to the next: its final tokens (before the norm) and, when the next stage reuses
    relations, the pre-softmax attention logits of all its layers, (B, L*H, N, N)."""

    tokens: Tensor | None
    relations: Tensor | None = None

    def select(self, keep: Tensor) -> StageMemory:
        """The memory of the images in ``keep`` (a bool mask or indices over the batch)."""
        return StageMemory(*(None if part is None else part[keep] for part in (self.tokens, self.relations)))

    def feeds(self, images: Tensor) -> dict[str, Tensor]:
        """The next stage's inputs by name, as an exported stage takes them (:class:`StageGraph`)."""
        parts = {"images": images, "tokens": self.tokens, "relations": self.relations}
        return {name: part for name, part in parts.items() if part is not None}


class DVTStage(nn.Module):
    """One exit of the cascade: a timm ViT at its own token grid, and the modules reusing the previous stage."""

    def __init__(self, vit: VisionTransformer, grid: int, padded: bool = False) -> None:
        super().__init__()
        for block in vit.blocks:
            check_block_supported(block)
        if not isinstance(vit.patch_drop, nn.Identity) or vit.dynamic_img_size:
            raise ValueError("DVT stages need a fixed token grid: no patch dropout, no dynamic_img_size")
        self.vit, self.grid = vit, grid
        self.side = vit.patch_embed.img_size[0]
        #: Whether a smaller image is zero-padded to ``side`` (centred) rather than resized.
        self.padded = padded
        self.feature_reuse: nn.ModuleList | None = None
        self.relation_reuse: RelationReuse | None = None
        #: Whether the next stage reuses this stage's attention logits (then they must be materialised).
        self.exports_relations = False

    def add_feature_reuse(self, previous: DVTStage, hidden_dim: int, out_dim: int, resampling: str = "bilinear",
                          class_fill: str = "mean") -> None:
        """One :class:`FeatureReuse` per block; every block's MLP input grows by ``out_dim``."""
        self.feature_reuse = nn.ModuleList(
            FeatureReuse(previous.vit.embed_dim, hidden_dim, out_dim, previous.grid, self.grid,
                         self.vit.num_prefix_tokens, eps=block.norm2.eps, resampling=resampling, class_fill=class_fill)
            for block in self.vit.blocks)
        for block in self.vit.blocks:
            widen_mlp_input(block, out_dim)

    def add_relation_reuse(self, previous: DVTStage, resampling: str = "bilinear") -> None:
        """Bias every layer's attention logits with the previous stage's (which then exports them)."""
        if previous.attention_maps != self.attention_maps:
            raise ValueError(f"relation reuse maps layer l, head h of one stage to layer l, head h of the next: "
                             f"need the same depth x heads, got {previous.attention_maps} and {self.attention_maps}")
        self.relation_reuse = RelationReuse(self.attention_maps, previous.grid, self.grid, self.vit.num_prefix_tokens,
                                            resampling=resampling)
        previous.exports_relations = True

    @property
    def attention_maps(self) -> int:
        """Attention maps per image over all layers: depth x heads."""
        return sum(block.attn.num_heads for block in self.vit.blocks)

    def forward(self, images: Tensor, memory: StageMemory | None = None) -> tuple[Tensor, StageMemory]:
        """Logits of this exit and the memory for the next stage. ``memory`` is required when reusing."""
        if memory is None and (self.feature_reuse is not None or self.relation_reuse is not None):
            raise ValueError("this stage reuses the previous stage: pass that stage's memory")
        vit = self.vit
        x = vit.patch_embed(self._resize(images))
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        biases = self._relation_biases(memory)
        reused_features = self._reused_features(memory)
        relations = []
        for index, block in enumerate(vit.blocks):
            x, logits = block_forward(block, x, biases[index], reused_features[index],
                                      return_logits=self.exports_relations)
            if logits is not None:
                relations.append(logits)
        memory = StageMemory(x, torch.cat(relations, dim=1) if relations else None)
        return vit.forward_head(vit.norm(x)), memory

    def _resize(self, images: Tensor) -> Tensor:
        if images.shape[-2:] == (self.side, self.side):
            return images
        if self.padded:
            before = (self.side - images.shape[-1]) // 2
            after = self.side - images.shape[-1] - before
            return F.pad(images, (before, after, before, after))
        return F.interpolate(images, size=(self.side, self.side), mode="bilinear", align_corners=False,
                             antialias=True)

    def _reused_features(self, memory: StageMemory | None) -> Sequence[Tensor | None]:
        """Every block's reused features: each block's MLP on the coarse grid, then one resampling for all of
        them (they depend on the previous stage only, and the resampling treats each channel on its own)."""
        if self.feature_reuse is None:
            return [None] * len(self.vit.blocks)
        coarse = [module.coarse(memory.tokens) for module in self.feature_reuse]
        return self.feature_reuse[0].to_grid(torch.cat(coarse, dim=-1)).split(
            [features.shape[-1] for features in coarse], dim=-1)

    def _relation_biases(self, memory: StageMemory | None) -> Sequence[Tensor | None]:
        if self.relation_reuse is None:
            return [None] * len(self.vit.blocks)
        if memory.relations is None:
            raise ValueError("this stage reuses relations, but the previous stage did not export its attention")
        return self.relation_reuse(memory.relations).chunk(len(self.vit.blocks), dim=1)

    def macs(self) -> float:
        """MACs per image of running this stage, its reuse modules included.

        ``vit_macs`` counts the widened ``fc1`` (D + reuse inputs) of every block as it is.
        """
        macs = vit_macs(self.vit)
        if self.feature_reuse is not None:
            macs += sum(module.macs() for module in self.feature_reuse)
        if self.relation_reuse is not None:
            macs += self.relation_reuse.macs()
        return macs


# --------------------------------------------------------------------------------------------- the method
@register_method
class DVT(AdaptiveViT):
    """Dynamic Vision Transformer: K stages of the backbone on ever finer grids, with early exit.

    Args:
        backbone: the backbone every stage is built from (each with its own weights).
        grids: token grid side of each stage, coarse to fine; default :func:`default_grids` of the backbone.
        feature_reuse: feed the previous stage's final tokens to every block's MLP.
        relation_reuse: add the previous stage's attention logits to every layer's logits.
        reuse_hidden: hidden width of the feature-reuse MLPs; default :func:`default_reuse_widths` (D/3), the
            published 128 at D = 384.
        reuse_dim: features each block's MLP input gains; default D/8, the published 48 at D = 384.
        padded_patches: stages whose grid does not divide the image side take the image zero-padded under a
            ``ceil(S / g)`` patch kernel instead of resized under a ``round(S / g)`` one (see
            :func:`stage_geometry`); the published DeiT model's middle stage.
        reuse_resampling: how reused features and relations reach the finer grid, one of
            :data:`~.dvt_reuse.RESAMPLING_MODES`: ``"bilinear"`` or the published ``"nearest-avgpool"``.
        reuse_class_fill: what reused features give the class position: the mean of the patches' (``"mean"``)
            or the published ``"zeros"``.

    The last three reproduce the published DeiT-S model (``dyntok convert --from dvt``); dyntok's defaults
    are the smoother choices, and the ones its benchmark trains with.

    Budget knob: ``thresholds``, one per stage but the last; fit them with :meth:`calibrate`.
    """

    method_name = "dvt"

    def __init__(self, backbone: BackboneSpec, grids: Sequence[int] | None = None, feature_reuse: bool = True,
                 relation_reuse: bool = True, reuse_hidden: int | None = None, reuse_dim: int | None = None,
                 padded_patches: bool = False, reuse_resampling: str = "bilinear",
                 reuse_class_fill: str = "mean") -> None:
        grids = None if grids is None else [int(grid) for grid in grids]
        Choice(RESAMPLING_MODES).check("reuse_resampling", reuse_resampling)
        Choice(("mean", "zeros")).check("reuse_class_fill", reuse_class_fill)
        stages = _build_stages(backbone, grids, padded_patches)
        scaled_hidden, scaled_dim = default_reuse_widths(stages[0].vit.embed_dim)
        # The resolved widths go into the config, so a checkpoint rebuilds what it was trained with.
        reuse_hidden = scaled_hidden if reuse_hidden is None else reuse_hidden
        reuse_dim = scaled_dim if reuse_dim is None else reuse_dim
        # The published-model options are recorded only when set: the configs (and so the benchmark's cache keys)
        # of models without them stay what they were.
        published = {key: value for key, value, default in (
            ("padded_patches", padded_patches, False), ("reuse_resampling", reuse_resampling, "bilinear"),
            ("reuse_class_fill", reuse_class_fill, "mean")) if value != default}
        super().__init__(backbone, grids=grids, feature_reuse=feature_reuse, relation_reuse=relation_reuse,
                         reuse_hidden=reuse_hidden, reuse_dim=reuse_dim, **published)
        self.stages = nn.ModuleList(stages)
        for previous, stage in zip(self.stages, self.stages[1:]):
            if feature_reuse:
                stage.add_feature_reuse(previous, reuse_hidden, reuse_dim, reuse_resampling, reuse_class_fill)
            if relation_reuse:
                stage.add_relation_reuse(previous, reuse_resampling)
        self.thresholds = [NEVER_EXIT] * (len(self.stages) - 1)
        # Cost of leaving at each stage (plain CPU tensor: per-image bookkeeping, not model state).
        self._exit_macs = torch.tensor([stage.macs() for stage in self.stages], dtype=torch.float64).cumsum(0)
        # Held-out max probabilities (N, K) from the last calibrate(); calibration data, not saved.
        self._held_out_confidences: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.stages[0].vit.num_classes

    @property
    def grids(self) -> list[int]:
        return [stage.grid for stage in self.stages]

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> list[Tensor]:
        """Every stage on every image: the logits of each exit, coarse to fine."""
        self.check_images(x)
        exits, memory = [], None
        for stage in self.stages:
            logits, memory = stage(x, memory)
            exits.append(logits)
        return exits

    def compute_loss(self, output: list[Tensor], target: Tensor, criterion: Criterion) -> LossOutput:
        """Sum of the task loss of every exit, equal weights (as published); terms ``exit1``..``exitK``."""
        losses = torch.stack([criterion(logits, target) for logits in output])
        terms = {f"exit{k + 1}": value for k, value in enumerate(losses.detach().tolist())}
        return LossOutput(losses.sum(), terms)

    def init_from_dense(self, state_dict: dict[str, Tensor]) -> None:
        """Start every stage from a dense model (``DenseViT.state_dict()``, keys ``vit.*``).

        Patch-embedding kernels are resampled to each stage's patch size (timm's pseudo-inverse resize) and
        position embeddings to its grid; MLP inputs widened for feature reuse keep their extra slots fresh,
        and so do the reuse modules.
        """
        dense = {key[len("vit."):]: value for key, value in state_dict.items() if key.startswith("vit.")}
        if not dense:
            raise ValueError("expected a DenseViT state_dict (keys starting with 'vit.')")
        for stage in self.stages:
            stage.vit.load_state_dict(_fit_dense_to_stage(dense, stage.vit))

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_all_exits(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits for every image (anytime accuracy); runs all stages."""
        return self.forward(x)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        """Early exit for real: each stage runs only on the images no earlier stage was confident about.

        ``extras["exit_stage"]`` (B,) holds the 0-based stage each image left at, ``extras["exit_confidence"]``
        (B, K) its max softmax probability at each exit it reached (NaN at the exits it never ran).
        """
        self.check_images(x)
        return run_cascade(list(self.stages), x, self.thresholds, self._exit_macs)

    def export_plan(self, example_images: Tensor) -> ExportPlan:
        """One graph per stage, ``stage0``...: images and the previous stage's memory in, logits and this
        stage's memory out; :func:`run_exported` exits between them with the thresholds of the settings."""
        graphs, memory = {}, None
        with torch.no_grad():
            for k, stage in enumerate(self.stages):
                graph = StageGraph(stage, feeds_next=k < len(self.stages) - 1)
                inputs = {"images": example_images} if memory is None else memory.feeds(example_images)
                inputs = {name: inputs[name] for name in graph.input_names}
                graphs[f"stage{k}"] = Graph(graph, tuple(inputs.values()), graph.input_names, graph.output_names)
                _, memory = stage(example_images, memory)
        settings = {"thresholds": list(self.thresholds), "exit_macs": self._exit_macs.tolist()}
        return ExportPlan(graphs, "dyntok.methods.dvt:run_exported", settings, runtime_knobs=("thresholds",))

    def dense_macs(self) -> float:
        """MACs per image when every stage runs (nobody exits early): the top of the budget range."""
        return float(self._exit_macs[-1])

    def exit_macs(self) -> list[float]:
        """MACs per image of leaving at each stage (cumulative over the stages run)."""
        return self._exit_macs.tolist()

    # ----------------------------------------------------------------- budget
    def get_budget(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}

    def budget_space(self) -> dict[str, KnobSpace]:
        """One confidence threshold in [0, 1] per exit before the last; NEVER_EXIT closes an exit."""
        return {"thresholds": Interval(0.0, 1.0, length=len(self.stages) - 1, sentinels=(NEVER_EXIT,))}

    def set_budget(self, **knobs: Any) -> None:
        """``thresholds=[...]``: K-1 confidences in [0, 1], or :data:`NEVER_EXIT` to close an exit."""
        self.thresholds = self.checked_budget(knobs).get("thresholds", self.thresholds)

    def budget_sweep(self) -> list[dict[str, Any]]:
        """Thresholds giving the geometric exit proportions q^k for each q in :data:`SWEEP_Q`.

        Fitted on the held-out confidences kept by the last :meth:`calibrate`; before any calibration there is
        nothing to fit on, so the sweep is just the current budget (with a warning).
        """
        if self._held_out_confidences is None:
            warnings.warn("DVT.budget_sweep() before calibrate(): the sweep is only the current thresholds; "
                          "call model.calibrate(held_out_loader) first", stacklevel=2)
            return [self.get_budget()]
        stages = len(self.stages)
        return [{"thresholds": thresholds_for_proportions(self._held_out_confidences,
                                                          geometric_exit_proportions(q, stages))}
                for q in SWEEP_Q]

    def speed_budgets(self, images: Tensor) -> dict[str, dict[str, Any]]:
        """Every image leaving at the first stage (thresholds 0: DVT's best case), and exit shares fitted on
        ``images`` to the published rule q^k with q = 0.5 (4/7, 2/7, 1/7 of the images for three stages)."""
        first = {"thresholds": [0.0] * (len(self.stages) - 1)}
        fitted = self.calibrate([(chunk, None) for chunk in images.split(64)], q=0.5)
        return {"all exit at stage 1": first, "exit shares q^k, q=0.5": fitted}

    def calibrate(self, loader: Iterable[tuple[Tensor, Tensor]], gmacs: float | None = None,
                  q: float | None = None) -> dict[str, Any]:
        """Run every stage once over a held-out split, keep each exit's confidences, and fit the thresholds.

        ``q=``: exit proportions proportional to q^k (the published rule). ``gmacs=``: the largest q whose
        mean GMACs on the held-out split stays within the target. Neither: only collect the confidences
        (for :meth:`budget_sweep`) and keep the thresholds. Returns the budget.
        """
        if gmacs is not None and q is not None:
            raise ValueError("calibrate for gmacs= or for q=, not both")
        for name, target in (("gmacs", gmacs), ("q", q)):
            if target is not None:
                Interval(0.0, low_open=True).check(name, target)  # NaN would silently fit "everyone exits first"
        self._held_out_confidences = self._collect_confidences(loader)
        if q is not None:
            proportions = geometric_exit_proportions(q, len(self.stages))
            self.set_budget(thresholds=thresholds_for_proportions(self._held_out_confidences, proportions))
        elif gmacs is not None:
            self.set_budget(thresholds=self._thresholds_for_macs(gmacs * 1e9))
        return self.get_budget()

    def _collect_confidences(self, loader: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            batches = [torch.stack([_confidence(logits) for logits in self.predict_all_exits(images.to(device))],
                                   dim=1).cpu() for images, _ in loader]
        finally:
            self.train(was_training)
        if not batches:
            raise ValueError("the calibration split is empty")
        return torch.cat(batches)

    def _thresholds_for_macs(self, target_macs: float) -> list[float]:
        """Bisection on log q: the largest q of the geometric rule whose held-out mean MACs fit the target."""
        confidences, stages = self._held_out_confidences, len(self.stages)
        if target_macs < self._exit_macs[0]:
            raise ValueError(f"{target_macs / 1e9:.4g} GMACs is below the cheapest DVT budget "
                             f"(every image leaving at stage 1: {self._exit_macs[0] / 1e9:.4g} GMACs)")
        best = [0.0] * (stages - 1)  # everyone leaves at stage 1: within any target allowed here
        low, high = math.log(1e-4), math.log(1e4)
        for _ in range(40):
            middle = (low + high) / 2
            thresholds = thresholds_for_proportions(confidences, geometric_exit_proportions(math.exp(middle), stages))
            if self._exit_macs[exit_stages(confidences, thresholds)].mean() <= target_macs:
                best, low = thresholds, middle
            else:
                high = middle
        return best


def _confidence(logits: Tensor) -> Tensor:
    """Max softmax probability, computed in float32 whatever the logits' dtype."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


#: A stage as :func:`run_cascade` calls it: (images, previous memory or None) -> (logits, memory for the next).
StageFn = Callable[[Tensor, "StageMemory | None"], "tuple[Tensor, StageMemory]"]


def run_cascade(stages: Sequence[StageFn], x: Tensor, thresholds: Sequence[float], exit_macs: Tensor) -> Prediction:
    """The early-exit loop of :meth:`DVT.predict`, over eager stages or exported ones (:func:`run_exported`).

    Each stage runs only on the images still undecided; ``exit_macs`` (K,) is the cumulative cost of leaving
    at each stage.
    """
    last = len(stages) - 1
    exit_stage = torch.full((len(x),), last, dtype=torch.long, device=x.device)
    exit_confidence = torch.full((len(x), len(stages)), math.nan, device=x.device)
    running = torch.arange(len(x), device=x.device)  # input positions of the images still running
    images, memory, logits = x, None, None
    for k, stage in enumerate(stages):
        stage_logits, memory = stage(images, memory)
        if logits is None:
            logits = stage_logits.new_empty(len(x), stage_logits.shape[-1])
        confidence = _confidence(stage_logits)
        exit_confidence[running, k] = confidence
        if k == last:
            logits[running] = stage_logits
            break
        leaving = confidence >= thresholds[k]
        logits[running[leaving]] = stage_logits[leaving]
        exit_stage[running[leaving]] = k
        staying = ~leaving
        still = int(staying.sum())
        if still == 0:
            break
        if still < len(running):
            images, memory, running = images[staying], memory.select(staying), running[staying]
    macs = exit_macs[exit_stage.cpu()]
    return Prediction(logits, macs, {"exit_stage": exit_stage, "exit_confidence": exit_confidence})


def run_exported(graphs: Mapping[str, GraphFn], settings: dict[str, Any], images: Tensor) -> Prediction:
    """The runner of :meth:`DVT.export_plan`: :func:`run_cascade` over the exported stages."""
    stages = [_ExportedStage(graphs[f"stage{k}"]) for k in range(len(settings["exit_macs"]))]
    return run_cascade(stages, images, settings["thresholds"], torch.tensor(settings["exit_macs"], dtype=torch.float64))


class _ExportedStage:
    """An exported stage called like a :class:`DVTStage` (the graph takes the inputs it declares)."""

    def __init__(self, graph: GraphFn) -> None:
        self.graph = graph

    def __call__(self, images: Tensor, memory: StageMemory | None) -> tuple[Tensor, StageMemory]:
        outputs = self.graph(**({"images": images} if memory is None else memory.feeds(images)))
        return outputs["logits"], StageMemory(outputs.get("next_tokens"), outputs.get("next_relations"))


class StageGraph(nn.Module):
    """A :class:`DVTStage` with its memory as plain tensors: the inputs are the images plus the previous
    stage's memory when this stage reuses it, the outputs its logits plus the memory the next stage reads."""

    def __init__(self, stage: DVTStage, feeds_next: bool) -> None:
        super().__init__()
        self.stage = stage
        reuses = stage.feature_reuse is not None or stage.relation_reuse is not None
        # Tokens always travel with a reused memory (a stage reusing only relations ignores them; they are small).
        self.input_names = ("images",) + (("tokens",) if reuses else ()) + (
            ("relations",) if stage.relation_reuse is not None else ())
        # ONNX names are unique in a graph: what goes out is the next stage's "tokens" and "relations".
        self.output_names = ("logits",) + (("next_tokens",) if feeds_next else ()) + (
            ("next_relations",) if stage.exports_relations else ())

    def forward(self, images: Tensor, tokens: Tensor | None = None, relations: Tensor | None = None
                ) -> tuple[Tensor, ...]:
        memory = None if tokens is None else StageMemory(tokens, relations)
        logits, memory = self.stage(images, memory)
        return (logits, memory.tokens, memory.relations)[:len(self.output_names)]


def _build_stages(backbone: BackboneSpec, grids: list[int] | None, padded: bool) -> list[DVTStage]:
    """One ViT per grid, each at the patch and input side of :func:`stage_geometry`."""
    reference = backbone.build()
    side, patch = reference.patch_embed.img_size, reference.patch_embed.patch_size
    if side[0] != side[1] or patch[0] != patch[1]:
        raise ValueError(f"DVT needs square images and patches, got img_size {side}, patch_size {patch}")
    grids = grids if grids is not None else default_grids(reference.patch_embed.grid_size[0])
    _check_grids(grids, side[0])
    stages = []
    for grid in grids:
        stage_patch, stage_side = stage_geometry(side[0], grid, padded)
        if reference is not None and (stage_patch, stage_side) == (patch[0], side[0]):
            vit, reference = reference, None  # the backbone as built is this stage: no second build
        else:
            vit = backbone.build(img_size=stage_side, patch_size=stage_patch)
        stages.append(DVTStage(vit, grid, padded))
    return stages


def _check_grids(grids: Sequence[int], image_side: int) -> None:
    """Coarse to fine, and no finer than one pixel per token: anything else cannot be built sensibly."""
    fits = all(isinstance(grid, int) and 1 <= grid <= image_side for grid in grids)
    if len(grids) < 2 or not fits or list(grids) != sorted(set(grids)):
        raise ValueError(f"grids must be at least two increasing token-grid sides, each in [1, {image_side}] "
                         f"for {image_side}px images; got {list(grids)}")


def _fit_dense_to_stage(dense: dict[str, Tensor], vit: VisionTransformer) -> dict[str, Tensor]:
    """The dense weights reshaped for ``vit``: kernels, position embeddings and widened MLP inputs."""
    fitted = vit.state_dict()
    for key, value in dense.items():
        if key not in fitted:
            raise ValueError(f"dense weight {key!r} has no counterpart in a DVT stage")
        target = fitted[key]
        if key == "patch_embed.proj.weight":
            value = resample_patch_embed(value, list(target.shape[-2:]))
        elif key == "pos_embed":
            num_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
            value = resample_abs_pos_embed(value, list(vit.patch_embed.grid_size), num_prefix_tokens=num_prefix)
        elif value.shape != target.shape and value.shape[:-1] == target.shape[:-1]:
            # norm2 / fc1 widened for feature reuse: dense weights in the leading slots, the rest stays fresh
            value = torch.cat([value, target[..., value.shape[-1]:]], dim=-1)
        fitted[key] = value
    return fitted
