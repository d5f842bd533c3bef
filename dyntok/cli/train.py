"""``dyntok train``: train any method; the same command runs under ``torchrun`` for DDP."""
from __future__ import annotations

import argparse
import json

from ..fileio import load_meta
from ..methods.registry import model_name
from ..training import TrainConfig, train
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
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=float, default=10.0, help="epochs (fractions allowed)")
    optim.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
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
    backbone, settings = backbone_of(args)
    name = model_name(args.method, backbone)
    data = data_config(args, seed=args.seed, randaugment=args.randaugment, mixup_alpha=args.mixup,
                       cutmix_alpha=args.cutmix, image_size=args.image_size)
    return TrainConfig(
        model=name, model_kwargs={**settings, **parse_knobs(args.model_arg)}, data=data,
        output_dir=args.output_dir or f"runs/{name}", epochs=args.epochs, lr=args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad or None, ema_decay=args.ema_decay, init=args.init, seed=args.seed,
        device=args.device, amp=args.amp, compile=args.compile, save_every=args.save_every, resume=args.resume,
        progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))
    if result.metrics:
        print(json.dumps({"model": str(result.model_path), **result.metrics["test"]}, indent=2))
    return 0
