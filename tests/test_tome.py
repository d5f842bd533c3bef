"""ToMe: dense at r = 0, size-weighted merging, an independent reference on timm's block variants, MACs, knobs."""
from __future__ import annotations

import pytest
import torch

import dyntok
from dyntok.measure.macs import count_macs_with_torch
from dyntok.methods.token_reduction import attention_half, mlp_half, runs_lean
from dyntok.methods.tome import ToMe, bipartite_soft_matching, largest_constant_r, merge_by_size, r_schedule
from dyntok.models import BackboneSpec

from . import vit_reference as ref
from .conftest import TINY, tiny_model

#: timm block variants the original ToMe patch silently breaks on, and prefix/pooling variants.
VARIANTS = {
    "plain": {},
    "layerscale_qknorm": {"init_values": 0.5, "qk_norm": True},
    "registers": {"reg_tokens": 2, "init_values": 0.5},
    "avg_pool": {"class_token": False, "global_pool": "avg"},
}


def tome_on(variant: str, **kwargs) -> ToMe:
    torch.manual_seed(0)
    model = ToMe(BackboneSpec("vit_cifar_tiny", {**TINY, **VARIANTS[variant]}), **kwargs)
    return ref.randomise(model).eval()


# --------------------------------------------------------------------------------------------- the reference
def official_merges(keys: torch.Tensor, r: int, protected: int) -> dict[int, int]:
    """The official matching rule on one image's whole sequence, written with loops: {A position: B position}.

    ``keys`` (n, d) holds every token, the ``protected`` prefix tokens first. Set A is the even positions of
    the sequence, B the odd ones (the class token, at 0, is in A). A protected token in A never merges (its
    scores are -inf) and one in B never receives a merge (its column is -inf). Each A token picks its most
    similar B token (cosine; the first among equals) and the r A tokens with the most similar partners merge.
    """
    unit = keys / keys.norm(dim=-1, keepdim=True)
    b_ids = [b for b in range(1, len(keys), 2) if b >= protected]
    best = {}
    for a in range(0, len(keys), 2):
        if a >= protected:
            similarities = [float(unit[a] @ unit[b]) for b in b_ids]
            best[a] = (max(similarities), b_ids[similarities.index(max(similarities))])
    merging = sorted(best, key=lambda a: -best[a][0])[:r]
    return {a: best[a][1] for a in merging}


def reference_merge(tokens: torch.Tensor, sizes: torch.Tensor, keys: torch.Tensor, r: int, protected: int):
    """One image's ToMe step over its whole sequence: (n, C) tokens, (n,) sizes, (n, d) mean keys.

    The result is the protected tokens, the unmerged A tokens, then the B tokens, each in its order (the
    official order: class and distillation tokens first).
    """
    merges = official_merges(keys, r, protected)
    members = {b: [b] for b in range(protected, len(tokens)) if b % 2 == 1}
    for a, b in merges.items():
        members[b].append(a)
    unmerged_a = [[a] for a in range(protected, len(tokens)) if a % 2 == 0 and a not in merges]
    groups = [[p] for p in range(protected)] + unmerged_a + list(members.values())
    new_sizes = torch.stack([sizes[g].sum() for g in groups])
    new_tokens = torch.stack([(tokens[g] * sizes[g, None]).sum(0) for g in groups]) / new_sizes[:, None]
    return new_tokens, new_sizes


@torch.no_grad()
def reference_tome(model: ToMe, images: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` computed image by image from the weights, with loops for the matching."""
    vit, prefix = model.vit, model.vit.num_prefix_tokens
    logits = []
    for image in images:
        x = vit._pos_embed(vit.patch_embed(image[None]))[0]
        sizes = torch.ones(len(x))
        for block, r in zip(vit.blocks, model.r_per_block()):
            branch, _, keys = ref.attention(block, x, key_bias=sizes.log())
            x = x + branch
            if r:
                x, sizes = reference_merge(x, sizes, keys.mean(0), r, protected=prefix)
            x = x + ref.mlp(block, x)
        logits.append(ref.head(vit, x, sizes[prefix:]))
    return torch.stack(logits)


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_block_halves_are_timms_block_forward(variant, fused, train, images):
    """Bit for bit, whether the halves run lean (eval mode, no LayerScale or qk-norm) or timm's own modules."""
    vit = tome_on(variant).vit.train(train)
    ref.set_fused_attention(vit, fused)
    tokens = vit._pos_embed(vit.patch_embed(images))
    for block in vit.blocks:
        assert runs_lean(block) == (not train and "init_values" not in VARIANTS[variant])  # LayerScale: timm's modules
        torch.testing.assert_close(mlp_half(block, attention_half(block, tokens)), block(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_r_zero_gives_the_dense_logits(variant, images):
    model = tome_on(variant, r=0)
    torch.testing.assert_close(model.predict(images).logits, model.vit(images), rtol=0, atol=0)


def hooked_blocks(model) -> list[int]:
    """Blocks whose attention has a hook on any sub-module (a tap)."""
    return [index for index, block in enumerate(model.vit.blocks)
            if any(module._forward_hooks or module._forward_pre_hooks for module in block.attn.modules())]


def test_only_blocks_that_merge_through_timms_modules_are_hooked(images):
    """A hook sends every call of its module down PyTorch's slower path: blocks merging nothing carry none, and
    lean blocks, which hand their keys over directly, carry none either."""
    model = tome_on("layerscale_qknorm", r=[2, 0, 1, 0])
    model.predict(images)
    assert hooked_blocks(model) == [0, 2]
    model.set_budget(r=0)
    model.predict(images)
    assert hooked_blocks(model) == []
    lean = tome_on("plain", r=2)
    lean.predict(images)
    assert hooked_blocks(lean) == []
    lean.train()(images)  # training runs timm's modules: the merging blocks are hooked for it
    assert hooked_blocks(lean) == [0, 1, 2, 3]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("r, schedule", [(2, "constant"), (1, "decreasing"), ([3, 0, 2, 1], "constant")])
def test_matches_an_independent_reference(variant, fused, r, schedule, images):
    model = tome_on(variant, r=r, schedule=schedule)
    ref.set_fused_attention(model.vit, fused)
    torch.testing.assert_close(model.predict(images).logits, reference_tome(model, images), rtol=1e-4, atol=1e-5)


def test_proportional_attention_changes_the_result_and_can_be_switched_off(images):
    with_sizes = tome_on("plain", r=3).predict(images).logits
    without = tome_on("plain", r=3, proportional_attention=False).predict(images).logits
    assert not torch.allclose(with_sizes, without)


def test_training_turns_proportional_attention_off_unless_chosen(images):
    without = tome_on("plain", r=3, proportional_attention=False).predict(images).logits
    model = tome_on("plain", r=3)
    assert model.proportional_attention  # off the shelf: on
    model.begin_training()
    assert model.config["method_kwargs"]["proportional_attention"] is False
    torch.testing.assert_close(model.predict(images).logits, without, rtol=0, atol=0)
    chosen = tome_on("plain", r=3, proportional_attention=True)
    chosen.begin_training()
    assert chosen.proportional_attention and chosen.config["method_kwargs"]["proportional_attention"] is True


def test_merging_preserves_the_size_weighted_mean():
    torch.manual_seed(0)
    tokens, sizes = torch.randn(3, 9, 5), torch.randint(1, 5, (3, 9)).float()
    merged, merged_sizes = merge_by_size(tokens, sizes, bipartite_soft_matching(torch.randn(3, 9, 4), r=3))
    assert merged.shape == (3, 6, 5)
    torch.testing.assert_close(merged_sizes.sum(1), sizes.sum(1))
    mean = (tokens * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
    torch.testing.assert_close((merged * merged_sizes[..., None]).sum(1) / merged_sizes.sum(1, keepdim=True), mean)


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
@pytest.mark.parametrize("num_patches, r", [(11, 0), (11, 4), (10, 5), (16, 3)])
def test_matching_sets_follow_the_official_split_of_the_whole_sequence(protected, num_patches, r):
    torch.manual_seed(protected * 100 + num_patches)
    keys = torch.randn(3, protected + num_patches, 4)
    matching = bipartite_soft_matching(keys[:, protected:], r, offset=protected)
    destination = matching.destination(num_patches)
    # Merging follows the destinations: each merged token is the sum of the tokens sent to it.
    tokens = torch.randn(3, protected + num_patches, 2)
    by_destination = torch.zeros(3, num_patches - r, 2).scatter_add(1, destination[..., None].expand(-1, -1, 2),
                                                                   tokens[:, protected:])
    # The prefix tokens pass through, first.
    torch.testing.assert_close(matching.merge_sum(tokens), torch.cat([tokens[:, :protected], by_destination], 1))
    for image in range(3):
        position = {j: protected + j for j in range(num_patches)}  # patch j's place in the whole sequence
        in_b = [j for j in range(num_patches) if position[j] % 2 == 1]
        kept_a = num_patches - len(in_b) - r
        # B tokens (odd positions of the whole sequence) stay, in order, after the unmerged A tokens.
        assert destination[image, in_b].tolist() == list(range(kept_a, kept_a + len(in_b)))
        slot_of_b = {destination[image, j].item(): position[j] for j in in_b}
        merges = {position[j]: slot_of_b[destination[image, j].item()]
                  for j in range(num_patches) if j not in in_b and destination[image, j] >= kept_a}
        assert merges == official_merges(keys[image], r, protected)


def test_with_a_class_token_the_first_patch_token_is_in_set_b():
    keys = torch.randn(1, 6, 4)
    assert bipartite_soft_matching(keys, 0, offset=1).destination(6)[0].tolist() == [3, 0, 4, 1, 5, 2]
    assert bipartite_soft_matching(keys, 0, offset=0).destination(6)[0].tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("variant", ["plain", "layerscale_qknorm", "registers"])
@pytest.mark.parametrize("r, schedule", [(3, "constant"), (2, "decreasing")])
def test_reported_macs_match_torch_flop_counter(variant, r, schedule, images):
    model = tome_on(variant, r=r, schedule=schedule)
    reported = model.predict(images[:1]).macs.item()
    assert reported == pytest.approx(count_macs_with_torch(model.predict, images[:1]), rel=0.01)
    assert reported < model.dense_macs()


def test_patch_groups_say_which_token_each_patch_became(images):
    model = tome_on("plain", r=2)
    prediction = model.predict(images)
    groups = prediction.extras["patch_groups"]
    assert "kept_patches" not in prediction.extras  # merging drops no patch: every one lives on in a token
    assert len(groups) == 4
    for block, index in enumerate(groups):
        tokens_left = 16 - 2 * (block + 1)
        assert index.shape == (len(images), 16)
        assert all(len(row.unique()) == tokens_left for row in index)  # every token stands for some patch
    assert (prediction.extras["token_length"] == 8).all()


def test_schedules_of_r():
    assert r_schedule(4, "constant", 3) == [4, 4, 4]
    assert r_schedule(4, "decreasing", 3) == [8, 4, 0]
    assert r_schedule(5, "decreasing", 6) == [10, 8, 6, 4, 2, 0]  # 2 computed in floats is 1.99...
    assert r_schedule([1, 2, 3], "constant", 3) == [1, 2, 3]
    assert largest_constant_r(16, 4) == 3 and largest_constant_r(196, 12) == 15


def official_decreasing(r: int, depth: int) -> list[int]:
    """The official ``parse_r`` for ``(r, -1)``: from ``2r`` to 0 in equal float steps, truncated."""
    low = int(r * (1.0 - -1))
    high = 2 * r - low
    step = (high - low) / (depth - 1)
    return [int(low + step * i) for i in range(depth)]


def test_decreasing_schedule_is_the_official_one_for_every_r_and_depth():
    for depth in range(2, 25):
        for r in range(17):
            assert r_schedule(r, "decreasing", depth) == official_decreasing(r, depth), (r, depth)


@pytest.mark.parametrize("knobs, message", [
    ({"r": 4}, "asks block 3 to merge 4 of its 4 patch tokens.*largest constant r for 16 patches and 4 blocks is 3"),
    ({"r": 4, "schedule": "decreasing"}, "r=4 \\(decreasing\\) asks block 1 to merge 5 of its 8 patch tokens"),
    ({"r": -1}, "between 0 and half"),
    ({"r": [1, 2]}, "a list of 4 ints"),
    ({"r": True}, "a list of 4 ints"),
    ({"r": [1, 1, 1, 1], "schedule": "decreasing"}, "leave schedule='constant'"),
    ({"schedule": "increasing"}, "schedule is one of constant, decreasing"),
    ({"keep_rate": 0.5}, "knobs are r and schedule"),
])
def test_impossible_knobs_are_rejected(knobs, message):
    model = tiny_model("tome")
    with pytest.raises(ValueError, match=message):
        model.set_budget(**knobs)
    assert model.get_budget() == {"r": 1, "schedule": "constant"}  # unchanged


def test_training_free_from_a_dense_checkpoint(images):
    dense = dyntok.create_model("vit_cifar_tiny", **TINY).eval()
    ref.randomise(dense)
    model = tiny_model("tome", r=0).eval()
    model.init_from_dense(dense.state_dict())
    torch.testing.assert_close(model.predict(images).logits, dense.predict(images).logits, rtol=0, atol=0)
    model.set_budget(r=3)
    assert model.predict(images).macs[0] < dense.dense_macs()


def test_sweep_spans_the_possible_r():
    sweep = tiny_model("tome").budget_sweep()
    assert [point["r"] for point in sweep] == [1, 2, 3]


def test_zero_epochs_evaluates_the_dense_checkpoint_without_training(image_folder, tmp_path):
    from dyntok.methods import load_model
    from dyntok.data import DataConfig
    from dyntok.training import TrainConfig, train

    model_kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    data = DataConfig(dataset=str(image_folder), batch_size=8, holdout_size=0, cache_dir=str(tmp_path / "cache"))
    dense = train(TrainConfig(model="vit_cifar_tiny", model_kwargs=model_kwargs, data=data, epochs=1,
                              output_dir=str(tmp_path / "dense"), progress=False))
    tome = train(TrainConfig(model="tome_vit_cifar_tiny", model_kwargs=model_kwargs, data=data, epochs=0,
                             init=str(dense.model_path), output_dir=str(tmp_path / "tome"), progress=False))
    trained, merged = load_model(dense.model_path), load_model(tome.model_path)
    assert tome.metrics["steps"] == 0 and "test" in tome.metrics
    assert merged.proportional_attention  # not trained: used off the shelf
    for (name, a), (_, b) in zip(trained.state_dict().items(), merged.state_dict().items()):
        assert torch.equal(a, b), name


def test_benchmark_entry_with_zero_epochs_evaluates_its_init(image_folder, tmp_path):
    from dyntok.bench.runner import run_benchmark
    from dyntok.bench.spec import parse_spec

    model_kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    spec = parse_spec({
        "name": "zero", "backbone": "vit_cifar_tiny", "device": "cpu",
        "data": {"dataset": str(image_folder), "batch_size": 8, "holdout_size": 0,
                 "cache_dir": str(tmp_path / "decoded")},
        "train": {"epochs": 1, "warmup_epochs": 0},
        "speed": {"batch_size": 4, "images": 8, "latency_images": 2, "repeats": 1, "warmup": 0},
        "entries": [
            {"name": "dense", "model": "{backbone}", "model_kwargs": model_kwargs},
            {"name": "tome", "model": "tome_{backbone}", "model_kwargs": model_kwargs, "init": "dense",
             "train": {"epochs": 0}, "budgets": [{"r": 0}, {"r": 3}]},
        ],
    })
    dense, tome = run_benchmark(spec, tmp_path / "report", progress=False)["entries"]
    assert tome["train_metrics"]["steps"] == 0
    unmerged, merged = tome["points"]
    assert unmerged["top1"] == dense["points"][0]["top1"]
    assert unmerged["mean_gmacs"] == pytest.approx(dense["points"][0]["mean_gmacs"])
    assert merged["mean_gmacs"] < unmerged["mean_gmacs"]


def test_a_trained_tome_keeps_proportional_attention_off(image_folder, tmp_path):
    from dyntok.methods import load_model
    from dyntok.data import DataConfig
    from dyntok.training import TrainConfig, train

    model_kwargs = {**{k: v for k, v in TINY.items() if k != "num_classes"}, "r": 2}
    data = DataConfig(dataset=str(image_folder), batch_size=8, holdout_size=0, cache_dir=str(tmp_path / "cache"))
    trained = train(TrainConfig(model="tome_vit_cifar_tiny", model_kwargs=model_kwargs, data=data, epochs=1,
                                output_dir=str(tmp_path / "tome"), progress=False))
    model = load_model(trained.model_path)
    assert model.config["method_kwargs"]["proportional_attention"] is False and not model.proportional_attention
