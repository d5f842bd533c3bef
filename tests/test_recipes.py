"""The papers' recipes: the documented values, the batch scaling rule, overrides and their refusal."""
from __future__ import annotations

import pytest

from dyntok.cli import build_parser
from dyntok.cli.train import config_from_args
from dyntok.training.paper_recipes import PAPER_RECIPES, resolve_recipe


def test_dynamicvit_resolves_to_the_official_deit_small_run():
    config = resolve_recipe("dynamicvit_deit_small")
    assert config.model == "dynamicvit_deit_small_patch16_224"
    assert (config.epochs, config.data.batch_size, config.lr) == (30, 768, pytest.approx(5e-4 * 768 / 512))
    assert (config.min_lr, config.warmup_epochs, config.weight_decay, config.ema_decay) == (1e-5, 0, 0.05, 0.99996)
    assert config.init == "pretrained" and config.clip_grad is None
    assert config.model_kwargs == {"drop_path_rate": 0.1, "keep_ratio": 0.7, "ratio_weight": 2.0,
                                   "distill_weight": 0.5, "backbone_lr_scale": 0.01, "predictor_warmup": 5 / 30}
    data = config.data
    assert (data.image_size, data.crop_pct, data.randaugment, data.random_erasing) == (224, 0.875, (2, 9), 0.25)
    assert (data.mixup_alpha, data.cutmix_alpha, config.label_smoothing) == (0.8, 1.0, 0.1)
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)


def test_evit_fine_tunes_with_its_tiny_learning_rate_and_the_final_keep_rate_from_the_start():
    config = resolve_recipe("evit_deit_small")
    assert (config.epochs, config.data.batch_size, config.lr) == (30, 1024, pytest.approx(4e-5))
    assert (config.min_lr, config.weight_decay, config.warmup_epochs) == (2e-6, 1e-6, 0)
    assert config.model_kwargs["keep_rate"] == 0.7 and config.model_kwargs["shrink_end"] == 0.0


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_every_recipe_cites_its_source_and_builds_a_valid_config(name):
    recipe = PAPER_RECIPES[name]
    assert "/" in recipe.source and ".py" in recipe.source
    assert recipe.reported is None or set(recipe.reported) == {"top1", "gmacs"}
    config = resolve_recipe(name)
    assert config.output_dir == f"runs/{name}"


def test_a_smaller_batch_scales_the_learning_rate_unless_it_is_given():
    assert resolve_recipe("dynamicvit_deit_small", {"batch_size": 256}).lr == pytest.approx(5e-4 * 256 / 512)
    assert resolve_recipe("dynamicvit_deit_small", {"batch_size": 256, "lr": 1e-3}).lr == 1e-3
    assert resolve_recipe("adavit_deit_small", {"batch_size": 256}).lr == 5e-4  # AdaViT's code does not scale


def test_overrides_reach_training_data_and_model_settings():
    config = resolve_recipe("evit_deit_small", {"epochs": 1, "data.num_workers": 0, "model_kwargs.depth": 2,
                                                "label_smoothing": 0.2, "accum_steps": 4})
    assert (config.epochs, config.data.num_workers, config.model_kwargs["depth"]) == (1, 0, 2)
    assert config.label_smoothing == 0.2
    assert config.accum_steps == 4


@pytest.mark.parametrize("key", ["epoch", "data.epochs", "model.depth", "optimizer.lr"])
def test_unknown_overrides_are_refused(key):
    with pytest.raises(ValueError, match="unknown recipe override"):
        resolve_recipe("dynamicvit_deit_small", {key: 1})


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="known:"):
        resolve_recipe("dynamicvit_deit_huge")


def parse(*argv):
    args = build_parser().parse_args(["train", *argv])
    args.command_argv = list(argv)
    return config_from_args(args)


def test_the_command_line_overrides_only_what_was_typed():
    config = parse("--recipe", "evit_deit_small", "--epochs", "1", "--lr", "1e-3", "--batch-size", "64",
                   "--model-arg", "depth=2", "--set", "data.num_workers=0", "--no-progress")
    assert (config.epochs, config.lr, config.data.batch_size, config.data.num_workers) == (1, 1e-3, 64, 0)
    assert config.model_kwargs["depth"] == 2 and config.progress is False
    assert config.weight_decay == 1e-6  # not typed: the recipe's, not the command line's default
    assert parse("--recipe", "evit_deit_small", "--debug").epochs == 30  # options of every command are not fields
    # Typing an option's default value still overrides the recipe.
    assert parse("--recipe", "evit_deit_small", "--weight-decay", "0.05").weight_decay == 0.05


def test_the_command_line_refuses_unknown_overrides_and_another_model():
    with pytest.raises(ValueError, match="unknown recipe override"):
        parse("--recipe", "evit_deit_small", "--set", "epoch=1")
    with pytest.raises(ValueError, match="--model-arg"):
        parse("--recipe", "evit_deit_small", "--model", "vit_cifar_tiny")
