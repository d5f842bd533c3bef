"""Running an export (:mod:`.export`) with onnxruntime: :func:`load` returns an :class:`ExportedModel` whose
``predict`` gives the same :class:`~dyntok.methods.Prediction` as the model it came from, so the evaluator
and the benchmark measure it like any model.

The graphs are run by the runner the method named at export time (:mod:`dyntok.methods.export_plan`): for
DVT, ReViT and AdaViT the very function their eager ``predict`` goes through, with the onnxruntime sessions in place
of the modules; for a one-graph export, :func:`run_single_graph`.
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .._versions import __version__
from ..methods.base import Prediction
from ..methods.export_plan import GraphFn
from .export import EXPORT_FILE, FORMAT_VERSION

__all__ = ["load", "ExportedModel", "OnnxGraph", "run_single_graph", "unflatten_prediction"]


def load(directory: str | Path, budget: dict[str, Any] | None = None, threads: int | None = None) -> ExportedModel:
    """The export in ``directory``, ready to ``predict`` on CPU with onnxruntime.

    ``budget``: the budget the caller expects. Knobs the runner reads at run time (DVT's thresholds, ReViT's
    bias and grid) are set to it; a different value of a knob baked into the graphs raises ``ValueError``
    (export again at that budget). An export of another format version is refused; one made by another
    dyntok version loads with a warning. ``threads``: onnxruntime's intra-op threads (default: its own).
    """
    directory = Path(directory)
    path = directory / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a dyntok export: no {EXPORT_FILE} in it (see dyntok export)")
    metadata = json.loads(path.read_text())
    _check_versions(directory, metadata)
    graphs = {name: OnnxGraph(directory / graph["file"], threads) for name, graph in metadata["graphs"].items()}
    model = ExportedModel(metadata, graphs)
    if budget:
        model.set_budget(**budget)
    return model


def _check_versions(directory: Path, metadata: dict[str, Any]) -> None:
    made_with = metadata.get("format_version")
    if made_with != FORMAT_VERSION:
        raise ValueError(f"{directory} is a dyntok export of format {made_with} (dyntok "
                         f"{metadata.get('dyntok_version')}); this dyntok {__version__} reads format {FORMAT_VERSION}: "
                         f"export the checkpoint again")
    if metadata.get("dyntok_version") != __version__:
        warnings.warn(f"{directory} was exported by dyntok {metadata.get('dyntok_version')}, this is {__version__}",
                      stacklevel=3)


class OnnxGraph:
    """One exported graph in an onnxruntime session, called with tensors by input name (see ``GraphFn``)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        # Every graph has its own session and thread pool (AdaViT: four a block). onnxruntime's threads spin
        # after each run by default, so idle pools burned the cores the next graph (or the eager model timed
        # beside it) needed: an export that is many graphs ran slower than one that is one.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise ValueError(f"the graph needs inputs {missing}, got {sorted(inputs)}")
        feeds = {name: inputs[name].detach().cpu().contiguous().numpy() for name in self.input_names}
        outputs = self.session.run(self.output_names, feeds)
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}


class ExportedModel:
    """An export run with onnxruntime, answering the inference half of the method contract."""

    def __init__(self, metadata: dict[str, Any], graphs: Mapping[str, OnnxGraph]) -> None:
        self.metadata = metadata
        self.graphs = dict(graphs)
        self.settings = dict(metadata["settings"])
        self._runner = _resolve_runner(metadata["runner"])

    # ----------------------------------------------------------------- what the model is
    @property
    def method_name(self) -> str:
        return self.metadata["method"]

    @property
    def config(self) -> dict[str, Any]:
        return self.metadata["config"]

    @property
    def num_classes(self) -> int:
        return self.metadata["num_classes"]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.metadata["input_size"])

    @property
    def card(self) -> dict[str, Any]:
        return self.metadata["card"]

    def dense_macs(self) -> float:
        return self.metadata["dense_macs"]

    # ----------------------------------------------------------------- budget
    def get_budget(self) -> dict[str, Any]:
        runtime = {name: self.settings[name] for name in self.metadata["runtime_knobs"]}
        return {**self.metadata["budget"], **runtime}

    def set_budget(self, **knobs: Any) -> None:
        """Knobs the runner reads (``runtime_knobs``) change; a knob baked into the graphs must keep its value."""
        budget = self.get_budget()
        unknown = sorted(set(knobs) - set(budget))
        if unknown:
            raise ValueError(f"this {self.method_name} export has no budget knob {', '.join(unknown)}; "
                             f"knobs: {sorted(budget)}")
        for name, value in knobs.items():
            if name in self.metadata["runtime_knobs"]:
                self.settings[name] = value
            elif value != budget[name]:
                raise ValueError(f"this {self.method_name} export was made at {name}={budget[name]!r}, which its "
                                 f"graphs carry; for {name}={value!r} export again with --budget {name}=...")

    # ----------------------------------------------------------------- inference
    def predict(self, x: Tensor) -> Prediction:
        """Logits, per-image MACs and extras, as the eager model's ``predict`` gives them (on CPU)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_size:
            raise ValueError(f"this export takes images of shape (batch, {', '.join(map(str, self.input_size))}), "
                             f"got {tuple(x.shape)}")
        return self._runner(self.graphs, self.settings, x.detach().float().cpu())

    def eval(self) -> ExportedModel:
        """Always in inference mode (for callers that put any model in eval mode)."""
        return self

    def to(self, device: str | torch.device) -> ExportedModel:
        """Runs on CPU, whatever ``device`` the caller has: inputs are moved there by :meth:`predict`."""
        return self


def _resolve_runner(reference: str) -> Callable[..., Any]:
    """The ``module:function`` an export names; only dyntok's own modules (metadata is data, not code)."""
    module_name, _, function = reference.partition(":")
    if not module_name.startswith("dyntok.") or not function:
        raise ValueError(f"an export's runner must be a dyntok function 'dyntok.module:function', got {reference!r}")
    return getattr(importlib.import_module(module_name), function)


def unflatten_prediction(outputs: Mapping[str, Tensor]) -> Prediction:
    """The prediction that :func:`~dyntok.methods.export_plan.flatten_prediction` flattened into graph outputs."""
    extras: dict[str, Any] = {}
    for name, value in outputs.items():
        if not name.startswith("extras."):
            continue
        key, _, index = name[len("extras."):].partition(".")
        if index:
            extras.setdefault(key, []).append(value)  # outputs keep their flattened order
        else:
            extras[key] = value
    return Prediction(outputs["logits"], outputs["macs"].double(), extras)


def run_single_graph(graphs: Mapping[str, GraphFn], settings: dict[str, Any], images: Tensor) -> Prediction:
    """The runner of a one-graph export (:func:`~dyntok.methods.export_plan.single_graph_plan`): the method's
    ``predict`` was the graph, so one call and the prediction rebuilt from its outputs."""
    return unflatten_prediction(graphs["predict"](images=images))
