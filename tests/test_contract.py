"""Every registered method fulfils the contract: parametrised over the registry, like timm's model tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dyntok
from dyntok.methods import load_model, save_model
from dyntok.measure.macs import count_macs_with_torch

from .conftest import TINY, tiny_model

METHODS = dyntok.list_methods()
criterion = nn.CrossEntropyLoss()


def test_dense_is_registered_first():
    assert METHODS[0] == "dense"


@pytest.mark.parametrize("method", METHODS)
def test_training_forward_backward_reaches_every_parameter(method, images, labels):
    model = tiny_model(method).train()
    output = model(images)
    loss = model.compute_loss(output, labels, criterion)
    assert torch.isfinite(loss.total)
    assert loss.terms and all(isinstance(value, float) for value in loss.terms.values())
    loss.total.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("method", METHODS)
def test_predict_returns_logits_and_per_image_macs(method, images):
    model = tiny_model(method).eval()
    prediction = model.predict(images)
    assert prediction.logits.shape == (len(images), TINY["num_classes"])
    assert prediction.macs.shape == (len(images),) and prediction.macs.dtype == torch.float64
    assert torch.isfinite(prediction.logits).all()
    assert (prediction.macs > 0).all() and (prediction.macs <= model.dense_macs() * 1.0001).all()


@pytest.mark.parametrize("method", METHODS)
def test_reported_macs_match_torch_flop_counter_one_image_at_a_time(method, images):
    model = tiny_model(method).eval()
    for image in images[:2]:
        batch = image.unsqueeze(0)
        reported = model.predict(batch).macs.item()
        counted = count_macs_with_torch(model.predict, batch)
        assert reported == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_bit_exact(method, images, tmp_path):
    model = tiny_model(method).eval()
    path = save_model(model, tmp_path / "model.safetensors")
    loaded = load_model(path).eval()
    assert loaded.config == model.config and loaded.get_budget() == model.get_budget()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(model.predict(images).logits, loaded.predict(images).logits)


@pytest.mark.parametrize("method", METHODS)
def test_budget_sweep_points_are_settable(method, images, labels):
    model = tiny_model(method).eval()
    model.calibrate([(images, labels), (images.flip(0), labels)])  # methods with fitted knobs need data first
    for point in model.budget_sweep():
        model.set_budget(**point)
        assert model.predict(images).logits.shape[0] == len(images)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_budget_knob_is_rejected(method):
    with pytest.raises(ValueError):
        tiny_model(method).set_budget(no_such_knob=1)


@pytest.mark.parametrize("method", METHODS)
def test_param_groups_cover_every_trainable_parameter_once(method):
    model = tiny_model(method)
    for phase in model.training_phases():
        model.set_phase(phase.name)
        grouped = [p for group in model.param_groups(0.05) for p in group["params"]]
        assert len(grouped) == len({id(p) for p in grouped})
        assert all("lr_scale" in group for group in model.param_groups(0.05))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_methods_start_from_a_dense_checkpoint(method):
    dense = tiny_model("dense")
    model = tiny_model(method)
    model.init_from_dense(dense.state_dict())


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_what_starting_and_training_settle_is_saved_and_rebuilt(method, images, tmp_path):
    """``init_from_dense`` and ``begin_training`` may settle options (EViT's keep-rate schedule, ToMe's
    proportional attention): the saved config rebuilds that very model, and a resumed run settles the same."""
    def started_for_training():
        model = tiny_model(method)
        model.init_from_dense(tiny_model("dense").state_dict())
        model.begin_training()
        return model.eval()

    model = started_for_training()
    assert started_for_training().config == model.config
    loaded = load_model(save_model(model, tmp_path / "model.safetensors")).eval()
    assert loaded.config == model.config
    assert torch.equal(model.predict(images).logits, loaded.predict(images).logits)


@pytest.mark.parametrize("method", METHODS)
def test_every_exit_gives_logits_for_every_image(method, images):
    exits = tiny_model(method).eval().predict_all_exits(images)
    assert exits and all(logits.shape == (len(images), TINY["num_classes"]) for logits in exits)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 16, 16), (3, 16, 16)], ids=str)
def test_wrong_input_shapes_get_a_clear_error(method, shape):
    model = tiny_model(method)
    for call in (model.eval().predict, model.train().forward):
        with pytest.raises(ValueError, match=r"takes images of shape \(batch, 3, 16, 16\)"):
            call(torch.randn(shape))
