"""Shared command-line plumbing of every verb: one-line errors, --config/--set, --debug, --version,
--threads.

Every verb's ``main`` is wrapped by :func:`run`, so bad input ends with one line on
stderr and exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import socket
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from edgediag.errors import UserError  # noqa: F401 - re-exported: verbs raise cli.UserError

EXIT_USAGE = 2  # bad input: path, model name, config key, checkpoint
EXIT_INTERNAL = 1
LOCK_NAME = ".edgediag.lock"  # in an output folder while a run writes into it


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: a bad argument is ``error: ...`` and exit 2
    through :func:`run`, not the usage block (ten lines for the verbs with many options)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from edgediag import __version__

    parser = _Parser(prog=f"python -m edgediag.{prog}", description=description)
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
    parser.add_argument("--data", metavar="DIR", help="data folder (default: the one recorded in the artifact)")
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
    parser.add_argument("--threads", type=threads, default=default, metavar="N", help=help)


def add_alias(parser: argparse.ArgumentParser, action: argparse.Action, *aliases: str) -> argparse.Action:
    """Old spellings of an option (``--model`` for ``--checkpoint``, ``--iters`` for
    ``--latency-runs``): they parse into ``action`` as if its own option string were given,
    while --help, the usage line and the errors name only the new spelling."""
    for alias in aliases:
        if alias in parser._option_string_actions:
            raise ValueError(f"{alias} is already an option of {parser.prog}")
        parser._option_string_actions[alias] = action  # argparse looks options up here
    return action


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


@contextlib.contextmanager
def locked_output(path, keep_on_failure: bool = False) -> Iterator[Path]:
    """``--out`` checked (:func:`output_folder`), created and locked for the run: a second run
    into the same folder refuses with one line while this one lives. The lock is a file
    created with O_EXCL holding ``pid host``, removed when the run ends; a lock left by a run
    that died (its pid is gone on this host) is taken over. When the run fails, a folder it
    created is removed with what it wrote there (``keep_on_failure``: only if it is empty,
    for files a later run can use, such as train's resumable last.pt)."""
    out = output_folder(path)
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    lock = out / LOCK_NAME
    try:
        _take_lock(lock)
    except BaseException:
        _remove_empty(created)  # never a folder another run holds: its lock is in it
        raise
    try:
        yield out
    except BaseException:
        if created and not keep_on_failure:
            shutil.rmtree(out, ignore_errors=True)  # still ours: the lock is held until it is gone
        lock.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    lock.unlink(missing_ok=True)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first, while empty
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            break


def _take_lock(lock: Path) -> None:
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = lock.read_text(errors="replace").split()
            except FileNotFoundError:
                continue  # released meanwhile
            except OSError as exc:
                raise UserError(f"--out {lock.parent}: cannot read its lock {lock} ({exc.strerror or exc})") from None
            pid = int(owner[0]) if owner and owner[0].isdigit() else 0
            host = owner[1] if len(owner) > 1 else socket.gethostname()
            if pid > 0 and (host != socket.gethostname() or _alive(pid)):
                raise UserError(f"--out {lock.parent} is in use by another edgediag run (pid {pid} on {host}); "
                                f"wait for it or choose another --out (delete {lock} if no run uses it)") from None
            lock.unlink(missing_ok=True)  # stale: the run that held it is gone
            continue
        except OSError as exc:
            raise UserError(f"--out {lock.parent}: cannot write into it ({exc.strerror or exc})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        return
    raise UserError(f"--out {lock.parent}: could not take its lock {lock}; try again")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
