"""Pictures: every figure kind is rendered from tiny models or hand-made predictions, and what is drawn is
checked against what the model returned (grey patches = dropped tokens, tints = merged groups, rows = exits)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dyntok
from dyntok.data import BatchLoader, EvalTransform, ImageTensorDataset, normalize
from dyntok.methods.base import Prediction
from dyntok.report.gallery import collect, concat_predictions, entry_gallery, show, write_figures
from dyntok.report.pictures import (DROPPED_GREY, MERGE_TINT, Shown, draw_figures, evenly_spaced, exit_figure,
                                    gmacs_figure, patch_figure, render_patches, token_length_figure)

from .conftest import TINY, tiny_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIDE, PATCH = TINY["img_size"], TINY["patch_size"]
GRID = SIDE // PATCH
CLASSES = ["apple", "bee", "cat", "dog", "eel"]


@pytest.fixture
def data() -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, SIDE, SIDE), dtype=torch.uint8, generator=generator)
    return ImageTensorDataset(images, torch.arange(10) % 5, CLASSES, "made up")


def hand_made(extras: dict, count: int = 6, gmacs=None, labels=None) -> Shown:
    """A Shown record from a hand-made prediction: random pictures, chosen extras and costs."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(count, 5, generator=generator)
    macs = torch.as_tensor(gmacs if gmacs is not None else [1.0] * count, dtype=torch.float64) * 1e9
    labels = torch.arange(count) % 5 if labels is None else labels
    pictures = torch.rand(count, 3, SIDE, SIDE, generator=generator)
    return Shown.from_prediction(pictures, labels, Prediction(logits, macs, extras), CLASSES)


# ------------------------------------------------------------------------------------------ reading figures back
def patches_of(pixels: np.ndarray) -> np.ndarray:
    """(GRID * GRID, PATCH * PATCH, 3) pixels per patch, row-major, of an (H, W, 3) image."""
    blocks = pixels.reshape(GRID, PATCH, GRID, PATCH, 3).transpose(0, 2, 1, 3, 4)
    return blocks.reshape(GRID * GRID, PATCH * PATCH, 3)


def grey_patches(pixels: np.ndarray) -> np.ndarray:
    return np.all(np.isclose(patches_of(pixels), DROPPED_GREY), axis=(1, 2))


def tints(drawn: np.ndarray, original: np.ndarray) -> list[tuple[float, ...] | None]:
    """Per patch, the colour laid over it (from drawn = (1 - t) * original + t * colour), or None (also grey)."""
    drawn_p, original_p = patches_of(drawn), patches_of(original)
    colours = []
    for patch_drawn, patch_original, grey in zip(drawn_p, original_p, grey_patches(drawn)):
        if grey or np.allclose(patch_drawn, patch_original):
            colours.append(None)
            continue
        colour = (patch_drawn - (1 - MERGE_TINT) * patch_original) / MERGE_TINT
        assert np.allclose(colour, colour[0], atol=1e-6), "one flat colour per merged patch"
        colours.append(tuple(np.round(colour[0], 5)))
    return colours


def stage_axes(figure, cell: int) -> list:
    """The stage panels (after the original image) of one image's cell in a patch figure."""
    return figure.subfigs[cell].axes[1:]


# ------------------------------------------------------------------------------------------ token methods
def test_dynamicvit_grey_patches_are_its_dropped_tokens(data):
    model = tiny_model("dynamicvit", keep_ratio=0.5).eval()
    shown = collect(model, data, MEAN, STD, batch_size=4)
    direct = model.predict(normalize(data.images, MEAN, STD))
    kept = shown.extras["kept_patches"]
    assert len(kept) == len(direct.extras["kept_patches"]) == 3
    for mine, theirs in zip(kept, direct.extras["kept_patches"]):
        assert torch.equal(mine, theirs.cpu())  # batched in fours, concatenated in order
    figure = patch_figure(shown, n=4)
    chosen = evenly_spaced(torch.arange(len(data)), 4).tolist()
    assert chosen == [0, 3, 6, 9]
    for cell, index in enumerate(chosen):
        assert figure.subfigs[cell].axes[0].get_title().startswith(f"true: {CLASSES[index % 5]}\npred: ")
        for stage, ax in enumerate(stage_axes(figure, cell)):
            greyed = grey_patches(ax.images[0].get_array())
            mask = kept[stage][index].numpy()
            assert np.array_equal(greyed, ~mask)
            assert f"{mask.sum()}/{GRID * GRID} patches" in ax.get_title()
            assert greyed.sum() > 0  # keep ratio 0.5: every stage drops some


def test_merged_groups_are_tinted_one_colour_each():
    groups = torch.tensor([[0, 0, 2, 3, 4, 4, 4, 7, 8, 9, 10, 11, 12, 13, 14, 14]])  # three merged groups
    picture = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    shown = Shown.from_prediction(picture, None, Prediction(torch.zeros(1, 5), torch.ones(1, dtype=torch.float64),
                                                            {"patch_groups": [groups]}))
    figure = patch_figure(shown)
    ax = stage_axes(figure, 0)[0]
    colours = tints(ax.images[0].get_array(), shown.picture(0))
    assert [colour is not None for colour in colours] == [g in (0, 4, 14) for g in groups[0].tolist()]
    assert colours[0] == colours[1] and colours[4] == colours[5] == colours[6] and colours[14] == colours[15]
    assert len({colour for colour in colours if colour is not None}) == 3
    assert "12 tokens" in ax.get_title()  # 16 patches, merged 2 + 3 + 2 into three
    assert figure.subfigs[0].axes[0].get_title().startswith("true: ?")


def test_a_growing_token_keeps_its_colour_when_renumbered():
    first = torch.tensor([0, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    second = torch.tensor([9, 9, 9, 1, 4, 5, 6, 7, 8, 0, 10, 11, 12, 13, 14, 15])  # {0, 1} grows, gets index 9
    picture = torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(5)).permute(1, 2, 0).numpy()
    before = tints(render_patches(picture, None, first), picture)
    after = tints(render_patches(picture, None, second), picture)
    assert before[0] is not None and before[0] == after[0] == after[2]


def test_fused_tokens_grey_the_dropped_and_tint_only_kept_groups():
    """EViT-style: the dropped patches are fused into one token; they are drawn grey, not tinted."""
    kept = torch.arange(16) < 8
    groups = torch.arange(16)
    groups[8:] = 8  # every dropped patch in the fused token
    groups[1] = 0  # patches 0 and 1 merged
    picture = torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(4)).permute(1, 2, 0).numpy()
    drawn = render_patches(picture, kept, groups)
    assert np.array_equal(grey_patches(drawn), ~kept.numpy())
    assert [colour is not None for colour in tints(drawn, picture)] == [i in (0, 1) for i in range(16)]


def test_a_figure_per_fact_the_predictions_carry(data):
    assert list(draw_figures(collect(tiny_model().eval(), data, MEAN, STD))) == ["gmacs"]
    assert list(draw_figures(collect(tiny_model("dynamicvit").eval(), data, MEAN, STD))) == ["patches", "gmacs"]
    assert list(draw_figures(collect(tiny_model("dvt", depth=2).eval(), data, MEAN, STD))) == ["exits", "gmacs"]
    every = hand_made({"kept_patches": [torch.ones(6, 16, dtype=torch.bool)], "exit_stage": torch.zeros(6).long(),
                       "token_length": torch.full((6,), 16)})
    assert list(draw_figures(every)) == ["patches", "exits", "token_length", "gmacs"]


# ------------------------------------------------------------------------------------------ exits and lengths
def test_dvt_rows_are_its_exits_with_the_confidence_it_returned(data):
    model = tiny_model("dvt", depth=2).eval()
    model.set_budget(thresholds=[0.0, 0.0])  # everyone leaves at the first exit ...
    assert len(exit_figure(collect(model, data, MEAN, STD)).subfigs) == 1
    model.set_budget(thresholds=[2.0, 0.0])  # ... or, never at the first, all at the second
    shown = collect(model, data, MEAN, STD)
    assert shown.extras["exit_stage"].tolist() == [1] * 10
    figure = exit_figure(shown, n=4)
    (row,) = figure.subfigs
    assert row._suptitle.get_text().startswith("exit 2 of 3 (left at an intermediate exit): 10 images (100%)")
    for ax, index in zip(row.axes, [0, 3, 6, 9]):
        first, second, _ = shown.extras["exit_confidence"][index].tolist()
        assert ax.get_title().endswith(f"conf: {first:.2f} {second:.2f} –")


def test_exit_rows_from_a_hand_made_prediction():
    stages = torch.tensor([0, 2, 2, 0, 1, 2])
    confidence = torch.tensor([[0.9, math.nan, math.nan], [0.2, 0.3, 0.4], [0.1, 0.5, 0.6],
                               [0.95, math.nan, math.nan], [0.3, 0.8, math.nan], [0.2, 0.2, 0.3]])
    shown = hand_made({"exit_stage": stages, "exit_confidence": confidence}, gmacs=[1, 3, 3, 1, 2, 3])
    figure = exit_figure(shown, n=12)
    headings = [row._suptitle.get_text() for row in figure.subfigs]
    assert headings == ["exit 1 of 3 (easy: left at the first exit): 2 images (33%), mean 1 GMACs",
                        "exit 2 of 3 (left at an intermediate exit): 1 images (17%), mean 2 GMACs",
                        "exit 3 of 3 (hard: needed every stage): 3 images (50%), mean 3 GMACs"]
    assert [sum(bool(ax.images) for ax in row.axes) for row in figure.subfigs] == [2, 1, 3]
    assert figure.subfigs[0].axes[1].get_title().endswith("conf: 0.95 – –")


def test_token_length_rows():
    lengths = torch.tensor([16, 4, 16, 9, 4, 16])
    figure = token_length_figure(hand_made({"token_length": lengths}, gmacs=[4, 1, 4, 2, 1, 4]), n=12)
    headings = [row._suptitle.get_text() for row in figure.subfigs]
    assert headings == ["4 tokens: 2 images (33%), mean 1 GMACs", "9 tokens: 1 images (17%), mean 2 GMACs",
                        "16 tokens: 3 images (50%), mean 4 GMACs"]
    assert [sum(bool(ax.images) for ax in row.axes) for row in figure.subfigs] == [2, 1, 3]


# ------------------------------------------------------------------------------------------ compute
@pytest.mark.parametrize("gmacs", [[1, 2, 2, 3, 3, 3], [0.5 + 0.01 * i * i for i in range(6)] * 4])
def test_gmacs_histogram_counts_every_image_and_bars_are_class_means(gmacs):
    labels = torch.arange(len(gmacs)) % 3
    shown = hand_made({}, count=len(gmacs), gmacs=gmacs, labels=labels)
    histogram, per_class = gmacs_figure(shown).axes
    assert sum(bar.get_height() for bar in histogram.patches) == len(gmacs)
    assert "GMACs per image" in histogram.get_xlabel() and histogram.get_ylabel() == "images"
    means = {CLASSES[c]: np.mean([g for g, label in zip(gmacs, labels.tolist()) if label == c]) for c in range(3)}
    drawn = {tick.get_text(): bar.get_width() for tick, bar in zip(per_class.get_yticklabels(), per_class.patches)}
    assert drawn == pytest.approx(means)
    assert list(drawn) == sorted(means, key=means.get, reverse=True)  # costliest first


def test_many_classes_show_the_extremes():
    classes = [f"c{i}" for i in range(40)]
    labels = torch.arange(40)
    shown = Shown.from_prediction(torch.rand(40, 3, SIDE, SIDE), labels,
                                  Prediction(torch.zeros(40, 40), labels.double() * 1e9 + 1e9), classes)
    per_class = gmacs_figure(shown).axes[1]
    names = [tick.get_text() for tick in per_class.get_yticklabels()]
    assert names == [f"c{i}" for i in range(39, 24, -1)] + [f"c{i}" for i in range(14, -1, -1)]


# ------------------------------------------------------------------------------------------ plumbing
def test_concat_predictions_keeps_per_image_facts_only():
    def batch(start: int) -> Prediction:
        ids = torch.arange(start, start + 2)
        return Prediction(ids.float().unsqueeze(1), ids.double(),
                          {"exit_stage": ids, "kept_patches": [ids.unsqueeze(1) > 0, ids.unsqueeze(1) > 2],
                           "threshold": torch.tensor(0.5), "note": "same for all"})
    merged = concat_predictions([batch(0), batch(2)])
    assert merged.macs.tolist() == [0, 1, 2, 3] and merged.extras["exit_stage"].tolist() == [0, 1, 2, 3]
    assert [mask.flatten().tolist() for mask in merged.extras["kept_patches"]] == [
        [False, True, True, True], [False, False, False, True]]
    assert set(merged.extras) == {"exit_stage", "kept_patches"}


def test_show_writes_every_figure_from_a_checkpoint_and_a_folder(image_folder, tmp_path):
    model = dyntok.create_model("dynamicvit_vit_cifar_tiny", img_size=16, depth=4, embed_dim=32, num_heads=2,
                                num_classes=3, keep_ratio=0.5)
    dyntok.save_model(model, tmp_path / "model.safetensors")
    figures = dyntok.show(tmp_path / "model.safetensors", image_folder / "test", n=4, budget={"keep_ratio": 0.75})
    assert list(figures) == ["patches", "gmacs"]
    assert "keep_ratio=0.75" in figures["patches"]._suptitle.get_text()
    assert "12/16 patches" in stage_axes(figures["patches"], 0)[0].get_title()
    per_class = figures["gmacs"].axes[1]
    assert sorted(tick.get_text() for tick in per_class.get_yticklabels()) == ["class_0", "class_1", "class_2"]
    assert show(model, image_folder, limit=5)["gmacs"].axes[0].patches[0].get_height() == 5  # a tree: its test split
    paths = write_figures(figures, tmp_path / "out")
    assert [path.name for path in paths] == ["patches.png", "gmacs.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_entry_gallery_draws_the_middle_point_and_returns_relative_links(data, tmp_path):
    model = tiny_model("dynamicvit").eval()
    points = [{"label": f"keep_ratio={ratio}", "knobs": {"keep_ratio": ratio}, "mean_gmacs": gmacs}
              for ratio, gmacs in [(0.9, 0.03), (0.5, 0.01), (0.7, 0.02)]]
    loader = BatchLoader(data, 4, EvalTransform(MEAN, STD))
    record = entry_gallery(model, points, loader, tmp_path, "dyn", images=6, n=2)
    assert record == {"label": "keep_ratio=0.7", "figures": {"patches": "gallery/dyn/patches.png",
                                                           "gmacs": "gallery/dyn/gmacs.png"}}
    assert model.get_budget() == {"keep_ratio": 0.7}
    for path in record["figures"].values():
        assert (tmp_path / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
