"""What a method hands to the exporter: its graphs, and the function that runs them like the method does.

A method with no per-image control flow (dense, DynamicViT, EViT, ToMe at a fixed budget) is one graph: its
own :meth:`~dyntok.methods.AdaptiveViT.predict`, traced with a dynamic batch axis, whose outputs are the
:class:`~dyntok.methods.Prediction` flattened (:func:`flatten_prediction`). A method whose images take
different paths (DVT's exits, ReViT's lengths, AdaViT's kept patches, heads and blocks) exports the pieces
between its decisions as graphs, and names a *runner*: a function of its own module that takes the decisions
exactly as its ``predict`` does, calling the graphs instead of its sub-modules (both go through the same code,
so they cannot drift apart).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Axis", "BATCH", "Graph", "ExportPlan", "GraphFn", "PredictGraph", "flatten_prediction", "single_graph_plan"]

#: A graph as a runner sees it: called with tensors by input name (it takes those it declares), returns its
#: outputs by name.
GraphFn = Callable[..., Mapping[str, Tensor]]


@dataclass(frozen=True)
class Axis:
    """A dynamic axis of a graph's inputs: inputs whose axes share a ``name`` share its size, from ``min`` to
    ``max``. The example inputs must hold it at 2 or more (the exporter fixes an axis it sees at 0 or 1)."""

    name: str
    min: int = 1
    max: int = 1 << 16


#: The batch axis, the default dynamic axis of every input.
BATCH = Axis("batch")


@dataclass
class Graph:
    """One module to export: ``module(*example_inputs)`` returns a tuple of tensors named ``output_names``.

    ``dynamic_axes``: per input, its dynamic axes by position; default :data:`BATCH` on axis 0 of every
    input. Axis 0 of every input and output must come out dynamic (the exporter checks).
    """

    module: nn.Module
    example_inputs: tuple[Tensor, ...]
    input_names: Sequence[str]
    output_names: Sequence[str]
    dynamic_axes: Sequence[Mapping[int, Axis]] | None = None

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """``torch.export``'s ``dynamic_shapes``: one ``Dim`` per axis name."""
        axes = self.dynamic_axes or tuple({0: BATCH} for _ in self.example_inputs)
        dims = {axis.name: torch.export.Dim(axis.name, min=axis.min, max=axis.max)
                for spec in axes for axis in spec.values()}
        return tuple({position: dims[axis.name] for position, axis in spec.items()} for spec in axes)


@dataclass
class ExportPlan:
    """The graphs of a method at its current budget and how to run them.

    ``runner`` is ``"module:function"`` inside dyntok, called as ``function(graphs, settings, images)`` with
    ``graphs`` a name -> :data:`GraphFn` mapping; it returns a :class:`~dyntok.methods.Prediction`.
    ``settings`` (plain JSON) is everything else the runner needs: thresholds, MACs of each path...
    ``runtime_knobs`` are the budget knobs the runner reads from ``settings`` rather than the graphs carrying
    them, so a loaded export can change them; any other knob is baked into the graphs.
    """

    graphs: dict[str, Graph]
    runner: str = "dyntok.deploy.runtime:run_single_graph"
    settings: dict[str, Any] = field(default_factory=dict)
    runtime_knobs: tuple[str, ...] = ()


class PredictGraph(nn.Module):
    """A method's ``predict`` as a module returning the flattened prediction (see :func:`flatten_prediction`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(flatten_prediction(self.model.predict(images)).values())


def flatten_prediction(prediction) -> dict[str, Tensor]:
    """``logits``, ``macs`` and every tensor extra by name: ``extras.KEY``, or ``extras.KEY.I`` for list items
    (:func:`dyntok.deploy.runtime.unflatten_prediction` rebuilds the prediction)."""
    flat = {"logits": prediction.logits, "macs": prediction.macs}
    for key, value in prediction.extras.items():
        if isinstance(value, Tensor):
            flat[f"extras.{key}"] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(item, Tensor) for item in value):
            flat.update({f"extras.{key}.{index}": item for index, item in enumerate(value)})
        else:
            raise ValueError(f"extras[{key!r}] is a {type(value).__name__}: only tensors and lists of tensors export")
    return flat


def single_graph_plan(model: nn.Module, example_images: Tensor) -> ExportPlan:
    """The whole ``predict`` as one graph named ``predict``."""
    with torch.no_grad():
        names = tuple(flatten_prediction(model.predict(example_images)))
    return ExportPlan({"predict": Graph(PredictGraph(model), (example_images,), ("images",), names)})
