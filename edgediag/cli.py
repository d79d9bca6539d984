"""Shared command-line plumbing of every verb: one-line errors, --config/--set, --debug, --version,
--threads and the timing flags, --json, output folders and the run's log.

Every verb's ``main`` is wrapped by :func:`run`, so bad input ends with one line on
stderr and exit code 2 (a traceback only with ``--debug``). Inside :func:`run` the terminal
shows edgediag's own log records and warnings; other libraries' warnings (torch-pruning,
torch.onnx, onnx, onnxruntime, sklearn...) and log records go to the run's log file,
``edgediag.log`` in its output folder (created only when there is something to write), and
one line at the end says how many there were (``--debug`` shows them all on the terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from edgediag.errors import UserError  # noqa: F401 - re-exported: verbs raise cli.UserError

EXIT_USAGE = 2  # bad input: path, model name, config key, checkpoint
EXIT_INTERNAL = 1
LOCK_NAME = ".edgediag.lock"  # in an output folder while a run writes into it
LOG_NAME = "edgediag.log"  # other libraries' warnings and log records of the run (kept off the terminal)


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


def count_arg(minimum: int):
    def count(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, not {text!r}")
        return n
    return count


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object on stdout instead of the table "
                             "(everything else goes to stderr)")


_json_out: list = []  # the stdout the --json report goes to (innermost json_stdout block last)


@contextlib.contextmanager
def json_stdout(enabled: bool) -> Iterator[None]:
    """With ``--json``: inside the block, stdout is kept for the one JSON report
    (:func:`report_stream`) and whatever else is printed goes to stderr."""
    if not enabled:
        yield
        return
    _json_out.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_out.pop()


def report_stream():
    """Where a --json report is printed: the stdout saved by :func:`json_stdout`; None when
    the report is a table (printed to stdout)."""
    return _json_out[-1] if _json_out else None


# --- reports: aligned tables, or one JSON object with --json ---------------------------------------
@dataclasses.dataclass(frozen=True)
class Column:
    """One column: the row key it shows, its header (default: the key) and a format spec
    for numbers (``",d"``, ``".3f"``...; default: :func:`cell`'s precision)."""

    key: str
    header: str = ""
    fmt: str = ""

    @property
    def title(self) -> str:
        return self.header or self.key


def cell(value, fmt: str = "") -> str:
    """A value as a table shows it: integers with thousands separators, floats to about four
    significant digits (scores to 4 decimals, large figures without decimals), a missing or
    non-finite value as ``n/a``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and fmt:
        return format(value, fmt)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        size = abs(value)
        if size == 0:
            return "0"
        if size >= 1e4:
            return f"{value:,.0f}"
        if size >= 1:
            return f"{value:.{max(0, 3 - int(math.floor(math.log10(size))))}f}"
        return f"{value:.4f}" if size >= 1e-3 else f"{value:.2e}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[Column], markdown: bool = False) -> str:
    """``rows`` aligned under ``columns``: numbers right-aligned, text left-aligned."""
    cells = [[cell(r.get(c.key), c.fmt) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c.key), (int, float)) or r.get(c.key) is None for r in rows) for c in columns]
    if markdown:
        lines = ["| " + " | ".join(c.title for c in columns) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c.title), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()
    return "\n".join([line([c.title for c in columns]), "  ".join("-" * w for w in widths),
                      *(line(row) for row in cells)])


def table_report(rows: Sequence[dict], columns: Sequence[Column], **fields) -> dict:
    """A report whose table is ``rows`` under ``columns``: ``{**fields, "columns": {key:
    header}, "rows": [{key: value}]}`` (the raw values the table formats)."""
    return {**fields, "columns": {c.key: c.title for c in columns},
            "rows": [{c.key: r.get(c.key) for c in columns} for r in rows]}


def jsonable(value):
    """``value`` as strict JSON takes it: non-finite floats as None, numpy scalars and arrays,
    tensors and paths as plain values, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays, tensors
        return jsonable(value.tolist())
    return str(value)


def show(report: dict, text: str | None = None, warnings: Sequence[str] = ()) -> None:
    """Print a verb's report: ``text`` (default: the table of a :func:`table_report`) and
    then ``warnings`` on stdout; or, with ``--json``, the report as one JSON object
    (non-finite numbers as null) on the stdout :func:`edgediag.cli.json_stdout` kept for
    it, and the warnings on stderr."""
    stream = report_stream()
    if stream is not None:
        for w in warnings:
            print(w, file=sys.stderr)
        stream.write(json.dumps(jsonable(report)) + "\n")
        stream.flush()
        return
    if text is None:
        columns = [Column(k, h) for k, h in report["columns"].items()]
        text = format_table(report["rows"], columns)
    print("\n".join([text, *warnings]), file=sys.stdout, flush=True)


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
        with run_log(out):
            yield out
    except BaseException:
        if created and not keep_on_failure:
            shutil.rmtree(out, ignore_errors=True)  # still ours: the lock is held until it is gone
        elif created and {p.name for p in out.iterdir()} <= {LOCK_NAME, LOG_NAME}:
            (out / LOG_NAME).unlink(missing_ok=True)  # nothing else kept: no folder left for a log alone
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


# --- the run's log: edgediag's records on the terminal, other libraries' in the log file ---------
_PACKAGE = Path(__file__).resolve().parent


class _Terminal(logging.StreamHandler):
    """stderr as it is when a record comes (tests and --json swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class _RunLog(logging.Handler):
    """Records kept off the terminal: written to the innermost attached folder's log file,
    held until one is attached; counted for the line at the end of the run."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.folders: list[Path] = []
        self.held: list[logging.LogRecord] = []
        self.count = 0
        self.written: list[Path] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.held.append(record)
        if self.folders:
            self.flush_to(self.folders[-1])

    def flush_to(self, folder: Path) -> None:
        if not self.held:
            return
        path = folder / LOG_NAME
        try:
            with open(path, "a", encoding="utf-8") as f:
                for record in self.held:
                    f.write(self.format(record) + "\n")
        except OSError:
            return  # kept for the next folder; the count is reported either way
        self.held.clear()
        if path not in self.written:
            self.written.append(path)


_routing: list[tuple[_RunLog, bool]] = []  # (the run's log, --debug) while cli.run runs


def _own(record: logging.LogRecord) -> bool:
    """A record for the terminal: edgediag's own (its loggers, warnings raised in its files)
    and errors of anyone."""
    if record.name == "py.warnings":
        return bool(getattr(record, "own", False))
    return record.name.split(".")[0] in ("edgediag", "__main__") or record.levelno >= logging.ERROR


def _issuer() -> str:
    """The file whose code raised the warning being shown: the first frame outside the
    warnings machinery (not the file ``stacklevel`` names: librosa's warnings name the
    edgediag line that called it)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in (warnings.__file__, __file__):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    issuer = _issuer()
    own = bool(issuer) and str(Path(issuer).resolve()).startswith(str(_PACKAGE) + os.sep)
    logging.getLogger("py.warnings").warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno,
                                             extra={"own": own})


@contextlib.contextmanager
def routed_logging(debug: bool) -> Iterator[_RunLog]:
    """Logging and warnings for one run of a verb: INFO and up (DEBUG with --debug); on the
    terminal edgediag's own records (everything with --debug); the others to the run's log.
    Where the host process has configured logging already (as logging.basicConfig, its
    handlers are left as they are) only the run's log is added."""
    root = logging.getLogger()
    terminal, runlog = _Terminal(), _RunLog()
    terminal.setFormatter(logging.Formatter("%(message)s"))
    if not debug:
        terminal.addFilter(_own)
        runlog.addFilter(lambda r: not _own(r))
    saved = (root.level, root.handlers[:], warnings.showwarning)
    if not root.handlers:  # a host that configured logging (pytest, an application) keeps its handlers
        root.setLevel(logging.DEBUG if debug else logging.INFO)
        root.addHandler(terminal)
    if not debug:
        root.addHandler(runlog)
    warnings.showwarning = _show_warning
    _routing.append((runlog, debug))
    try:
        yield runlog
    finally:
        _routing.pop()
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        warnings.showwarning = saved[2]


@contextlib.contextmanager
def run_log(folder) -> Iterator[None]:
    """Inside the block the run's hidden records go to ``folder/edgediag.log`` (those held
    from before included); nothing happens outside :func:`run`."""
    if not _routing:
        yield
        return
    runlog = _routing[-1][0]
    runlog.folders.append(Path(folder))
    runlog.flush_to(Path(folder))
    try:
        yield
    finally:
        runlog.folders.pop()


def run_log_moved(old_folder, new_folder) -> None:
    """The folder a run's log was written into is now ``new_folder`` (export's staging
    folder, renamed into place)."""
    for runlog, _ in _routing:
        runlog.written = [Path(new_folder) / LOG_NAME if p == Path(old_folder) / LOG_NAME else p
                          for p in runlog.written]


def _say_hidden(runlog: _RunLog) -> None:
    if not runlog.count:
        return
    where = [str(p) for p in runlog.written if p.exists()]
    if runlog.held:
        where.append(f"{len(runlog.held)} not written (no output folder; --debug shows them)")
    print(f"{runlog.count} warning(s)/log record(s) of other libraries: {', '.join(where)}", file=sys.stderr)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and turn failures into one line + exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    with routed_logging(debug) as runlog:
        code = _run(main, args, debug)
        if code == 0:  # a failure stays one line (--debug shows everything)
            _say_hidden(runlog)
        return code


def _run(main: Callable[[Sequence[str] | None], int], args: list[str], debug: bool) -> int:
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
