"""Evaluation: accuracy and MACs are measured in the same arithmetic as speed."""
from __future__ import annotations

import contextlib

import torch

from dyntok import evaluation
from dyntok.measure.speed import precision

from .conftest import tiny_model


def test_predictions_run_in_the_context_speed_is_timed_in(monkeypatch, images, labels):
    entered, inside = [], []

    @contextlib.contextmanager
    def recording_context(device):
        entered.append(device)
        inside.append(True)
        yield
        inside.pop()

    monkeypatch.setattr(evaluation, "inference_context", recording_context)
    model = tiny_model("dvt")
    predict = model.predict

    def checked_predict(x):
        assert inside, "predict ran outside the inference context"
        return predict(x)

    model.predict = checked_predict
    result = evaluation.evaluate(model, [(images, labels), (images, labels)], "cpu", progress=False)
    assert entered == [torch.device("cpu")] and result.num_images == 2 * len(images)
    assert result.summary()["precision"] == "float32"
    assert precision("cuda:0") == "bfloat16 autocast"
