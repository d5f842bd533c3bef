"""The ``dyntok`` command. Each sub-command lives in its own module with ``add_parser`` and ``run``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "build_parser"]

#: Sub-command name -> module (relative to this package). Modules are imported lazily so that
#: ``dyntok --help`` stays fast.
SUBCOMMANDS = {
    "train": ".train",
    "eval": ".evaluate",
    "bench": ".bench",
    "report": ".report",
    "models": ".models",
    "labels": ".labels",
    "show": ".show",
    "pretrain": ".pretrain",
    "convert": ".convert",
}


def _available_subcommands() -> dict[str, object]:
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        try:
            modules[name] = importlib.import_module(module_name, __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}{module_name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dyntok",
        description="Input-adaptive Vision Transformers: train, evaluate and benchmark DVT, DynamicViT and "
                    "friends against dense and static baselines, with compute and speed measured for real.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _available_subcommands().items():
        sub = module.add_parser(subparsers, name)
        sub.set_defaults(run=module.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "fix the input and run again": one line for each, never a traceback."""
    from ..fileio import CheckpointWriteError
    from ..training.lock import RunLockedError

    return ValueError, FileNotFoundError, CheckpointWriteError, RunLockedError, FloatingPointError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    user_errors = _user_errors()
    from ..training.distributed import RunStopped
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except user_errors as error:
        # User errors (bad paths, impossible budgets, broken checkpoints) get one clear line, not a traceback.
        print(f"dyntok {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunStopped as stopped:  # its message was printed when it happened
        return stopped.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
