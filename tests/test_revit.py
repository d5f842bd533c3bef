"""ReViT + Token-Length Assigner: lengths equal the dense model, grouped inference, labels, assigner, budget."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

import dyntok
from dyntok.measure.macs import count_macs_with_torch
from dyntok.measure.oracle import exit_correctness, first_correct_exit, oracle_curve
from dyntok.methods.revit import ReViT, vit_macs_at_grid

from .conftest import TINY, tiny_model

criterion = nn.CrossEntropyLoss()


def spread_assigner(model: ReViT) -> ReViT:
    """Large random assigner weights, so that a batch of random images is split over several lengths."""
    torch.manual_seed(5)
    for param in model.assigner.parameters():
        nn.init.normal_(param, std=2.0)
    return model


def test_default_lengths_are_half_three_quarters_and_all_of_the_grid():
    assert tiny_model("revit").grids == [2, 3, 4]
    assert dyntok.create_model("revit_vit_cifar_micro").grids == [4, 6, 8]


@pytest.mark.parametrize("grid", [2, 3, 4])
def test_one_length_equals_the_dense_model_at_that_resolution_with_the_same_weights(grid, images):
    model = tiny_model("revit").eval()
    model.set_budget(grid=grid)
    side = grid * TINY["patch_size"]
    dense = tiny_model("dense", img_size=side).eval()
    weights = {f"vit.{key}": value for key, value in model.vit.state_dict().items()}
    weights["vit.pos_embed"] = resample_abs_pos_embed(weights["vit.pos_embed"], [grid, grid], num_prefix_tokens=1)
    dense.load_state_dict(weights)
    resized = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    prediction = model.predict(images)
    torch.testing.assert_close(prediction.logits, dense.predict(resized).logits)
    # A fixed length runs no assigner: exactly the dense model's cost at that resolution.
    assert prediction.macs.tolist() == pytest.approx([dense.dense_macs()] * len(images))
    assert torch.all(prediction.extras["token_length"] == grid * grid)


def test_grouped_inference_equals_one_image_at_a_time(images):
    model = spread_assigner(tiny_model("revit")).eval()
    batch = model.predict(images)
    assert len(batch.extras["token_length"].unique()) > 1, "the batch should mix several lengths"
    for index, image in enumerate(images):
        alone = model.predict(image.unsqueeze(0))
        torch.testing.assert_close(batch.logits[index], alone.logits[0], rtol=1e-5, atol=1e-5)
        assert batch.macs[index] == alone.macs[0]
        assert batch.extras["token_length"][index] == alone.extras["token_length"][0]


def test_each_image_is_charged_the_assigner_plus_its_length(images):
    model = spread_assigner(tiny_model("revit")).eval()
    prediction = model.predict(images)
    grids = torch.tensor(model.grids)
    chosen = [model.grids.index(int(tokens ** 0.5)) for tokens in prediction.extras["token_length"]]
    expected = torch.tensor([model.exit_macs()[k] for k in chosen], dtype=torch.float64) + model.assigner_macs()
    torch.testing.assert_close(prediction.macs, expected)
    assert set(prediction.extras["token_length"].tolist()) <= set((grids ** 2).tolist())


def test_assigner_macs_match_the_flop_counter_and_are_a_small_share_of_the_shortest_length():
    model = dyntok.create_model("revit_vit_cifar_micro").eval()
    image = torch.randn(1, 3, 32, 32)
    assert model.assigner_macs() == pytest.approx(count_macs_with_torch(model.assigner, image), rel=0.01)
    for grid in model.grids:
        model.set_budget(grid=grid)
        assert vit_macs_at_grid(model.vit, grid) == pytest.approx(count_macs_with_torch(model.predict, image), rel=0.01)
    assert model.assigner_macs() < 0.05 * model.exit_macs()[0]


def test_token_length_labels_follow_the_definition_on_a_crafted_example():
    def logits_predicting(classes):
        return F.one_hot(torch.tensor(classes), num_classes=3).float()

    target = torch.tensor([0, 1, 2, 0, 1])
    lengths = [logits_predicting([0, 0, 0, 1, 1]),  # shortest: right for images 0 and 4
               logits_predicting([0, 0, 2, 1, 0]),  # middle: right for images 0 and 2
               logits_predicting([0, 1, 1, 1, 1])]  # longest: right for images 0, 1 and 4
    labels = first_correct_exit(exit_correctness(lengths, target))
    # 0: right everywhere -> shortest; 1: only at the longest; 2: only in the middle; 3: never -> longest;
    # 4: right at the shortest, wrong in the middle -> shortest.
    assert labels.tolist() == [0, 2, 1, 2, 0]


def test_soft_targets_count_by_their_argmax():
    logits = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    assert first_correct_exit(exit_correctness(logits, torch.tensor([[0.3, 0.7]]))).tolist() == [1]


def test_the_revit_phase_trains_the_backbone_at_every_length_with_distillation(images, labels):
    model = tiny_model("revit").train()
    output = model(images)
    assert [logits.shape for logits in output.length_logits] == [(len(images), TINY["num_classes"])] * 3
    loss = model.compute_loss(output, labels, criterion)
    assert set(loss.terms) == {"length2", "length3", "length4", "distill"}
    loss.total.backward()
    assert all(p.grad is not None for p in model.vit.parameters())
    assert all(p.grad is None for p in model.assigner.parameters())


def test_the_assigner_phase_trains_only_the_assigner_on_labels_of_the_frozen_revit(images, labels):
    model = tiny_model("revit")
    model.set_phase("assigner")
    model.train()
    assert {id(p) for g in model.param_groups(0.05) for p in g["params"]} == {id(p) for p in model.assigner.parameters()}
    optimizer = torch.optim.Adam(model.assigner.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model.compute_loss(model(images), labels, criterion)
        optimizer.zero_grad()
        loss.total.backward()
        assert all(p.grad is not None and p.grad.any() for p in model.assigner.parameters())
        assert all(p.grad is None for p in model.vit.parameters())
        optimizer.step()
        losses.append(loss.total.item())
    assert losses[-1] < 0.5 * losses[0]
    # It has learnt the labels: the shortest length at which the (eval-mode) ReViT is right.
    model.eval()
    expected = first_correct_exit(exit_correctness(model.predict_all_exits(images), labels))
    with torch.no_grad():
        assert torch.equal(model.assigner(images).argmax(-1), expected)


def test_calibrate_fits_the_bias_to_a_gmacs_target_on_held_out_data(images, labels):
    model = spread_assigner(tiny_model("revit")).eval()
    held_out = [(images, labels), (images.flip(0), labels)]
    cheapest, longest = model.exit_macs()[0] + model.assigner_macs(), model.dense_macs()
    for target in (cheapest, (cheapest + longest) / 2, longest):
        budget = model.calibrate(held_out, gmacs=target / 1e9)
        assert budget["grid"] is None
        mean = torch.cat([model.predict(x).macs for x, _ in held_out]).mean().item()
        assert mean <= target * (1 + 1e-9)
    assert model.predict(images).macs.mean().item() == pytest.approx(longest)  # largest target: all longest
    with pytest.raises(ValueError, match="below ReViT's cheapest budget"):
        model.calibrate(held_out, gmacs=0.5 * cheapest / 1e9)


def test_a_larger_bias_never_picks_a_shorter_length(images):
    model = spread_assigner(tiny_model("revit")).eval()
    previous = None
    for bias in (-100.0, -1.0, 0.0, 1.0, 100.0):
        model.set_budget(bias=bias)
        tokens = model.predict(images).extras["token_length"]
        assert previous is None or torch.all(tokens >= previous)
        previous = tokens
    assert torch.all(previous == model.grids[-1] ** 2)


@pytest.mark.parametrize("knobs", [{"bias": float("nan")}, {"bias": "1"}, {"grid": 5}, {"length": 2}])
def test_impossible_budgets_are_rejected(knobs):
    with pytest.raises(ValueError):
        tiny_model("revit").set_budget(**knobs)


def test_the_budget_is_plain_json():
    model = tiny_model("revit")
    for point in model.budget_sweep():
        assert json.loads(json.dumps(point)) == point


def test_oracle_curve_moves_the_cheapest_images_first():
    correct = torch.tensor([[True, True, True],     # right at the cheapest exit already
                            [False, True, True],    # cheapest right exit: 1
                            [False, False, True],   # cheapest right exit: 2
                            [False, False, False]])  # never right: stays at the cheapest
    curve = oracle_curve(correct, [1e9, 2e9, 4e9])
    assert [point["top1"] for point in curve] == [0.25, 0.5, 0.75]
    assert [point["mean_gmacs"] for point in curve] == pytest.approx([1.0, 1.25, 2.0])


def test_labels_command_stores_each_training_image_s_shortest_correct_length_with_provenance(image_folder, tmp_path,
                                                                                               monkeypatch):
    import hashlib

    from dyntok.fileio import load_tensors
    from dyntok.methods import save_model
    from dyntok.cli import main
    from dyntok.data import DataConfig, build_loaders
    from dyntok.measure.oracle import collect_exit_correctness

    monkeypatch.setenv("DYNTOK_CACHE", str(tmp_path / "cache"))
    model = tiny_model("revit", num_classes=3).eval()
    checkpoint = save_model(model, tmp_path / "revit.safetensors")
    out = tmp_path / "labels.safetensors"
    assert main(["labels", str(checkpoint), "--output", str(out), "--dataset", str(image_folder),
                 "--batch-size", "5", "--holdout-size", "4", "--device", "cpu"]) == 0
    tensors, meta = load_tensors(out)
    # The same images as the trainer's training split, in dataset order, labelled by the definition.
    loaders = build_loaders(DataConfig(dataset=str(image_folder), batch_size=5, holdout_size=4))
    train_part = loaders["train"].dataset
    assert torch.equal(tensors["index"], train_part.indices)
    correct = collect_exit_correctness(model, [(x, y) for x, y in _eval_batches(loaders, train_part)], "cpu")
    assert torch.equal(tensors["correct"].bool(), correct)
    assert torch.equal(tensors["labels"], first_correct_exit(correct))
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["split"] == {"name": "train", "dataset": str(image_folder), "source": train_part.source,
                             "holdout_size": 4, "seed": 0, "transform": "eval", "images": len(train_part)}
    assert meta["model"] == model.config


def _eval_batches(loaders, dataset):
    """``dataset`` through the evaluation transform, in order (as the held-out loader would show it)."""
    transform = loaders["test"].transform
    for start in range(0, len(dataset), 5):
        yield transform(dataset.images[start:start + 5], dataset.labels[start:start + 5])


def test_labels_command_refuses_a_model_without_exits(tmp_path):
    from dyntok.methods import save_model
    from dyntok.cli.labels import write_exit_labels
    from dyntok.data import DataConfig

    checkpoint = save_model(tiny_model("dense"), tmp_path / "dense.safetensors")
    with pytest.raises(ValueError, match="no exits"):
        write_exit_labels(checkpoint, DataConfig(), "train", tmp_path / "labels.safetensors", torch.device("cpu"))


def test_training_runs_the_revit_phase_then_the_assigner_phase(image_folder, tmp_path):
    from dyntok.data import DataConfig
    from dyntok.training import TrainConfig, train

    data = DataConfig(dataset=str(image_folder), batch_size=8, holdout_size=0, cache_dir=str(tmp_path / "cache"))
    backbone = {k: v for k, v in TINY.items() if k != "num_classes"}
    config = TrainConfig(model="revit_vit_cifar_tiny", model_kwargs={**backbone, "assigner_share": 0.5}, data=data,
                         output_dir=str(tmp_path / "run"), epochs=2, warmup_epochs=0.5, progress=False)
    result = train(config)
    log = [json.loads(line) for line in (result.output_dir / "log.jsonl").read_text().splitlines()]
    assert [record["phase"] for record in log] == ["revit", "assigner"]
    assert {"train_length2", "train_length4", "train_distill"} <= set(log[0]) and "train_assigner" in log[1]
    assert result.metrics["test"]["mean_gmacs"] > 0


def test_the_benchmark_records_an_oracle_curve_for_routed_exits_only(images, labels, tmp_path):
    from dyntok.bench.cache import EntryCache
    from dyntok.bench.runner import anytime_accuracy

    split = [(images, labels), (images.flip(0), labels.flip(0))]
    revit = spread_assigner(tiny_model("revit")).eval()
    record = anytime_accuracy(revit, split, EntryCache.at(tmp_path, "revit", "a" * 64), torch.device("cpu"))
    assert len(record["exit_top1"]) == 3 and record["oracle"]
    cheapest, best = record["oracle"][0], record["oracle"][-1]
    assert cheapest["mean_gmacs"] == pytest.approx(revit.exit_macs()[0] / 1e9)
    assert best["top1"] >= max(record["exit_top1"]) and best["mean_gmacs"] <= revit.exit_macs()[-1] / 1e9
    dense = tiny_model("dense").eval()
    assert anytime_accuracy(dense, split, EntryCache.at(tmp_path, "dense", "b" * 64), torch.device("cpu"))["oracle"] is None
