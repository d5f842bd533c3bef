"""``dyntok train``: train any method; the same command runs under ``torchrun`` for DDP."""
from __future__ import annotations

import argparse
import json

from ..fileio import load_meta
from ..methods.registry import model_name
from ..training import TrainConfig, train
from ..training.paper_recipes import PAPER_RECIPES, resolve_recipe
from ..training.trainer import PRETRAINED_INIT
from ._common import add_data_arguments, data_config, parse_knobs

#: The backbone trained when neither --model nor an --init file names one.
DEFAULT_BACKBONE = "vit_cifar_tiny"


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="train a dense ViT or an adaptive method",
        description="Train a model; checkpoints (safetensors) are written to --output-dir every epoch. "
                    "Run under `torchrun --nproc_per_node N` for data-parallel training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    recipe = parser.add_argument_group("paper recipes (docs/training.md)")
    recipe.add_argument("--recipe", choices=sorted(PAPER_RECIPES), default=None,
                        help="a paper's official ImageNet-1k DeiT-S recipe; options given with it override it")
    recipe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override any recipe field: a training or data setting (epochs=1, data.num_workers=2) "
                             "or a model setting (model_kwargs.depth=2); repeatable")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help=f"backbone: a dyntok preset (see `dyntok models`) or a timm plain-ViT name (default: the "
                            f"--init file's backbone and settings, else {DEFAULT_BACKBONE})")
    model.add_argument("--method", default="dense", help="adaptive method applied to the backbone (see `dyntok models`)")
    model.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="model override or method option, e.g. depth=4 or keep_ratio=0.7 (repeatable)")
    model.add_argument("--init", default=None,
                       help="start from this dense model.safetensors, or 'pretrained' for the backbone's reference "
                            "shipped with dyntok (and use it as the teacher if the method wants one)")
    add_data_arguments(parser)
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="resize every image to NxN (needed for a folder of mixed sizes); build the model for "
                             "it with --model-arg img_size=N")
    data = parser.add_argument_group("data loading")
    data.add_argument("--data-path", choices=("auto", "memory", "stream"), default="auto",
                      help="memory: decode the dataset once into RAM; stream: decode batches from disk in worker "
                           "processes (needs --image-size); auto: stream when the decoded dataset would not fit "
                           "in memory")
    data.add_argument("--num-workers", type=int, default=4, help="decoding processes of the streaming path")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=float, default=10.0, help="epochs (fractions allowed)")
    optim.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    optim.add_argument("--accum-steps", type=int, default=1,
                       help="gradient accumulation: each process loads batch/(processes x N) images N times per "
                            "step, to reach the global --batch-size on fewer GPUs")
    optim.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms/biases/tokens)")
    optim.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length")
    optim.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the task loss")
    optim.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping (0 disables)")
    optim.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights with this decay")
    optim.add_argument("--randaugment", type=int, nargs=2, default=None, metavar=("OPS", "MAGNITUDE"),
                       help="torchvision RandAugment, e.g. 2 9")
    optim.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 disables)")
    optim.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 disables)")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default=None, help="where checkpoints and logs go (default: runs/<model name>)")
    run.add_argument("--resume", action="store_true", help="continue from --output-dir/last.safetensors")
    run.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: each epoch only)")
    run.add_argument("--seed", type=int, default=0, help="seeds data order, augmentation and initialisation")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="bf16 autocast (default: on for GPU, off for CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (~1.45x faster steps on CPU)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def backbone_of(args: argparse.Namespace) -> tuple[str, dict]:
    """The backbone and its settings: ``--model``, else the ``--init`` file's (a ViT adapted with
    ``dyntok.adapt`` and saved names its timm architecture and settings), else the default preset.

    The class count is left to the dataset; ``--model-arg`` settings win over the file's.
    """
    if args.model is not None or args.init in (None, PRETRAINED_INIT):
        return args.model or DEFAULT_BACKBONE, {}
    backbone = load_meta(args.init).get("config", {}).get("backbone", {})
    if "name" not in backbone:
        raise ValueError(f"--init {args.init} names no backbone; pass --model")
    return backbone["name"], {key: value for key, value in backbone.get("overrides", {}).items()
                              if key != "num_classes"}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.recipe:
        return resolve_recipe(args.recipe, recipe_overrides(args))
    backbone, settings = backbone_of(args)
    name = model_name(args.method, backbone)
    data = data_config(args, seed=args.seed, randaugment=args.randaugment, mixup_alpha=args.mixup,
                       cutmix_alpha=args.cutmix, image_size=args.image_size, data_path=args.data_path,
                       num_workers=args.num_workers)
    return TrainConfig(
        model=name, model_kwargs={**settings, **parse_knobs(args.model_arg)}, data=data,
        output_dir=args.output_dir or f"runs/{name}", epochs=args.epochs, accum_steps=args.accum_steps, lr=args.lr,
        min_lr=args.min_lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing, clip_grad=args.clip_grad or None, ema_decay=args.ema_decay,
        init=args.init, seed=args.seed, device=args.device, amp=args.amp, compile=args.compile,
        save_every=args.save_every, resume=args.resume, progress=not args.no_progress)


#: Command-line option (argparse dest) -> the recipe field it overrides, where the names differ.
_RECIPE_FIELDS = {"mixup": "mixup_alpha", "cutmix": "cutmix_alpha"}
#: Options that do not set a recipe field (handled on their own, or meaningless with a recipe).
_NOT_FIELDS = {"recipe", "overrides", "model_arg", "no_progress"}


def recipe_overrides(args: argparse.Namespace) -> dict:
    """The options typed on the command line (not their defaults), ``--set`` and ``--model-arg`` as overrides."""
    given = _typed_options(getattr(args, "command_argv", []))
    if {"model", "method"} & given:
        raise ValueError("--recipe names the model; change it with --model-arg KEY=VALUE or --set, not --model")
    overrides = {_RECIPE_FIELDS.get(dest, dest): getattr(args, dest) for dest in given - _NOT_FIELDS}
    if "clip_grad" in overrides:
        overrides["clip_grad"] = overrides["clip_grad"] or None
    if "no_progress" in given:
        overrides["progress"] = False
    overrides.update({f"model_kwargs.{key}": value for key, value in parse_knobs(args.model_arg).items()})
    overrides.update(parse_knobs(args.overrides))
    return overrides


def _typed_options(argv: list[str]) -> set[str]:
    """The dests of the options present in ``argv`` (parsed again with every default suppressed)."""
    parser = add_parser(argparse.ArgumentParser(add_help=False).add_subparsers(), "train")
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))  # the options every sub-command shares are not fields


def run(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))
    if result.metrics:
        print(json.dumps({"model": str(result.model_path), **result.metrics["test"]}, indent=2))
    return 0
