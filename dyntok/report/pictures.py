"""Pictures of what a model did with each image: kept and merged patches, exits, token lengths, GMACs.

Everything is drawn from a :class:`Shown` record (images, labels, and what ``predict`` returned), and which
figures exist follows from which standard ``Prediction.extras`` keys the predictions carry (see
:class:`dyntok.methods.Prediction`), never from the method's name:

* ``patches`` (``kept_patches`` or ``patch_groups``): each image beside its patches at every stage, dropped
  ones grey, each token merged from several patches tinted one colour;
* ``exits`` (``exit_stage``): images grouped by the exit they left at, with their confidence at each exit;
* ``token_length`` (``token_length``): images grouped by the number of tokens they ran with;
* ``gmacs`` (always): a histogram of per-image GMACs over the split, and the mean GMACs of each class.

Figures are built on matplotlib's ``Figure`` directly (Agg canvas, no pyplot), like the benchmark plots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from ..methods.base import Prediction

__all__ = ["Shown", "FIGURE_KINDS", "draw_figures", "patch_figure", "exit_figure", "token_length_figure",
           "gmacs_figure", "evenly_spaced", "render_patches", "group_colours", "DROPPED_GREY", "MERGE_TINT"]

#: The flat grey a dropped patch is painted with.
DROPPED_GREY = 0.82
#: How strongly a merged group's colour is laid over its patches (0: invisible, 1: opaque).
MERGE_TINT = 0.5
#: Panel size in inches; at 100 dpi an 8-point caption stays readable beside a 32-pixel image shown at 110 px.
_PANEL = 1.25
_DPI = 100
_CAPTION_SIZE = 8
#: A patch figure is at most this many panels wide; more stages mean fewer images per row.
_MAX_PANELS_PER_ROW = 14
#: Per-class bars: above this many classes only the cheapest and the costliest half of it are drawn.
_MAX_CLASS_BARS = 30
_GMACS_AXIS = "GMACs per image (executed multiply-accumulates, 1e9)"


# --------------------------------------------------------------------------------------------- the record
@dataclass
class Shown:
    """Images as the model saw them and what it answered for each, in split order.

    ``images`` are (N, 3, H, W) floats in [0, 1] (resized to the model's input, not normalised); ``labels``
    (N,) long, -1 where unknown; ``extras`` the predictions' extras concatenated over batches.
    """

    images: Tensor
    labels: Tensor
    predicted: Tensor
    gmacs: Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    class_names: Sequence[str] = ()
    title: str = ""

    @classmethod
    def from_prediction(cls, images: Tensor, labels: Tensor | None, prediction: Prediction,
                        class_names: Sequence[str] = (), title: str = "") -> Shown:
        labels = torch.full((len(images),), -1, dtype=torch.long) if labels is None else labels.long().cpu()
        return cls(images.float().cpu(), labels, prediction.logits.argmax(-1).cpu(),
                   prediction.macs.double().cpu() / 1e9, _to_cpu(prediction.extras), list(class_names), title)

    def __len__(self) -> int:
        return len(self.images)

    def class_name(self, index: int) -> str:
        if index < 0:
            return "?"
        return self.class_names[index] if index < len(self.class_names) else f"class {index}"

    def caption(self, index: int) -> str:
        return (f"true: {self.class_name(int(self.labels[index]))}\n"
                f"pred: {self.class_name(int(self.predicted[index]))}\n{self.gmacs[index]:.3g} GMACs")

    def caption_colour(self, index: int) -> str:
        """Green when right, red when wrong, black when the true class is unknown."""
        if self.labels[index] < 0:
            return "black"
        return "tab:green" if self.labels[index] == self.predicted[index] else "tab:red"

    def picture(self, index: int) -> np.ndarray:
        """(H, W, 3) pixels of image ``index``."""
        return self.images[index].permute(1, 2, 0).clamp(0, 1).numpy()


def _to_cpu(extras: dict[str, Any]) -> dict[str, Any]:
    def cpu(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.detach().cpu()
        if isinstance(value, (list, tuple)):
            return [cpu(item) for item in value]
        return value
    return {key: cpu(value) for key, value in extras.items()}


# --------------------------------------------------------------------------------------------- patches
def group_colours(count: int) -> np.ndarray:
    """(count, 3) distinct RGB colours, hues spread by the golden ratio so that neighbours differ."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return hsv_to_rgb(np.stack([hues, np.full(count, 0.85), np.full(count, 0.95)], axis=1))


def patch_of_pixel(height: int, width: int, grid: tuple[int, int]) -> np.ndarray:
    """(H, W) index of the source patch (row-major over ``grid``) each pixel belongs to."""
    rows = np.arange(height) * grid[0] // height
    cols = np.arange(width) * grid[1] // width
    return rows[:, None] * grid[1] + cols[None, :]


def patch_grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) patch grid of an image of this shape: the one whose aspect matches the image's."""
    rows = round(math.sqrt(num_patches * height / width))
    if rows < 1 or num_patches % rows:
        raise ValueError(f"cannot lay {num_patches} patches on a {height}x{width} image")
    return rows, num_patches // rows


def render_patches(picture: np.ndarray, kept: Tensor | None, groups: Tensor | None) -> np.ndarray:
    """``picture`` (H, W, 3) with dropped patches grey and every group of several merged patches tinted.

    ``kept`` (P,) bool and ``groups`` (P,) long follow the ``kept_patches`` and ``patch_groups`` extras; a
    group counts only its kept patches, so a patch alone in its token stays untouched.
    """
    num_patches = len(kept if kept is not None else groups)
    height, width = picture.shape[:2]
    patch = patch_of_pixel(height, width, patch_grid(num_patches, height, width))
    kept_np = np.ones(num_patches, dtype=bool) if kept is None else kept.numpy().astype(bool)
    out = picture.astype(np.float64, copy=True)
    if groups is not None:
        groups_np = groups.numpy()
        sizes = np.bincount(groups_np[kept_np], minlength=int(groups_np.max()) + 1)
        merged = kept_np & (sizes[groups_np] > 1)
        # A group is coloured after its first source patch, not its index: a token that grows keeps its colour
        # from stage to stage even when the method renumbers tokens.
        first = np.full(len(sizes), num_patches)
        np.minimum.at(first, groups_np, np.arange(num_patches))
        colours = group_colours(num_patches)[first[groups_np]]  # (P, 3)
        tinted = merged[patch]
        out[tinted] = (1 - MERGE_TINT) * out[tinted] + MERGE_TINT * colours[patch][tinted]
    out[~kept_np[patch]] = DROPPED_GREY
    return out


def _stage_label(kept: Tensor | None, groups: Tensor | None) -> str:
    parts = []
    if kept is not None:
        parts.append(f"{int(kept.sum())}/{len(kept)} patches")
    if groups is not None:
        in_use = groups if kept is None else groups[kept]
        parts.append(f"{len(in_use.unique())} tokens")
    return "\n".join(parts)


def evenly_spaced(indices: Tensor, count: int) -> Tensor:
    """``count`` of ``indices`` spread evenly from first to last (a split sorted by class shows every class)."""
    if len(indices) <= count:
        return indices
    return indices[torch.linspace(0, len(indices) - 1, count).round().long()]


def patch_figure(shown: Shown, n: int = 32) -> Figure:
    """``n`` images spread over the split, each beside its patches at every stage (``kept_patches``,
    ``patch_groups``)."""
    kept, groups = shown.extras.get("kept_patches") or [], shown.extras.get("patch_groups") or []
    stages = max(len(kept), len(groups))
    chosen = evenly_spaced(torch.arange(len(shown)), n).tolist()
    count = len(chosen)
    per_row = max(1, min(4, _MAX_PANELS_PER_ROW // (stages + 1), count))
    rows = math.ceil(count / per_row)
    figure = Figure(figsize=(per_row * (stages + 1) * _PANEL, rows * (_PANEL + 0.6) + 0.4), dpi=_DPI,
                    layout="constrained")
    legend = ["grey: dropped"] * bool(kept) + ["a colour: one token merged from several patches"] * bool(groups)
    figure.suptitle(_title(shown, f"patches in use at each stage ({'; '.join(legend)})"))
    cells = figure.subfigures(rows, per_row, squeeze=False, wspace=0.01, hspace=0.01).ravel()
    for cell, index in zip(cells, chosen + [None] * len(cells)):
        axes = cell.subplots(1, stages + 1, squeeze=False)[0]
        for ax in axes:
            ax.set_axis_off()
        if index is None:
            continue
        cell.set_facecolor("0.95")  # one image's panels on one tile
        axes[0].imshow(shown.picture(index), interpolation="nearest")
        axes[0].set_title(shown.caption(index), fontsize=_CAPTION_SIZE, color=shown.caption_colour(index))
        for stage, ax in enumerate(axes[1:]):
            stage_kept = kept[stage][index] if stage < len(kept) else None
            stage_groups = groups[stage][index] if stage < len(groups) else None
            ax.imshow(render_patches(shown.picture(index), stage_kept, stage_groups), interpolation="nearest")
            ax.set_title(f"stage {stage + 1}\n{_stage_label(stage_kept, stage_groups)}", fontsize=_CAPTION_SIZE)
    return figure


# --------------------------------------------------------------------------------------------- groups
def _grouped_figure(shown: Shown, groups: Tensor, heading: Callable[[int, Tensor], str],
                    caption: Callable[[int], str], title: str, n: int) -> Figure:
    """One row per distinct value of ``groups`` (ascending), each with images spread over its members."""
    values = groups.unique().tolist()
    per_group = max(1, min(8, n // max(1, len(values))))
    figure = Figure(figsize=(max(per_group, 6) * _PANEL * 1.1, len(values) * (_PANEL + 1.0) + 0.4), dpi=_DPI,
                    layout="constrained")
    figure.suptitle(_title(shown, title))
    rows = figure.subfigures(len(values), 1, squeeze=False, hspace=0.01).ravel()
    for row, value in zip(rows, values):
        members = (groups == value).nonzero().flatten()
        row.suptitle(heading(value, members), fontsize=_CAPTION_SIZE + 1, x=0.01, ha="left", fontweight="bold")
        row.set_facecolor("0.96")
        axes = row.subplots(1, per_group, squeeze=False)[0]
        for ax, index in zip(axes, evenly_spaced(members, per_group).tolist() + [None] * per_group):
            ax.set_axis_off()
            if index is None:
                continue
            ax.imshow(shown.picture(index), interpolation="nearest")
            ax.set_title(caption(index), fontsize=_CAPTION_SIZE, color=shown.caption_colour(index))
    return figure


def _share(members: Tensor, total: int) -> str:
    return f"{len(members)} images ({100 * len(members) / total:.0f}%)"


def exit_figure(shown: Shown, n: int = 32) -> Figure:
    """Images grouped by the exit they left at (``exit_stage``), with their confidence at every exit reached."""
    exit_stage = shown.extras["exit_stage"]
    confidence = shown.extras.get("exit_confidence")
    exits = confidence.shape[1] if confidence is not None else int(exit_stage.max()) + 1

    def heading(stage: int, members: Tensor) -> str:
        kind = ("easy: left at the first exit" if stage == 0 else
                "hard: needed every stage" if stage == exits - 1 else "left at an intermediate exit")
        return (f"exit {stage + 1} of {exits} ({kind}): {_share(members, len(shown))}, "
                f"mean {shown.gmacs[members].mean():.3g} GMACs")

    def caption(index: int) -> str:
        if confidence is None:
            return shown.caption(index)
        reached = " ".join("–" if math.isnan(c) else f"{c:.2f}" for c in confidence[index].tolist())
        return f"{shown.caption(index)}\nconf: {reached}"

    return _grouped_figure(shown, exit_stage, heading, caption,
                           "images by exit (conf: max softmax probability at exits 1..K; –: not reached)", n)


def token_length_figure(shown: Shown, n: int = 32) -> Figure:
    """Images grouped by the number of patch tokens they were assigned (``token_length``)."""
    lengths = shown.extras["token_length"]

    def heading(length: int, members: Tensor) -> str:
        return (f"{length} tokens: {_share(members, len(shown))}, "
                f"mean {shown.gmacs[members].mean():.3g} GMACs")

    return _grouped_figure(shown, lengths, heading, shown.caption, "images by assigned token length", n)


# --------------------------------------------------------------------------------------------- compute
def gmacs_figure(shown: Shown, n: int = 32) -> Figure:
    """Left: how many images spent each amount of compute. Right: mean GMACs of each true class."""
    figure = Figure(figsize=(12, 5.2), dpi=_DPI, layout="constrained")
    figure.suptitle(_title(shown, f"executed compute over {len(shown)} images"))
    histogram, per_class = figure.subplots(1, 2, width_ratios=(3, 2))
    _draw_histogram(histogram, shown.gmacs.numpy())
    _draw_per_class(per_class, shown)
    return figure


def _draw_histogram(ax, gmacs: np.ndarray) -> None:
    values, counts = np.unique(gmacs, return_counts=True)
    if len(values) <= 12:  # a few fixed costs (exits, keep ratios): one bar per cost, not arbitrary bins
        ax.bar(values, counts, width=0.03 * values[-1], color="tab:blue")
        ax.set_xlim(0, 1.1 * values[-1])  # from zero: the saving is the distance to the dense cost
        if len(values) <= 6:
            ax.set_xticks(values, [f"{value:.3g}" for value in values])
    else:
        ax.hist(gmacs, bins=30, color="tab:blue")
    ax.axvline(gmacs.mean(), color="black", linestyle="--", linewidth=1.2, label=f"mean {gmacs.mean():.3g} GMACs")
    ax.set_xlabel(_GMACS_AXIS)
    ax.set_ylabel("images")
    ax.set_title("per-image compute", fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)


def _draw_per_class(ax, shown: Shown) -> None:
    labels, gmacs = shown.labels, shown.gmacs
    classes = labels[labels >= 0].unique()
    if len(classes) == 0:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "true classes unknown", ha="center", va="center")
        return
    means = torch.stack([gmacs[labels == c].mean() for c in classes])
    order = means.argsort(descending=True)
    title = "mean compute of each true class"
    if len(order) > _MAX_CLASS_BARS:
        half = _MAX_CLASS_BARS // 2
        order = torch.cat([order[:half], order[-half:]])
        title = f"the {half} costliest and {half} cheapest of {len(classes)} classes"
    names = [shown.class_name(int(classes[i])) for i in order]
    positions = np.arange(len(order))
    ax.barh(positions, means[order].numpy(), color="tab:orange")
    ax.set_yticks(positions, names, fontsize=9 if len(order) <= 15 else 7)
    ax.invert_yaxis()  # costliest on top
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.set_xlabel("mean GMACs per image of the class")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)


# --------------------------------------------------------------------------------------------- all of them
#: (name, extras keys of which any makes the figure meaningful (none: always), how to draw it).
FIGURE_KINDS: list[tuple[str, tuple[str, ...], Callable[[Shown, int], Figure]]] = [
    ("patches", ("kept_patches", "patch_groups"), patch_figure),
    ("exits", ("exit_stage",), exit_figure),
    ("token_length", ("token_length",), token_length_figure),
    ("gmacs", (), gmacs_figure),
]


def draw_figures(shown: Shown, n: int = 32) -> dict[str, Figure]:
    """Every figure whose extras the predictions carry, by name; image figures show about ``n`` images."""
    return {name: draw(shown, n) for name, keys, draw in FIGURE_KINDS
            if not keys or any(shown.extras.get(key) is not None for key in keys)}


def _title(shown: Shown, what: str) -> str:
    return f"{shown.title}\n{what}" if shown.title else what

