"""``dyntok.export``: a model at a fixed budget as ONNX graphs plus ``export.json``, the metadata that
:func:`dyntok.runtime.load` needs to run them exactly as the model's ``predict`` does.

Graphs are captured with ``torch.onnx.export(dynamo=True)`` (``torch.export`` underneath), not the older
TorchScript tracer. The tracer records whatever path the example batch took, so a ``predict`` with a
data-dependent branch would export silently wrong; ``torch.export`` refuses such a branch, and dyntok turns
that refusal into :class:`ExportError` naming the method and budget. (The tracer also fails outright on
DynamicViT's boolean scatter.) Weights are stored inside each ``.onnx`` file.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._versions import __version__
from ..methods.export_plan import ExportPlan, Graph

__all__ = ["export", "ExportError", "EXPORT_FILE", "FORMAT_VERSION", "OPSET"]

#: The metadata file of an export directory.
EXPORT_FILE = "export.json"
#: Bumped whenever what a runner expects of the graphs or of the metadata changes.
FORMAT_VERSION = 1
#: The ONNX opset the graphs are written in (onnxruntime 1.16 and later run it).
OPSET = 18


class ExportError(ValueError):
    """A model, or one of its options, that cannot be exported (the message says which and why)."""


def export(model: nn.Module, out: str | Path, budget: dict[str, Any] | None = None,
           card: dict[str, Any] | None = None, format: str = "onnx") -> Path:
    """Export ``model`` at ``budget`` (default: its current one) into the directory ``out``.

    Writes one ``<graph>.onnx`` per graph of the model's :meth:`~dyntok.methods.AdaptiveViT.export_plan` and
    ``export.json``: method, config, budget, runner and its settings, the graphs' inputs and outputs, the
    dyntok and torch versions, and ``card`` (a model card, e.g. the checkpoint's). Returns ``out``.
    The model's own budget is left as it was.
    """
    if format != "onnx":
        raise ExportError(f"unknown export format {format!r}; dyntok exports 'onnx'")
    _require("onnx")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    was_training, previous = model.training, model.get_budget()
    model.eval()
    try:
        if budget:
            model.set_budget(**budget)
        plan = model.export_plan(_example_images(model))
        metadata = _metadata(model, plan, card)
        for name, graph in plan.graphs.items():
            what = f"{model.method_name} at budget {model.get_budget()}"
            _export_graph(graph, out / f"{name}.onnx", what)
            _check_and_stamp(out / f"{name}.onnx", metadata, what)
    finally:
        model.set_budget(**previous)
        model.train(was_training)
    (out / EXPORT_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def _example_images(model: nn.Module) -> torch.Tensor:
    """Two images (a batch of one would let the exporter fix the batch axis at 1)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, *model.input_size, generator=generator).to(device)


def _export_graph(graph: Graph, path: Path, what: str) -> None:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals, not the user's business
            torch.onnx.export(graph.module, graph.example_inputs, str(path), dynamo=True, verbose=False,
                              input_names=list(graph.input_names), output_names=list(graph.output_names),
                              dynamic_shapes=graph.dynamic_shapes(),
                              opset_version=OPSET, external_data=False,
                              custom_translation_table=_translations())
    except Exception as error:  # the exporter's errors are many types; all mean "this cannot export"
        raise ExportError(f"{what} cannot be exported as ONNX graph {path.stem!r}: {_cause(error)}") from error


def _cause(error: Exception) -> str:
    """The line of the exporter's long report that says what failed (its summary, else its first line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith("<class ")]
    cause = (summary[0].split(">: ", 1)[-1] if summary else lines[0]) if lines else type(error).__name__
    if "data-dependent" in cause or "GuardOnDataDependent" in cause:
        cause += (" (predict takes a path that depends on the images: such a method needs its own export_plan, "
                  "see docs/deploy.md)")
    return cause


def _translations() -> dict:
    """ONNX for the aten ops dyntok uses that the exporter cannot translate by itself.

    ``sort(stable=True)`` (ToMe's and EViT's rankings): ONNX ``TopK`` over the whole axis sorts the same way,
    ties in index order (guaranteed by the ONNX spec since opset 11), which is exactly a stable sort.
    """
    from onnxscript import opset18 as op

    def stable_sort(self, stable: bool | None = None, dim: int = -1, descending: bool = False):
        length = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim)), op.Constant(value_ints=[1]))
        return op.TopK(self, length, axis=dim, largest=descending, sorted=True)

    return {torch.ops.aten.sort.stable: stable_sort}


def _metadata(model: nn.Module, plan: ExportPlan, card: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION, "dyntok_version": __version__, "torch_version": torch.__version__,
        "opset": OPSET, "method": model.method_name, "config": model.config, "budget": model.get_budget(),
        "num_classes": model.num_classes, "input_size": list(model.input_size), "dense_macs": model.dense_macs(),
        "runner": plan.runner, "settings": plan.settings, "runtime_knobs": list(plan.runtime_knobs),
        "graphs": {name: {"file": f"{name}.onnx", "inputs": list(graph.input_names),
                          "outputs": list(graph.output_names)} for name, graph in plan.graphs.items()},
        "card": card or {},
    }


def _check_and_stamp(path: Path, metadata: dict[str, Any], what: str) -> None:
    """Refuse a graph whose batch axis came out fixed, and write the method, budget and versions into the ONNX
    file's own ``metadata_props`` (seen by any ONNX tool)."""
    import onnx

    graph = onnx.load(str(path))
    fixed = [value.name for value in [*graph.graph.input, *graph.graph.output]
             if not value.type.tensor_type.shape.dim[0].dim_param]
    if fixed:
        # torch.onnx falls back to a fixed size rather than fail when the code makes the batch a Python int.
        path.unlink()
        raise ExportError(f"{what} cannot be exported as ONNX graph {path.stem!r} with a dynamic batch: {fixed} came "
                          f"out with a fixed batch size, because the code turns the batch size into a Python number "
                          f"(len(tensor), int(...)); use tensor.shape[0]")
    stamps = {"dyntok.method": metadata["method"], "dyntok.budget": json.dumps(metadata["budget"]),
              "dyntok.version": metadata["dyntok_version"], "dyntok.format_version": str(FORMAT_VERSION)}
    del graph.metadata_props[:]
    for key, value in stamps.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def _require(package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ExportError(f"exporting needs the {package!r} package: pip install 'dyntok[deploy]'")
