"""What a training run keeps besides the model: the optimiser's state as plain tensors, and the check that a
dense model can start (``--init``) the model being trained."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..fileio import CheckpointError
from ..methods.registry import config_mismatch

__all__ = ["check_dense_init", "optimizer_state_to_tensors", "optimizer_state_from_tensors"]

#: Backbone settings that change training but not the weights' shapes: a dense model may differ in them.
_TRAINING_ONLY = ("drop_path_rate", "drop_rate")


def check_dense_init(dense: nn.Module, model: nn.Module, source: str | Path) -> None:
    """A ``ValueError`` naming every difference when ``dense`` cannot initialise ``model`` (``--init``)."""
    if dense.config["method"] != "dense":
        raise CheckpointError(f"--init {source} is a {dense.config['method']} model; it must be a dense model of "
                              f"the same backbone (train one with --method dense)")
    found = {**dense.config, "method": model.config["method"], "method_kwargs": {}}
    expected = {**model.config, "method_kwargs": {}}
    for config in (found, expected):
        config["backbone"] = {**config["backbone"], "overrides": {key: value for key, value in
                                                                  config["backbone"]["overrides"].items()
                                                                  if key not in _TRAINING_ONLY}}
    differences = config_mismatch(found, expected)
    if differences:
        raise CheckpointError(f"--init {source} was trained for another backbone ({differences}); start from a "
                              f"dense model with the same backbone settings")


def optimizer_state_to_tensors(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able skeleton (no pickle needed)."""
    tensors, skeleton = {}, {}
    for index, param_state in state["state"].items():
        entry = {}
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                entry[key] = value
        skeleton[str(index)] = entry
    return tensors, {"state": skeleton, "param_groups": state["param_groups"]}


def optimizer_state_from_tensors(tensors: dict[str, Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_tensors`."""
    state: dict[int, dict[str, Any]] = {int(index): dict(entry) for index, entry in skeleton["state"].items()}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": skeleton["param_groups"]}
