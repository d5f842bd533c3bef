"""Export and runtime (dyntok.deploy): every registered method exported from a tiny model gives, under
onnxruntime, the eager model's prediction: logits to 1e-4, the same per-image MACs, the same exits, lengths
and kept tokens. Plus budgets in milliseconds on a fake clock."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import dyntok
from dyntok.cli import main
from dyntok.deploy.export import EXPORT_FILE, ExportError
from dyntok.measure.latency_budget import fit_latency_budget
from dyntok.methods.dense import DenseViT
from dyntok.runtime import load

from .conftest import TINY, tiny_model
from .test_adavit import spread_decisions

pytest.importorskip("onnxruntime", reason="the deploy extra (onnx, onnxruntime, onnxscript) is not installed")

METHODS = dyntok.list_methods()
#: Two blocks instead of four: exporting is the slow part of these tests, and it grows with the graph.
SHALLOW = dict(depth=2)


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(8, 3, TINY["img_size"], TINY["img_size"])


def model_with_mixed_decisions(method: str, images: torch.Tensor):
    """A tiny model at a budget where the images take different paths, none of them on a knife edge (a 1e-7
    difference between onnxruntime and torch must not flip an exit or a length)."""
    model = tiny_model(method, **SHALLOW).eval()
    if method == "dvt":
        confidences = torch.stack([logits.softmax(-1).amax(-1) for logits in model.predict_all_exits(images)], 1)
        model.set_budget(thresholds=[_threshold_between(confidences[:, k]) for k in range(confidences.shape[1] - 1)])
    elif method == "revit":
        model.set_budget(bias=_mixing_bias(model.assigner(images)))
    elif method == "adavit":
        model.set_budget(**_thresholds_between_scores(spread_decisions(model), images))
    return model


def _threshold_between(confidences: torch.Tensor) -> float:
    """Midway between the two middle confidences: about half the images leave, none within 1e-5 of it."""
    ordered = confidences.sort().values
    middle = len(ordered) // 2
    assert ordered[middle] - ordered[middle - 1] > 1e-5
    return ((ordered[middle - 1] + ordered[middle]) / 2).item()


#: Where each AdaViT threshold goes among the scores of the test images (quantiles). In the tiny model each
#: head's and each sub-block's scores form a cluster of their own; 0.25 lands inside the lower one, so that
#: images differ in their head sets and in whether they run the MLP, not only in their patches.
ADAVIT_QUANTILES = {"patch": 0.5, "head": 0.25, "block": 0.25}


def _thresholds_between_scores(model, images: torch.Tensor, quantiles: dict[str, float] = ADAVIT_QUANTILES,
                               margin: float = 1e-5) -> dict[str, float]:
    """AdaViT thresholds near ``quantiles`` of the scores the images give, each in the widest gap
    there, so that no score is within ``margin`` of its threshold. Later blocks score what earlier thresholds
    left them: repeated until the scores at these thresholds keep the margin."""
    for attempt in range(5):
        model.calibrate([(images, None)])
        scores = model._held_out_scores
        if attempt and all((values - model.thresholds[name]).abs().min() > margin for name, values in scores.items()):
            return model.get_budget()
        knobs = {}
        for name, values in scores.items():
            quantile = quantiles[name]
            window = values[int(len(values) * (quantile - 0.15)):int(len(values) * (quantile + 0.15)) + 1]
            widest = (window[1:] - window[:-1]).argmax()
            knobs[f"{name}_threshold"] = ((window[widest] + window[widest + 1]) / 2).item()
        model.set_budget(**knobs)
    raise AssertionError("no AdaViT thresholds keep every score of these images clear of them")


def _mixing_bias(assigner_logits: torch.Tensor) -> float:
    """A bias under which the assigner picks more than one length, every choice by a clear margin."""
    steps = torch.arange(assigner_logits.shape[1], dtype=torch.float32)
    for bias in torch.linspace(-3, 3, 601).tolist():
        biased = assigner_logits + bias * steps
        top2 = biased.topk(2, dim=1).values
        if biased.argmax(1).unique().numel() > 1 and (top2[:, 0] - top2[:, 1]).min() > 1e-4:
            return bias
    raise AssertionError("no bias mixes the lengths of these images")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, test_images):
    """Each exportable method exported once for the module: name -> (eager model, export directory)."""
    made = {}

    def exported(method: str):
        if method not in made:
            model = model_with_mixed_decisions(method, test_images)
            made[method] = model, dyntok.export(model, tmp_path_factory.mktemp(method))
        return made[method]

    return exported


def assert_same_prediction(eager, exported):
    torch.testing.assert_close(exported.logits, eager.logits, rtol=0, atol=1e-4)
    assert exported.macs.dtype == torch.float64 and torch.equal(exported.macs, eager.macs)
    assert sorted(exported.extras) == sorted(eager.extras)
    for key, value in eager.extras.items():
        for mine, theirs in zip(*(v if isinstance(v, list) else [v] for v in (exported.extras[key], value))):
            if theirs.is_floating_point():
                torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4, equal_nan=True)
            else:
                assert torch.equal(mine, theirs), key


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
@pytest.mark.parametrize("method", METHODS)
def test_onnxruntime_predicts_like_eager(method, exports, test_images):
    model, directory = exports(method)
    runtime = load(directory)
    for batch in (test_images, test_images[:1], test_images[3:6]):
        assert_same_prediction(model.predict(batch), runtime.predict(batch))
    assert runtime.get_budget() == model.get_budget() and runtime.dense_macs() == model.dense_macs()


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_the_parity_budgets_take_different_paths(exports, test_images):
    """The exits, lengths and AdaViT decisions compared above really differ between images."""
    dvt, revit, adavit = (load(exports(method)[1]).predict(test_images) for method in ("dvt", "revit", "adavit"))
    assert dvt.extras["exit_stage"].unique().numel() > 1
    assert revit.extras["token_length"].unique().numel() > 1
    # AdaViT: images differ in how many patches each block runs, in the heads and in the sub-blocks they run.
    for patches in adavit.extras["kept_patches"]:
        assert patches.sum(dim=1).unique().numel() > 2
    assert adavit.extras["kept_heads"][1].unique(dim=0).shape[0] > 1
    assert adavit.extras["kept_blocks"][:, 1].unique(dim=0).shape[0] > 1


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_adavit_thresholds_change_at_load_like_the_eager_budget(exports, test_images):
    """The thresholds are read by the runner: at 0 every block keeps everything (the plain-block graphs)."""
    model, directory = exports("adavit")
    keep_everything = {knob: 0.0 for knob in model.get_budget()}
    runtime = load(directory, budget=keep_everything)
    made_at = load(directory).get_budget()
    model.set_budget(**keep_everything)
    try:
        prediction = runtime.predict(test_images)
        assert_same_prediction(model.predict(test_images), prediction)
        assert prediction.extras["kept_blocks"].all()
        # No decision could skip anything, so none is taken: the backbone's MACs, without the policies'.
        backbone = model.dense_macs() - sum(policy.macs(model.num_patches) for policy in model.block_policies())
        torch.testing.assert_close(prediction.macs, torch.full_like(prediction.macs, backbone))
    finally:
        model.set_budget(**made_at)


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
@pytest.mark.parametrize("quantiles", [
    {"patch": 0.5, "head": 0.75, "block": 0.75},  # images keeping no head, images skipping attention
    {"patch": 0.7, "head": 0.5, "block": 0.1},  # a third of the patches kept: padded attention groups
], ids=["no-heads", "few-patches"])
def test_adavit_export_follows_other_mixes_of_decisions(quantiles, exports, test_images):
    model, directory = exports("adavit")
    made_at = load(directory).get_budget()
    try:
        budget = _thresholds_between_scores(model, test_images, quantiles)
        runtime = load(directory, budget=budget)
        for batch in (test_images, test_images[2:7]):
            assert_same_prediction(model.predict(batch), runtime.predict(batch))
    finally:
        model.set_budget(**made_at)


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_a_predict_with_per_image_paths_is_refused_not_exported_wrong(tmp_path):
    class BranchesOnImages(DenseViT):
        def predict(self, x):
            prediction = super().predict(x)
            if prediction.logits.mean() > 0:  # a path that depends on the images: one graph cannot follow it
                prediction.macs = prediction.macs * 2
            return prediction

    torch.manual_seed(0)
    model = BranchesOnImages(dyntok.create_model("vit_cifar_tiny", **{**TINY, **SHALLOW}).backbone_spec)
    with pytest.raises(ExportError, match="depends on the images"):
        dyntok.export(model, tmp_path)


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_a_batch_made_a_python_number_is_refused(tmp_path):
    class BatchAsInt(DenseViT):
        def predict(self, x):
            prediction = super().predict(x)
            prediction.macs = torch.full((len(x),), self.dense_macs(), dtype=torch.float64)  # len(): a fixed size
            return prediction

    torch.manual_seed(0)
    model = BatchAsInt(dyntok.create_model("vit_cifar_tiny", **{**TINY, **SHALLOW}).backbone_spec)
    with pytest.raises(ExportError, match="fixed batch size"):
        dyntok.export(model, tmp_path)
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_runtime_knobs_change_at_load_like_the_eager_budget(exports, test_images):
    model, directory = exports("dvt")
    everyone_first = {"thresholds": [0.0] * (len(model.stages) - 1)}
    runtime = load(directory, budget=everyone_first)
    model.set_budget(**everyone_first)
    try:
        assert_same_prediction(model.predict(test_images), runtime.predict(test_images))
        assert (runtime.predict(test_images).extras["exit_stage"] == 0).all()
    finally:
        model.set_budget(**load(directory).get_budget())


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_loading_for_another_baked_budget_says_so(exports):
    _, directory = exports("dynamicvit")
    with pytest.raises(ValueError, match="made at keep_ratio=0.7.*export again"):
        load(directory, budget={"keep_ratio": 0.5})
    with pytest.raises(ValueError, match="no budget knob thresholds"):
        load(directory, budget={"thresholds": [0.5]})
    assert load(directory, budget={"keep_ratio": 0.7}).get_budget() == {"keep_ratio": 0.7}


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_another_format_is_refused_and_another_version_warned(exports, tmp_path):
    _, directory = exports("dense")
    copy = shutil.copytree(directory, tmp_path / "copy")
    metadata = json.loads((copy / EXPORT_FILE).read_text())
    (copy / EXPORT_FILE).write_text(json.dumps({**metadata, "dyntok_version": "0.0.1"}))
    with pytest.warns(UserWarning, match="exported by dyntok 0.0.1"):
        load(copy)
    (copy / EXPORT_FILE).write_text(json.dumps({**metadata, "format_version": 99}))
    with pytest.raises(ValueError, match="format 99.*export the checkpoint again"):
        load(copy)


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_onnx_files_carry_method_budget_and_version(exports):
    import onnx

    model, directory = exports("dynamicvit")
    props = {prop.key: prop.value for prop in onnx.load(str(directory / "predict.onnx")).metadata_props}
    assert props["dyntok.method"] == "dynamicvit" and json.loads(props["dyntok.budget"]) == model.get_budget()
    assert props["dyntok.version"] == dyntok.__version__


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_export_leaves_the_models_budget_alone(tmp_path):
    model = tiny_model("dynamicvit", keep_ratio=0.6, **SHALLOW)
    dyntok.export(model, tmp_path, budget={"keep_ratio": 0.9})
    assert model.get_budget() == {"keep_ratio": 0.6} and load(tmp_path).get_budget() == {"keep_ratio": 0.9}


def test_the_thin_face_loads_export_and_runtime_on_first_use():
    from dyntok.deploy.export import export

    assert dyntok.export is export and dyntok.runtime.load is load


def test_unknown_format_and_non_exports_are_clear_errors(tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        dyntok.export(tiny_model(), tmp_path, format="tflite")
    with pytest.raises(FileNotFoundError, match="not a dyntok export"):
        load(tmp_path)


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_cli_export_at_a_budget_then_load(tmp_path, capsys, test_images):
    model = tiny_model("dynamicvit", **SHALLOW)
    dyntok.save_model(model, tmp_path / "model.safetensors")
    code = main(["export", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "onnx"),
                 "--budget", "keep_ratio=0.5"])
    assert code == 0 and "exported dynamicvit" in capsys.readouterr().out
    model.set_budget(keep_ratio=0.5)
    assert_same_prediction(model.eval().predict(test_images), load(tmp_path / "onnx").predict(test_images))


@pytest.mark.slow  # exports: 10-50 s each on a busy 2-core machine
def test_cli_eval_on_onnxruntime(image_folder, tmp_path):
    model = dyntok.create_model("dynamicvit_vit_cifar_tiny", **{**TINY, **SHALLOW, "num_classes": 3},
                                keep_ratio=0.5)
    dyntok.save_model(model, tmp_path / "model.safetensors")
    reports = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        assert main(["eval", str(tmp_path / "model.safetensors"), "--dataset", str(image_folder), "--holdout-size",
                     "0", "--backend", backend, "--no-speed", "--no-progress", "--output", str(out)]) == 0
        reports[backend] = json.loads(out.read_text())
    for key in ("top1", "mean_gmacs", "dense_gmacs", "budget"):
        assert reports["onnxruntime"][key] == reports["torch"][key]


# --------------------------------------------------------------------------------------------- budgets in ms
def macs_clock(predict, batches) -> float:
    """A fake clock: one millisecond per 1e6 MACs executed (real work, no timing noise)."""
    return sum(predict(batch).macs.sum().item() for batch in batches) / len(batches) / 1e6


@pytest.mark.parametrize("method", ["dynamicvit", "dvt", "revit"])
def test_calibrate_latency_lands_at_the_target_on_a_fake_clock(method, test_images):
    model = model_with_mixed_decisions(method, test_images)
    loader = [(test_images[:4], None), (test_images[4:], None)]
    model.calibrate(loader)  # DVT's sweep is fitted on held-out confidences
    budgets = [{**model.get_budget(), **point} for point in model.budget_sweep()]
    times = []
    for point in budgets:
        model.set_budget(**point)
        times.append(macs_clock(model.predict, test_images[:2].split(1)))
    target = (min(times) + max(times)) / 2
    fitted = model.calibrate_latency(loader, target, batch_size=1, timer=macs_clock)
    reached = macs_clock(model.predict, test_images[:4].split(1))
    assert fitted == model.get_budget() and reached <= target
    # The sweep's own points are at most this far apart; bisection between them closes most of the gap.
    assert reached >= target - (max(times) - min(times)) / 2


def test_a_latency_below_every_budget_is_refused(test_images):
    model = tiny_model("dynamicvit")
    with pytest.raises(ValueError, match="no budget of dynamicvit meets 0.001 ms at batch 1"):
        model.calibrate_latency([(test_images, None)], 0.001, timer=macs_clock)


@pytest.mark.parametrize("batch_size, batches", [(1, 32), (8, 4), (3, 11)])
def test_each_budget_is_timed_on_enough_images_to_average_content(batch_size, batches):
    """At batch 1 a few images misjudge a method whose cost follows content: at least 32 images, in at least 4
    whole batches, are timed per budget (fewer when fewer are given)."""
    seen = []

    def counting_clock(predict, timed):
        seen.append([len(batch) for batch in timed])
        return macs_clock(predict, timed)

    model = tiny_model("dynamicvit")
    images = torch.randn(40, 3, TINY["img_size"], TINY["img_size"])
    model.calibrate_latency([(images, None)], 1e9, batch_size=batch_size, timer=counting_clock)
    assert seen and all(sizes == [batch_size] * batches for sizes in seen)


class _BiasAndGrid:
    """A stand-in for ReViT's knobs: a number, and a grid that is either chosen per image (None) or fixed."""

    method_name = "bias-and-grid"

    def __init__(self) -> None:
        self.budget = {"bias": 0.0, "grid": None}

    def budget_sweep(self):
        return [{"bias": -1.0, "grid": None}, {"bias": 0.0, "grid": None}, {"bias": 0.0, "grid": 8},
                {"bias": 1.0, "grid": None}]

    def get_budget(self):
        return dict(self.budget)

    def set_budget(self, **knobs):
        self.budget = knobs

    def predict(self, images):  # the fake clock below reads the budget, not the images
        return None

    def milliseconds(self) -> float:
        return 5.5 if self.budget["grid"] == 8 else 4.0 + 3.0 * self.budget["bias"]


def test_refining_steps_over_a_budget_it_cannot_blend_with():
    """Between the slowest budget within the target (bias 0: 4 ms) and the next slower one (a fixed grid: 5.5 ms)
    there is no line; the fit refines towards the next one it can blend with (bias 1: 7 ms) instead."""
    model = _BiasAndGrid()
    fitted = fit_latency_budget(model, torch.zeros(32, 1), 5.0, timer=lambda predict, batches: model.milliseconds())
    assert fitted["grid"] is None and 0.25 < fitted["bias"] <= 1 / 3


def test_calibrated_dynamicvit_keep_ratio_is_between_sweep_points(test_images):
    model = tiny_model("dynamicvit")
    model.set_budget(keep_ratio=0.6)
    low = macs_clock(model.predict, [test_images[:1]])
    model.set_budget(keep_ratio=0.7)
    high = macs_clock(model.predict, [test_images[:1]])
    assume_gap = high > low
    assert assume_gap
    fitted = model.calibrate_latency([(test_images, None)], (low + high) / 2, timer=macs_clock)
    assert 0.6 <= fitted["keep_ratio"] < 0.7 and not math.isclose(fitted["keep_ratio"], 0.6)


# --------------------------------------------------------------------------------------------- per-call overhead
@pytest.mark.parametrize("method", dyntok.list_methods())
def test_without_explanations_predict_gives_the_same_logits_and_macs(method, images):
    model = tiny_model(method).eval()
    explained = model.predict(images)
    model.explain = False
    plain = model.predict(images)
    assert torch.equal(plain.logits, explained.logits) and torch.equal(plain.macs, explained.macs)
    patch_records = {"kept_patches", "patch_groups"}
    assert not patch_records & set(plain.extras)
    assert set(plain.extras) <= set(explained.extras)


def test_dynamicvit_counts_its_macs_once_per_budget(images, monkeypatch):
    from dyntok.methods import dynamicvit

    model = tiny_model("dynamicvit").eval()
    calls = []
    monkeypatch.setattr(dynamicvit, "vit_macs", lambda *args: calls.append(args) or 1.0)
    for _ in range(3):
        model.predict(images)
    model.set_budget(keep_ratio=0.5)
    model.predict(images)
    assert len(calls) == 2


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_token_reducers_count_macs_once_per_budget(method, images, monkeypatch):
    model = tiny_model(method).eval()
    computed = []
    original = model.per_budget
    monkeypatch.setattr(model, "per_budget", lambda name, compute, *key: original(
        name, lambda: computed.append(name) or compute(), *key))
    first = model.predict(images).macs
    assert torch.equal(model.predict(images).macs, first) and computed == ["macs"]
