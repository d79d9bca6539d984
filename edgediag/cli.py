"""Shared command-line plumbing of every verb: one-line errors, --config/--set, --debug, --version,
--threads.

Every verb's ``main`` is wrapped by :func:`run`, so bad input ends with one line on
stderr and exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from edgediag.errors import UserError  # noqa: F401 - re-exported: verbs raise cli.UserError

EXIT_USAGE = 2  # bad input: path, model name, config key, checkpoint
EXIT_INTERNAL = 1


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from edgediag import __version__

    parser = argparse.ArgumentParser(prog=f"python -m edgediag.{prog}", description=description)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"edgediag {__version__}")
    return parser


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the run's configuration")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.lr=3e-4 (repeatable)")


def add_data_args(parser: argparse.ArgumentParser, split_help: str = "which split to score") -> None:
    """``--data``, ``--split`` and ``--set data.KEY=VALUE``: how a stage that reads an artifact's
    data is pointed elsewhere (resolved by :func:`edgediag.data.resolve_data_config`)."""
    parser.add_argument("--data", help="data folder (default: the one recorded in the artifact)")
    parser.add_argument("--split", default="test", choices=["test", "val", "train"], help=split_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                        help="override a data setting, e.g. --set data.normal_labels=[ON] (repeatable)")


def add_threads_arg(parser: argparse.ArgumentParser, default: int | None, help: str, minimum: int = 1) -> None:
    """``--threads N`` (CPU threads for torch and ONNX Runtime), checked at parse time."""
    def threads(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, not {text!r}")
        return n
    parser.add_argument("--threads", type=threads, default=default, help=help)


def output_folder(path) -> Path:
    """``--out`` checked before any work starts: a folder, or a path one can be made at."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a folder")
            break
    return out


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and turn failures into one line + exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    try:
        return int(main(args) or 0)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence for the user
        if debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def entry(main: Callable[[Sequence[str] | None], int]) -> None:
    """``if __name__ == '__main__': entry(main)``"""
    sys.exit(run(main))
