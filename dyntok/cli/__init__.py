"""The ``dyntok`` command. Each sub-command lives in its own module with ``add_parser`` and ``run``."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

__all__ = ["main", "build_parser", "DEBUG_ENV"]

#: Environment variable that, like ``--debug``, shows tracebacks instead of one-line errors.
DEBUG_ENV = "DYNTOK_DEBUG"
#: Exit code after Ctrl-C, as a shell reports a process ended by SIGINT.
INTERRUPTED = 128 + signal.SIGINT

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
    "export": ".export",
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


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option answered in one line (and where to read more) instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dyntok",
        description="Input-adaptive Vision Transformers: train, evaluate and benchmark DVT, DynamicViT and "
                    "friends against dense and static baselines, with compute and speed measured for real.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _available_subcommands().items():
        sub = module.add_parser(subparsers, name)
        _add_general_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _add_general_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models.limits import ALLOW_LARGE_ENV, ALLOW_LARGE_OPTION, MAX_PARAMETERS

    group = parser.add_argument_group("general")
    group.add_argument("--debug", action="store_true",
                       help=f"show the full traceback of an error instead of one line (or set {DEBUG_ENV}=1)")
    group.add_argument(ALLOW_LARGE_OPTION, action="store_true",
                       help=f"build models beyond dyntok's size bound ({MAX_PARAMETERS / 1e9:g} billion parameters; "
                            f"or set {ALLOW_LARGE_ENV}=1): the bound guards against sizes from files and typos")


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Every failure a user can cause ends in one line naming the cause and the fix and a
    non-zero exit code; ``--debug`` (or ``DYNTOK_DEBUG=1``) shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_argv = argv[argv.index(args.command) + 1:]  # what was typed after the sub-command's name
    from ..models.limits import ALLOW_LARGE_ENV
    from ..training.distributed import RunStopped
    from ._errors import explain

    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    allowed = os.environ.get(ALLOW_LARGE_ENV)
    if args.allow_large_model:  # through the environment, which every model build reads (bench entries too)
        os.environ[ALLOW_LARGE_ENV] = "1"
    try:
        return args.run(args) or 0
    except RunStopped as stopped:  # its message was printed when it happened
        return stopped.exit_code
    except BrokenPipeError:  # the reader went away (`dyntok models | head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    except KeyboardInterrupt:
        print(f"dyntok {args.command}: interrupted (Ctrl-C); files already written are complete", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:
        if debug:
            raise
        message, code = explain(error)
        print(f"dyntok {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:  # main() also runs in-process (tests, notebooks): leave the environment as it was
        if allowed is None:
            os.environ.pop(ALLOW_LARGE_ENV, None)
        else:
            os.environ[ALLOW_LARGE_ENV] = allowed


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
