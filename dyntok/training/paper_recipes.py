"""The papers' ImageNet-1k recipes for DeiT-S, as presets of ``dyntok train --recipe NAME``.

Each recipe is what the authors' code runs for the published DeiT-S number, read from the file it cites:
epochs, global batch, the learning rate and how it scales with the batch, warm-up, weight decay, EMA,
augmentation, the teacher, the method's own settings. ``resolve`` turns one into a ``TrainConfig``; any
field can be overridden (``epochs=1``, ``batch_size=64``, ``data.num_workers=8``, ``model_kwargs.depth=2``)
and a name that is no field is refused. When the batch is overridden and the learning rate is not, the
learning rate follows the recipe's scaling rule (DeiT's: linear in the global batch, ``lr * batch / 512``).

Not every choice of the official code has a counterpart here; each recipe lists what differs in ``differs``.
ReViT (no official code) and ToMe (training-free on DeiT-S) have no recipe.

These are the papers' ImageNet runs. The CIFAR recipes that made dyntok's shipped weights (``dyntok pretrain``)
are :mod:`dyntok.training.recipes`; both are ``dyntok train`` settings under a name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..data import DataConfig
from .trainer import PRETRAINED_INIT, TrainConfig

__all__ = ["PaperRecipe", "PAPER_RECIPES", "resolve_recipe"]

#: DeiT's ImageNet data pipeline, which every one of these codebases inherits (timm's transforms).
DEIT_DATA: dict[str, Any] = dict(
    dataset="imagenet", image_size=224, data_path="auto", rrc_scale=(0.08, 1.0), hflip=True, randaugment=(2, 9),
    random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875, holdout_size=0, num_workers=10)

#: DeiT's optimisation settings that all four codebases keep: no gradient clipping, EMA, label smoothing.
DEIT_TRAIN: dict[str, Any] = dict(clip_grad=None, ema_decay=0.99996, label_smoothing=0.1)

#: The DeiT-S backbone with the official drop-path rate (``--drop-path 0.1``).
DEIT_SMALL = "deit_small_patch16_224"


@dataclass(frozen=True)
class PaperRecipe:
    """One paper's training of its DeiT-S model.

    Attributes:
        model: the dyntok model name (``<method>_deit_small_patch16_224``).
        source: the official repository and the file(s) the values come from.
        reported: top-1 and GMACs on ImageNet-1k val as the paper reports them (None where it gives none).
        batch_size: the official global batch (per-GPU batch x 8 GPUs).
        base_lr, lr_reference_batch: the official ``--lr`` and the batch it is quoted for; the learning rate
            used is ``base_lr * batch_size / lr_reference_batch`` (None: ``base_lr`` as is).
        train: further ``TrainConfig`` fields (over ``DEIT_TRAIN``); data: ``DataConfig`` fields; model_kwargs: backbone and method
            settings.
        differs: where dyntok's run departs from the official code, and why.
    """

    model: str
    source: str
    reported: dict[str, float] | None
    batch_size: int
    base_lr: float
    lr_reference_batch: int | None
    train: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    differs: str = ""

    def lr(self, batch_size: int) -> float:
        if self.lr_reference_batch is None:
            return self.base_lr
        return self.base_lr * batch_size / self.lr_reference_batch

    def train_config(self) -> TrainConfig:
        """The recipe exactly as published."""
        data = DataConfig(**{**DEIT_DATA, **self.data, "batch_size": self.batch_size})
        return TrainConfig(model=self.model, model_kwargs={"drop_path_rate": 0.1, **self.model_kwargs}, data=data,
                           lr=self.lr(self.batch_size), **{**DEIT_TRAIN, **self.train})


PAPER_RECIPES: dict[str, PaperRecipe] = {
    "dynamicvit_deit_small": PaperRecipe(
        model=f"dynamicvit_{DEIT_SMALL}",
        source="raoyongming/DynamicViT: README.md (DeiT-S command: 8 GPUs x batch-size 96, epochs 30, "
               "distill, base_rate 0.7) and main_dynamic_vit.py (defaults, adjust_learning_rate)",
        reported={"top1": 79.3, "gmacs": 2.9},
        batch_size=768, base_lr=5e-4, lr_reference_batch=512,
        # The backbone learns at 0.01x and not at all for the first 5 of 30 epochs (the predictor warm-up); no
        # learning-rate warm-up; cosine to 1e-5 by epoch; the teacher is the dense DeiT-S the model starts from.
        train=dict(epochs=30, min_lr=1e-5, warmup_epochs=0, weight_decay=0.05, init=PRETRAINED_INIT),
        model_kwargs=dict(keep_ratio=0.7, ratio_weight=2.0, distill_weight=0.5, backbone_lr_scale=0.01,
                          predictor_warmup=5 / 30),
        differs="the official schedule steps once per epoch, dyntok's per step; the official sampler repeats "
                "each image 3 times per epoch over the GPUs (DeiT's RASampler), dyntok's does not",
    ),
    "evit_deit_small": PaperRecipe(
        model=f"evit_{DEIT_SMALL}",
        source="youweiliang/evit: finetune.sh (8 GPUs x batch-size 128, lr 2e-5, min-lr 2e-6, "
               "weight-decay 1e-6, warmup-epochs 0, shrink_epochs 0, epochs 30, base_keep_rate 0.7, "
               "fuse_token) and main.py (linear lr scaling by batch / 512, DeiT's other defaults)",
        reported={"top1": 79.5, "gmacs": 3.0},
        batch_size=1024, base_lr=2e-5, lr_reference_batch=512,
        train=dict(epochs=30, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6, init=PRETRAINED_INIT),
        model_kwargs=dict(keep_rate=0.7, shrink_start=0.0, shrink_end=0.0),  # the target keep rate from step 1
        differs="the official fine-tune keeps the model in eval mode (no drop path, set_training_mode=False); "
                "dyntok trains in train mode with drop path 0.1; no repeated augmentation",
    ),
    "adavit_deit_small": PaperRecipe(
        model=f"adavit_{DEIT_SMALL}",
        source="MengLcool/AdaViT: ada_main.py defaults (no training command is published): lr 5e-4, "
               "epochs 300, warmup-epochs 10, min-lr 1e-5, weight-decay 0.05, batch 64 per GPU, "
               "model-ema-decay 0.99996, drop-path 0.1, mixup 0.8 / cutmix 1.0, rand-m9-mstd0.5-inc1",
        reported={"top1": 77.3, "gmacs": 2.3},
        batch_size=512, base_lr=5e-4, lr_reference_batch=None,
        train=dict(epochs=300, min_lr=1e-5, warmup_epochs=10, weight_decay=0.05, init=PRETRAINED_INIT),
        model_kwargs=dict(patch_target=0.5, head_target=0.5, block_target=0.5),
        differs="8 GPUs assumed for the global batch (the repository names none); timm's train.py-style code "
                "draws a random interpolation per image, dyntok uses bicubic",
    ),
    "dvt_deit_small": PaperRecipe(
        model=f"dvt_{DEIT_SMALL}",
        source="blackfeather-wang/Dynamic-Vision-Transformer: models_deit.py (stages on 7x7, 10x10, 14x14 "
               "tokens) trained with DeiT's recipe from scratch (facebookresearch/deit main.py defaults: "
               "lr 5e-4 scaled by batch / 512, 300 epochs, 5 warm-up epochs, weight decay 0.05, EMA 0.99996)",
        reported=None,  # the paper's ImageNet headline is T2T-ViT-14 (81.5% at 1.42x throughput)
        batch_size=1024, base_lr=5e-4, lr_reference_batch=512,
        train=dict(epochs=300, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05, init=None),
        data=dict(holdout_size=10000),  # exit thresholds are fitted on held-out training images
        differs="the official code fits exit thresholds on augmented training images; dyntok fits them on "
                "10,000 held-out training images with the evaluation transform",
    ),
}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def resolve_recipe(name: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The ``TrainConfig`` of recipe ``name`` with ``overrides`` applied.

    Keys name a ``TrainConfig`` field (``epochs``), a ``DataConfig`` field (``batch_size`` or
    ``data.batch_size``) or a model setting (``model_kwargs.depth``). Unknown keys raise ``ValueError``.
    """
    if name not in PAPER_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(PAPER_RECIPES)}")
    recipe = PAPER_RECIPES[name]
    config = recipe.train_config()
    train, data, model = _split_overrides(overrides or {})
    data_config = dataclasses.replace(config.data, **data)
    if "batch_size" in data and "lr" not in train:  # the recipe's scaling rule, as the official code applies it
        train["lr"] = recipe.lr(data_config.batch_size)
    values = {**config.to_dict(), "output_dir": f"runs/{name}", **train, "data": data_config.to_dict(),
              "model_kwargs": {**config.model_kwargs, **model}}
    return TrainConfig.from_dict(values)


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``overrides`` sorted into TrainConfig, DataConfig and model settings; unknown names refused."""
    train_names, data_names = _fields(TrainConfig) - {"data", "model_kwargs"}, _fields(DataConfig)
    train, data, model, unknown = {}, {}, {}, []
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if section == "model_kwargs" and name:
            model[name] = value
            continue
        if section in ("", "data") and name in data_names:
            data[name] = value
        if section == "" and name in train_names:  # seed is in both: set both
            train[name] = value
        if name not in data.keys() | train.keys() or section not in ("", "data"):
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown recipe override(s) {unknown}: use a training setting "
                         f"({', '.join(sorted(train_names))}), a data setting (data.NAME: "
                         f"{', '.join(sorted(data_names))}) or model_kwargs.NAME")
    return train, data, model
