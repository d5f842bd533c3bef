"""ReViT and its Token-Length Assigner: one ViT that runs at several token lengths, and a tiny network that
picks the length for each image.

Reconstructed from the abstracts of "A Picture is Worth a Thousand Words" / "Make A Long Image Short:
Adaptive Token Length for Vision Transformers" (no official code exists; docs/methods/revit.md says which
parts follow the paper and which are this library's choices).

* **ReViT** is one timm ViT built with ``dynamic_img_size``: for a grid of g x g tokens the image is resized
  to ``g * patch`` pixels and timm resamples the position embedding on the fly. Training runs every length
  on every batch and sums their losses, optionally distilling the longest length into the shorter ones.
* **Token-length label** of an image: the shortest length at which ReViT classifies it correctly, the
  longest where none does (:func:`~dyntok.measure.oracle.first_correct_exit`).
* **TLA** (:class:`TokenLengthAssigner`): a two-layer CNN on a low-resolution view, trained in a second phase
  with the backbone frozen, on labels computed from the frozen ReViT for each training batch.
* **Inference** (:meth:`ReViT.predict`): the assigner picks each image's length, the batch is split by length,
  each group runs at its length and the logits go back to input order. Each image is charged the assigner
  plus its length. The budget knob ``bias`` pushes the choice towards longer (> 0) or shorter (< 0) lengths.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..measure.macs import linear_macs, patch_embed_macs, vit_macs
from ..measure.oracle import exit_correctness, first_correct_exit
from ..models.vit import BackboneSpec
from .base import Criterion, LossOutput, Prediction, SingleViT, TrainingPhase, split_weight_decay
from .budget import Choice, Interval, KnobSpace
from .export_plan import ExportPlan, Graph, GraphFn
from .registry import register_method
from .token_reduction import default_grids

__all__ = ["ReViT", "ReViTOutput", "TokenLengthAssigner", "resize_images", "vit_macs_at_grid", "SWEEP_BIASES"]

#: Assigner biases the benchmark sweeps by default (in logit units; the assigner is trained with CE).
SWEEP_BIASES = (-1.5, -0.75, 0.0, 0.75, 1.5)


# --------------------------------------------------------------------------------------------- helpers
def resize_images(images: Tensor, side: int) -> Tensor:
    """``images`` resized to ``side`` x ``side`` (bilinear, antialiased when shrinking); unchanged if already."""
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def vit_macs_at_grid(vit: nn.Module, grid: int) -> float:
    """MACs per image of a timm ViT run on a ``grid`` x ``grid`` token grid (its patch size unchanged)."""
    patches = grid * grid
    tokens = [patches + vit.num_prefix_tokens] * len(vit.blocks)
    # vit_macs charges the patch embedding at the built grid; the convolution scales with the patch count.
    unused_embed = patch_embed_macs(vit.patch_embed) * (1 - patches / vit.patch_embed.num_patches)
    return vit_macs(vit, tokens) - unused_embed


def _conv_macs(conv: nn.Conv2d, height: int, width: int) -> tuple[float, int, int]:
    """MACs of ``conv`` on a ``height`` x ``width`` input, and the output's height and width."""
    out_h, out_w = (
        (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1
        for size, pad, dil, kernel, stride in zip((height, width), conv.padding, conv.dilation, conv.kernel_size,
                                                  conv.stride))
    per_output = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return float(out_h * out_w * conv.out_channels * per_output), out_h, out_w


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# --------------------------------------------------------------------------------------------- the assigner
class TokenLengthAssigner(nn.Module):
    """The TLA: logits over the token lengths from a ``side`` x ``side`` view of the image.

    Two stride-2 3x3 convolutions (``width`` then ``2 * width`` channels, GELU), global average pooling and
    a linear layer: a few hundred thousand MACs at 16 px, a small fraction of a ViT at its shortest length.
    """

    def __init__(self, num_lengths: int, in_chans: int = 3, side: int = 16, width: int = 16) -> None:
        super().__init__()
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(2 * width, num_lengths)

    def forward(self, images: Tensor) -> Tensor:
        features = self.features(resize_images(images, self.side))
        return self.head(features.mean(dim=(2, 3)))

    def macs(self) -> float:
        """MACs per image: the convolutions at their output sizes and the head (resizing and pooling are free)."""
        total, height, width = 0.0, self.side, self.side
        for conv in (layer for layer in self.features if isinstance(layer, nn.Conv2d)):
            macs, height, width = _conv_macs(conv, height, width)
            total += macs
        return total + linear_macs(self.head, 1)


@dataclass
class ReViTOutput:
    """The training forward's result: each length's logits (shortest first) and, in the assigner phase,
    the assigner's logits (the length logits then come from the frozen backbone, without gradients)."""

    length_logits: list[Tensor]
    assigner_logits: Tensor | None = None


# --------------------------------------------------------------------------------------------- the method
@register_method
class ReViT(SingleViT):
    """One ViT at several token lengths, plus a Token-Length Assigner choosing each image's length.

    Args:
        backbone: the ViT (any timm plain ViT with square images and patches).
        grids: token grid side of each length, shortest first; default half, three quarters and all of the
            backbone's grid (8 -> 4, 6, 8 for 32 px CIFAR at patch 4; 14 -> 7, 10, 14 at 224 px, patch 16).
        distill_weight: weight of the KL divergence from the longest length's (detached) prediction to each
            shorter length's; 0 trains every length on the labels alone.
        assigner_share: the share of the training budget spent on the assigner phase.
        assigner_side: side of the assigner's low-resolution view (default: half the image side).
        assigner_width: channels of the assigner's first convolution.

    Budget knobs: ``bias`` (added to the assigner's logit of length k times k: > 0 favours longer lengths)
    and ``grid`` (None: the assigner decides; one of ``grids``: every image runs at that length, no assigner).
    """

    method_name = "revit"

    def __init__(self, backbone: BackboneSpec, grids: Sequence[int] | None = None, distill_weight: float = 1.0,
                 assigner_share: float = 0.2, assigner_side: int | None = None, assigner_width: int = 16) -> None:
        grids = None if grids is None else [int(grid) for grid in grids]
        super().__init__(backbone, grids=grids, distill_weight=distill_weight, assigner_share=assigner_share,
                         assigner_side=assigner_side, assigner_width=assigner_width)
        if not 0 < assigner_share < 1:
            raise ValueError(f"assigner_share must be in (0, 1), got {assigner_share}")
        self.vit = backbone.build(dynamic_img_size=True)
        self.patch_size = _square(self.vit.patch_embed.patch_size, "patches")
        full_grid = _square(self.vit.patch_embed.grid_size, "token grids")
        self.grids = grids if grids is not None else sorted(set(default_grids(full_grid)))
        if not self.grids or self.grids != sorted(set(self.grids)) or self.grids[0] < 1:
            raise ValueError(f"grids must be distinct positive sides in increasing order, got {self.grids}")
        self.distill_weight = distill_weight
        self.assigner_share = assigner_share
        image_side = self.input_size[-1]
        self.assigner = TokenLengthAssigner(len(self.grids), self.vit.patch_embed.proj.in_channels,
                                            assigner_side or max(1, image_side // 2), assigner_width)
        self.bias = 0.0
        self.grid: int | None = None
        # Per-image bookkeeping (plain CPU tensors, not model state).
        self._length_macs = torch.tensor([vit_macs_at_grid(self.vit, g) for g in self.grids], dtype=torch.float64)
        self._assigner_macs = self.assigner.macs()
        # Held-out assigner logits from the last calibrate(): calibration data, not saved.
        self._held_out_logits: Tensor | None = None
        self.set_phase("revit")

    def logits_at(self, images: Tensor, grid: int) -> Tensor:
        """The backbone's logits with ``images`` resized to a ``grid`` x ``grid`` token grid."""
        return self.vit(resize_images(images, grid * self.patch_size))

    # ----------------------------------------------------------------- training
    def training_phases(self) -> list[TrainingPhase]:
        return [TrainingPhase("revit", 1.0 - self.assigner_share), TrainingPhase("assigner", self.assigner_share)]

    def set_phase(self, name: str) -> None:
        """``revit`` trains the backbone at every length; ``assigner`` freezes it and trains the assigner."""
        super().set_phase(name)
        self.vit.requires_grad_(name == "revit")
        self.assigner.requires_grad_(name == "assigner")

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        trained = self.vit if self.phase == "revit" else self.assigner
        return split_weight_decay(trained.named_parameters(), weight_decay)

    def forward(self, x: Tensor) -> ReViTOutput:
        """Every length on every image; in the assigner phase, also the assigner (backbone frozen, in eval)."""
        self.check_images(x)
        if self.phase == "revit":
            return ReViTOutput([self.logits_at(x, grid) for grid in self.grids])
        with torch.no_grad(), _eval_mode(self.vit):
            length_logits = [self.logits_at(x, grid) for grid in self.grids]
        return ReViTOutput(length_logits, self.assigner(x))

    def compute_loss(self, output: ReViTOutput, target: Tensor, criterion: Criterion) -> LossOutput:
        """``revit``: the task loss summed over lengths, plus distillation from the longest length.
        ``assigner``: cross-entropy of the assigner against each image's token-length label."""
        if output.assigner_logits is not None:
            labels = first_correct_exit(exit_correctness(output.length_logits, target))
            loss = F.cross_entropy(output.assigner_logits.float(), labels)
            return LossOutput(loss, {"assigner": loss.item()})
        losses = [criterion(logits, target) for logits in output.length_logits]
        terms = {f"length{grid}": loss.item() for grid, loss in zip(self.grids, losses)}
        total = torch.stack(losses).sum()
        if self.distill_weight > 0 and len(self.grids) > 1:
            teacher = F.log_softmax(output.length_logits[-1].detach().float(), dim=-1)
            distill = sum(F.kl_div(F.log_softmax(logits.float(), dim=-1), teacher, reduction="batchmean",
                                   log_target=True) for logits in output.length_logits[:-1])
            total = total + self.distill_weight * distill
            terms["distill"] = distill.item()
        return LossOutput(total, terms)

    def init_from_dense(self, state_dict: dict[str, Tensor]) -> None:
        """Start the backbone from a dense model (``DenseViT.state_dict()``); the assigner stays fresh."""
        foreign = sorted(key for key in state_dict if not key.startswith("vit."))
        if foreign:
            raise ValueError(f"init_from_dense expects a DenseViT state dict (keys 'vit.*'); got {foreign[:3]}...")
        self.vit.load_state_dict({key[len("vit."):]: value for key, value in state_dict.items()})

    # ----------------------------------------------------------------- inference
    def choose_lengths(self, x: Tensor) -> Tensor:
        """(B,) index into :attr:`grids` of the length each image runs at (the fixed ``grid`` if set)."""
        return choose_lengths(x, self.assigner, self.grids, self.grid, self.bias)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        """Each image at the length the assigner picks: grouped by length, returned in input order.

        ``extras["token_length"]`` (B,) holds the patch tokens each image ran with.
        """
        self.check_images(x)
        return run_by_length(x, self.choose_lengths(x), lambda images, index: self.logits_at(images, self.grids[index]),
                             self.grids, self._length_macs, 0.0 if self.grid is not None else self._assigner_macs)

    def export_plan(self, example_images: Tensor) -> ExportPlan:
        """The assigner as graph ``assigner`` and each length as graph ``length0``...; :func:`run_exported`
        picks the lengths with the bias and grid of the settings and runs each group at its length."""
        graphs = {"assigner": Graph(self.assigner, (example_images,), ("images",), ("logits",))}
        for index, grid in enumerate(self.grids):
            graphs[f"length{index}"] = Graph(_LengthGraph(self, grid), (example_images,), ("images",), ("logits",))
        settings = {"grids": list(self.grids), "bias": self.bias, "grid": self.grid,
                    "length_macs": self._length_macs.tolist(), "assigner_macs": self._assigner_macs}
        return ExportPlan(graphs, "dyntok.methods.revit:run_exported", settings, runtime_knobs=("bias", "grid"))

    @torch.no_grad()
    def predict_all_exits(self, x: Tensor) -> list[Tensor]:
        """Every length's logits for every image, shortest first."""
        self.check_images(x)
        return [self.logits_at(x, grid) for grid in self.grids]

    def exit_macs(self) -> list[float]:
        """MACs per image of running each length (what an oracle pays; the assigner is not needed)."""
        return self._length_macs.tolist()

    def dense_macs(self) -> float:
        """MACs per image with the assigner choosing the longest length: the top of the budget range."""
        return float(self._length_macs[-1]) + self._assigner_macs

    def assigner_macs(self) -> float:
        return self._assigner_macs

    # ----------------------------------------------------------------- budget
    def get_budget(self) -> dict[str, Any]:
        return {"bias": self.bias, "grid": self.grid}

    def budget_space(self) -> dict[str, KnobSpace]:
        # bias: added k times to the assigner's logit of the k-th length. Beyond the spread of those logits
        # every image already sits at one end, so +-1e4 covers every distinct budget.
        # grid: None lets the assigner decide, a grid side runs every image at that length.
        return {"bias": Interval(-_BIAS_LIMIT, _BIAS_LIMIT), "grid": Choice((None, *self.grids))}

    def set_budget(self, **knobs: Any) -> None:
        """``bias=``: a finite float; ``grid=``: None or one of :attr:`grids`."""
        checked = self.checked_budget(knobs)
        self.bias = checked.get("bias", self.bias)
        self.grid = checked.get("grid", self.grid)

    def paper_budget(self) -> dict[str, Any]:
        """No official budget exists (docs/methods/revit.md); as built, the assigner decides at bias 0."""
        return {"bias": 0.0, "grid": None}

    def speed_budgets(self, images: Tensor) -> dict[str, dict[str, Any]]:
        """Every image at each length in turn (``grid=``): the assigner's choice is what training teaches,
        so untrained weights are timed at forced length shares; the longest length is nothing pruned."""
        return {f"all at {grid}x{grid}" + (" (nothing pruned)" if grid == self.grids[-1] else ""):
                {"bias": 0.0, "grid": grid} for grid in self.grids}

    def budget_sweep(self) -> list[dict[str, Any]]:
        """The assigner at each of :data:`SWEEP_BIASES`, then every image at the longest length (the baseline
        the assigner saves against)."""
        return [{"bias": bias, "grid": None} for bias in SWEEP_BIASES] + [{"bias": 0.0, "grid": self.grids[-1]}]

    def calibrate(self, loader: Iterable[tuple[Tensor, Tensor]], gmacs: float | None = None) -> dict[str, Any]:
        """Run the assigner over a held-out split; with ``gmacs=``, fit the bias so that the mean GMACs there
        (assigner included) come as close to the target as possible without exceeding it. Returns the budget."""
        self._held_out_logits = self._collect_assigner_logits(loader)
        if gmacs is not None:
            self.set_budget(bias=self._bias_for_macs(gmacs * 1e9), grid=None)
        return self.get_budget()

    def _collect_assigner_logits(self, loader: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
        device = next(self.parameters()).device
        with torch.no_grad(), _eval_mode(self):
            batches = [self.assigner(images.to(device)).float().cpu() for images, _ in loader]
        if not batches:
            raise ValueError("the calibration split is empty")
        return torch.cat(batches)

    def _mean_macs(self, bias: float) -> float:
        choice = _biased_choice(self._held_out_logits, bias)
        return self._length_macs[choice].mean().item() + self._assigner_macs

    def _bias_for_macs(self, target_macs: float) -> float:
        """Bisection on the bias: mean cost only grows with it (a larger bias never picks a shorter length)."""
        # Beyond +-(the spread of the logits) every image is at the shortest (longest) length already.
        spread = (self._held_out_logits.max() - self._held_out_logits.min()).item() + 1.0
        low, high = -spread, spread
        target_macs *= 1 + 1e-9  # a target read back from GMACs may be a rounding error below a reachable cost
        if self._mean_macs(low) > target_macs:
            cheapest = (self._length_macs[0] + self._assigner_macs) / 1e9
            raise ValueError(f"{target_macs / 1e9:.4g} GMACs is below ReViT's cheapest budget "
                             f"(the assigner plus every image at the shortest length: {cheapest:.4g} GMACs)")
        for _ in range(50):
            middle = (low + high) / 2
            if self._mean_macs(middle) <= target_macs:
                low = middle
            else:
                high = middle
        return low


#: The largest bias magnitude accepted: far beyond the spread of any assigner's logits.
_BIAS_LIMIT = 1e4


def choose_lengths(images: Tensor, assigner: Callable[[Tensor], Tensor], grids: Sequence[int], grid: int | None,
                   bias: float) -> Tensor:
    """(B,) index into ``grids`` of each image's length: ``grid`` for all if set, else the assigner's biased
    choice (``bias`` added k times to the logit of the k-th length)."""
    if grid is not None:
        return torch.full((len(images),), list(grids).index(grid), dtype=torch.long, device=images.device)
    return _biased_choice(assigner(images), bias)


def _biased_choice(assigner_logits: Tensor, bias: float) -> Tensor:
    steps = torch.arange(assigner_logits.shape[-1], device=assigner_logits.device, dtype=torch.float32)
    return (assigner_logits.float() + bias * steps).argmax(dim=-1)


def run_by_length(x: Tensor, choice: Tensor, logits_at: Callable[[Tensor, int], Tensor], grids: Sequence[int],
                  length_macs: Tensor, assigner_macs: float) -> Prediction:
    """The batch split by ``choice`` (index into ``grids``), each group through ``logits_at(images, index)``,
    the logits back in input order; each image charged its length plus ``assigner_macs`` (the inference of
    :meth:`ReViT.predict`, over eager modules or exported graphs)."""
    logits = None
    for index in choice.unique().tolist():
        members = (choice == index).nonzero().squeeze(1)
        group_logits = logits_at(x[members], index)
        if logits is None:
            logits = group_logits.new_empty(len(x), group_logits.shape[-1])
        logits[members] = group_logits
    choice = choice.cpu()
    tokens = torch.tensor(list(grids))[choice] ** 2
    return Prediction(logits, length_macs[choice] + assigner_macs, {"token_length": tokens.to(x.device)})


def run_exported(graphs: Mapping[str, GraphFn], settings: dict[str, Any], images: Tensor) -> Prediction:
    """The runner of :meth:`ReViT.export_plan`: lengths chosen and run as :meth:`ReViT.predict` does."""
    grids, grid = settings["grids"], settings["grid"]
    choice = choose_lengths(images, lambda batch: graphs["assigner"](images=batch)["logits"], grids, grid,
                            settings["bias"])
    return run_by_length(images, choice, lambda batch, index: graphs[f"length{index}"](images=batch)["logits"], grids,
                         torch.tensor(settings["length_macs"], dtype=torch.float64),
                         0.0 if grid is not None else settings["assigner_macs"])


class _LengthGraph(nn.Module):
    """ReViT's backbone at one token length, images resized inside (an exported graph per length)."""

    def __init__(self, model: ReViT, grid: int) -> None:
        super().__init__()
        self.model, self.grid = model, grid

    def forward(self, images: Tensor) -> Tensor:
        return self.model.logits_at(images, self.grid)


def _square(size: Sequence[int], what: str) -> int:
    if size[0] != size[1]:
        raise ValueError(f"ReViT needs square {what}, got {tuple(size)}")
    return int(size[0])
