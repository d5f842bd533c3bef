"""The contract every dyntok method fulfils.

The trainer, the evaluator and the benchmark talk to every model through this interface and never ask
which method they hold. A method is an ``nn.Module`` that:

* is built from a :class:`~dyntok.models.BackboneSpec` plus its own keyword arguments (``create_model``);
* in training mode, returns from ``forward`` whatever its :meth:`compute_loss` needs;
* computes its loss: the task loss (given by the trainer, so label smoothing and mixup stay the trainer's
  business) plus its own terms, using a frozen teacher when it asked for one;
* in eval mode answers :meth:`predict` with logits **and the MACs actually executed for each image**
  (``extras`` may add per-image facts under the standard keys of :class:`Prediction`), and
  :meth:`predict_all_exits` with every exit's logits for methods that have several (and, where an image
  can be routed straight to an exit, :meth:`exit_macs` with what each costs);
* exposes budget knobs (keep ratio, thresholds...) that can be changed after training, with a default
  sweep for the benchmark and, where a knob must be fitted, :meth:`calibrate` on a held-out split;
* may train in phases (each with its own trainable parameters and learning-rate scales);
* saves and loads through ``state_dict`` plus :attr:`config` and :meth:`get_budget`.

See docs/architecture.md for the full story.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor, nn

from ..models.vit import BackboneSpec
from .budget import Choice, KnobSpace

if TYPE_CHECKING:
    from .export_plan import ExportPlan
    from ..measure.latency_budget import Timer

__all__ = ["Prediction", "LossOutput", "TrainingPhase", "AdaptiveViT", "SingleViT", "Criterion"]

#: The task loss the trainer hands to :meth:`AdaptiveViT.compute_loss`: ``criterion(logits, target)``.
Criterion = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Prediction:
    """What inference returns, in the input order.

    ``macs`` holds, for each image, the multiply-accumulates that were really executed for it (float64).
    ``extras`` holds per-image facts. These standard keys have the same meaning and shape for every method
    (B images, P source patches of the full-resolution grid, row-major); the pictures of ``dyntok show``
    are chosen by which of them a prediction carries, never by the method's name:

    * ``kept_patches``: list, one per stage (or block) where tokens are dropped, of (B, P) bool: the
      source patches still in use after that decision;
    * ``patch_groups``: list, one per stage where tokens are merged or fused, of (B, P) long: the index of
      the token each source patch has been merged into (patches sharing an index form one token);
    * ``exit_stage``: (B,) long, the 0-based exit each image left at;
    * ``exit_confidence``: (B, num_exits) float, the confidence at each exit (NaN where it was not run);
    * ``token_length``: (B,) long, the number of patch tokens the image ran with;
    * ``kept_heads``: list, one per block, of (B, num_heads) bool, the heads executed;
    * ``kept_blocks``: (B, depth, 2) bool, whether each block's attention and MLP were executed.

    Methods may add their own keys beside these (DynamicViT's ``kept_tokens``).
    """

    logits: Tensor
    macs: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossOutput:
    """The total loss to back-propagate and its named terms (detached floats, for logging)."""

    total: Tensor
    terms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingPhase:
    """One phase of a method's training (most methods have one, ``main``).

    ``epoch_share`` is this phase's share of the training budget; the trainer switches the model into the
    phase with :meth:`AdaptiveViT.set_phase` and builds the optimiser from :meth:`AdaptiveViT.param_groups`.
    """

    name: str = "main"
    epoch_share: float = 1.0


class AdaptiveViT(nn.Module):
    """Base class of every method; the dense ViT is the simplest implementation."""

    #: The name used in model names (``<method>_<backbone>``) and on the command line (``--method``).
    method_name: ClassVar[str] = ""
    #: Whether :meth:`compute_loss` needs a frozen teacher (set with :meth:`attach_teacher`).
    wants_teacher: ClassVar[bool] = False
    #: Whether :meth:`predict` fills ``Prediction.extras`` (kept patches, patch groups...: explanations).
    #: Set ``model.explain = False`` where nobody reads them (serving, timing): methods then skip the work of
    #: recording them (DynamicViT's, EViT's and AdaViT's kept patches, ToMe's and EViT's patch groups). Logits
    #: and MACs are the same either way; decisions that cost nothing to report (DVT's exit stage, ReViT's
    #: token length) stay.
    explain: bool = True

    #: Constructor options added after checkpoints of this method were first saved, each with the value that
    #: gives the behaviour those checkpoints were trained with: a saved config without one rebuilds the old model.
    defaults_for_old_configs: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: BackboneSpec, **method_kwargs: Any) -> None:
        super().__init__()
        self.backbone_spec = backbone
        self.method_kwargs = dict(method_kwargs)
        self.phase = "main"
        # The teacher is kept out of ``_modules`` so it is neither saved, trained, nor moved implicitly.
        self._teacher: list[nn.Module] = []

    # ----------------------------------------------------------------- identity and persistence
    @property
    def config(self) -> dict[str, Any]:
        """Everything ``create_model`` needs to rebuild this model (weights aside)."""
        return {"method": self.method_name, "backbone": self.backbone_spec.to_dict(),
                "method_kwargs": dict(self.method_kwargs)}

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @functools.cached_property
    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images this model takes (resolved once: checked on every call)."""
        arch, kwargs = self.backbone_spec.resolved_kwargs()
        side = kwargs.get("img_size") or _default_image_side(arch)
        height, width = (side, side) if isinstance(side, int) else side
        return kwargs.get("in_chans", 3), height, width

    def check_images(self, x: Tensor) -> None:
        """A clear ``ValueError`` for a batch this model cannot take, before any layer fails obscurely."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_size:
            raise ValueError(f"{type(self).__name__} takes images of shape (batch, {', '.join(map(str, self.input_size))})"
                             f", got {tuple(x.shape)}; resize the input or build the model with img_size=")
        if not x.is_floating_point():
            raise ValueError(f"expected normalised float images, got dtype {x.dtype}")

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Any:  # pragma: no cover - abstract
        """Training forward: returns whatever :meth:`compute_loss` needs."""
        raise NotImplementedError

    def compute_loss(self, output: Any, target: Tensor, criterion: Criterion) -> LossOutput:
        """Task loss plus the method's own terms (default: the task loss on ``output`` as logits)."""
        loss = criterion(output, target)
        return LossOutput(loss, {"task": loss.item()})

    def training_phases(self) -> list[TrainingPhase]:
        return [TrainingPhase()]

    def set_phase(self, name: str) -> None:
        known = [phase.name for phase in self.training_phases()]
        if name not in known:
            raise ValueError(f"{type(self).__name__} has no training phase {name!r}; phases: {known}")
        self.phase = name

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups for the current phase, each with an ``lr_scale``.

        Default: every trainable parameter at the base learning rate, without weight decay on biases,
        norms, position embeddings and tokens (the usual ViT recipe).
        """
        return split_weight_decay(self.named_parameters(), weight_decay)

    def begin_training(self) -> None:
        """Told by the trainer once, before it builds the optimiser, when it is about to train this model
        (never for a zero-epoch run, which only saves and evaluates the model as it was built or initialised).

        A method whose trained form differs from its training-free form settles the difference here, in
        :attr:`config` so that the trained model is rebuilt the same way (ToMe: proportional attention off);
        it must decide the same on every call, since a resumed run calls it again. By default it does nothing.
        """

    def set_training_progress(self, fraction: float) -> None:
        """Told by the trainer before every step: the share of training done, from 0 to 1.

        Methods with a schedule of their own (EViT's keep-rate warm-up) follow it; by default it is ignored.
        """

    def attach_teacher(self, teacher: nn.Module) -> None:
        """Give the method a frozen teacher (only called when :attr:`wants_teacher`)."""
        teacher.eval().requires_grad_(False)
        self._teacher[:] = [teacher]

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def init_from_dense(self, state_dict: dict[str, Tensor]) -> None:
        """Start from a trained dense model's weights (``DenseViT.state_dict()``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot start from a dense checkpoint")

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:  # pragma: no cover - abstract
        """Inference: logits and per-image executed MACs. Call in eval mode."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_all_exits(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits for every image (anytime accuracy); one exit unless the method has several."""
        return [self.predict(x).logits]

    def dense_macs(self) -> float:
        """MACs per image when nothing is skipped: the upper end of this model's budget range."""
        raise NotImplementedError

    def per_budget(self, name: str, compute: Callable[[], Any], *key: Any) -> Any:
        """``compute()`` once per budget (and ``key``, e.g. an input size), then from a cache.

        For what depends only on the budget and shapes, such as the per-image MAC formulas of a fixed-budget
        method: walking the layers on every ``predict`` costs more than pruning saves at batch 1. The cache
        is keyed by :meth:`get_budget`, so a new budget is never served a stale value.
        """
        cache = self.__dict__.setdefault("_per_budget_cache", {})
        full_key = (name, repr(sorted(self.get_budget().items())), *key)
        if full_key not in cache:
            cache[full_key] = compute()
        return cache[full_key]

    def exit_macs(self) -> list[float] | None:
        """MACs per image of answering at each exit of :meth:`predict_all_exits`, for a router that sends an
        image straight there (cumulative for a cascade); None where exits are not routes (one exit, or costs
        that vary by image). Used for the oracle curve (:mod:`dyntok.measure.oracle`)."""
        return None

    def export_plan(self, example_images: Tensor) -> "ExportPlan":
        """The graphs that deploy this model at its current budget (:mod:`dyntok.deploy`).

        Default: :meth:`predict` as one graph with a dynamic batch axis, which is right for a method without
        per-image control flow (the exporter refuses a ``predict`` whose path depends on the data, so a
        method that needs one is told, never exported wrong). Methods whose images take different paths
        override this with a few graphs and a runner (DVT, ReViT, AdaViT).
        """
        from .export_plan import single_graph_plan

        return single_graph_plan(self, example_images)

    # ----------------------------------------------------------------- budget knobs
    def get_budget(self) -> dict[str, Any]:
        """Current values of the budget knobs (empty for a model without any)."""
        return {}

    def set_budget(self, **knobs: Any) -> None:
        """Change budget knobs after training; unknown knobs or impossible values raise ``ValueError``."""
        if knobs:
            raise ValueError(f"{type(self).__name__} has no budget knobs; got {sorted(knobs)}")

    def budget_space(self) -> dict[str, KnobSpace]:
        """The valid values of each budget knob: an :class:`~dyntok.methods.budget.Interval` or a
        :class:`~dyntok.methods.budget.Choice` per name in :meth:`get_budget`.

        Override it with each knob's full range: tests then draw any valid setting and check that every one
        runs with finite logits and MACs between the cheapest setting and the dense cost. The default only
        knows the values this model has seen (its current budget and its sweep).
        """
        seen: dict[str, list[Any]] = {}
        for point in [self.get_budget(), *self.budget_sweep()]:
            for name, value in point.items():
                if value not in seen.setdefault(name, []):
                    seen[name].append(value)
        return {name: Choice(tuple(values)) for name, values in seen.items()}

    def checked_budget(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """``knobs`` validated against :meth:`budget_space`, for :meth:`set_budget` implementations.

        Unknown names and values out of range raise a ``ValueError`` naming the knob and what it accepts.
        """
        space = self.budget_space()
        unknown = sorted(set(knobs) - set(space))
        if unknown:
            accepted = ", ".join(f"{name} ({knob.describe()})" for name, knob in space.items()) or "none"
            raise ValueError(f"{type(self).__name__} has no budget knob {', '.join(unknown)}; knobs: {accepted}")
        return {name: space[name].check(name, value) for name, value in knobs.items()}

    def budget_sweep(self) -> list[dict[str, Any]]:
        """Knob settings the benchmark evaluates, one point of the accuracy-vs-GMACs curve each.

        Methods whose knobs are fitted (DVT's thresholds) derive the sweep from the data seen by
        :meth:`calibrate`, so callers calibrate first.
        """
        return [self.get_budget()]

    def paper_budget(self) -> dict[str, Any]:
        """The knobs of the method's published headline setting (docs/methods/); default: the budget as built."""
        return self.get_budget()

    def speed_budgets(self, images: Tensor) -> dict[str, dict[str, Any]]:
        """Labelled budgets at which to time this model with untrained weights (``benchmarks/speed_at_scale.py``).

        Each value is a ``set_budget`` setting whose cost does not depend on what training would teach: methods
        whose cost follows the content (exit, length or skip shares) force the shares here, fitting their knobs
        on ``images`` where needed (which may change the current budget: callers set each point). The paper's
        budget comes first. Default: ``{"as built": paper_budget()}``.
        """
        return {"as built": self.paper_budget()}

    def calibrate(self, loader: Iterable[tuple[Tensor, Tensor]], **target: Any) -> dict[str, Any]:
        """Fit knobs on a held-out split for a target (e.g. ``gmacs=``); returns the fitted knobs.

        Methods whose knobs are set directly (a keep ratio) need no calibration: the default returns the
        current budget unchanged.
        """
        return self.get_budget()

    def calibrate_latency(self, loader: Iterable[tuple[Tensor, Tensor]], latency_ms: float, batch_size: int = 1,
                          timer: "Timer | None" = None) -> dict[str, Any]:
        """Fit the budget so that a batch of ``batch_size`` images takes at most ``latency_ms`` here; returns it.

        Generic over methods (:func:`dyntok.measure.latency_budget.fit_latency_budget`): :meth:`calibrate`
        first collects what the method fits on (DVT's held-out confidences for its sweep), then every budget
        of :meth:`budget_sweep` is timed on the loader's first images and the slowest within the target kept,
        refined between sweep points. ``timer`` replaces the wall clock (tests use a fake one).
        """
        from ..measure.latency_budget import fit_latency_budget, timed_images

        loader = list(loader)
        self.calibrate(loader)
        images = torch.cat([batch for batch, _ in loader])[:timed_images(batch_size)]
        return fit_latency_budget(self, images, latency_ms, batch_size, timer)

    # ----------------------------------------------------------------- explanations
    def kept_patches(self, prediction: Prediction) -> list[Tensor] | None:
        """Per stage, a (B, num_patches) bool mask of the patches each image used, if the method decides it."""
        return prediction.extras.get("kept_patches")


class SingleViT(AdaptiveViT):
    """A method that runs one timm ViT, ``self.vit`` (every method but DVT's cascade of several)."""

    vit: nn.Module

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    @property
    def num_patches(self) -> int:
        """Patch tokens of the full image (prefix tokens excluded)."""
        return self.vit.patch_embed.num_patches


def dense_backbone_state(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's weights in a ``DenseViT.state_dict()`` (keys ``vit.*``), for ``vit.load_state_dict``."""
    foreign = sorted(key for key in state_dict if not key.startswith("vit."))
    if foreign:
        raise ValueError(f"init_from_dense expects a DenseViT state dict (keys 'vit.*'); got {foreign[:3]}...")
    return {key[len("vit."):]: value for key, value in state_dict.items()}


def _default_image_side(arch: str) -> int:
    """The input side timm builds ``arch`` with when no ``img_size`` is given (224 for most ViTs)."""
    import timm

    config = timm.get_pretrained_cfg(arch)
    return config.input_size[-1] if config is not None else 224


_NO_DECAY_SUFFIXES = ("bias", "pos_embed", "cls_token", "reg_token", "dist_token")


def split_weight_decay(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                       lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Two groups: decayed matrices and undecayed 1-d parameters, biases and tokens."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(_NO_DECAY_SUFFIXES):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale}]
    return [group for group in groups if group["params"]]
