"""The board side runs on JetPack 5's Python 3.8: every module a board imports (the
runtime, the verify / monitor / tegrastats verbs, and what they import at module
level) must parse and run there. Checked with vermin on exactly that set of modules."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "edgediag"
BOARD_ENTRIES = ["edgediag.runtime", "edgediag.verify", "edgediag.monitor", "edgediag.tegrastats"]


def module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return PKG / "__init__.py"
    for path in (PKG.joinpath(*parts, "__init__.py"), PKG.joinpath(*parts[:-1], parts[-1] + ".py")):
        if path.is_file():
            return path
    return None


def top_level_imports(path: Path) -> set[str]:
    """edgediag modules imported at module level (lazy imports inside functions are the
    torch paths a board never takes), with their parent packages (imported first)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "edgediag":
                out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def board_modules() -> list[Path]:
    seen, todo, files = set(), list(BOARD_ENTRIES), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue  # an attribute (from edgediag.x import function), not a module
        files.add(path)
        todo += sorted(top_level_imports(path) - seen)
    return sorted(files)


def test_board_modules_import_no_torch_stage_code():
    names = {str(p.relative_to(PKG)) for p in board_modules()}
    assert "runtime/predictor.py" in names and "verify.py" in names and "deploy/metadata.py" in names
    assert not any(n.startswith(("engine/", "models/", "compress/", "nn/", "ops/")) for n in names), sorted(names)


def test_board_modules_run_on_python_3_8():
    vermin = shutil.which("vermin") or shutil.which("vermin", path=str(Path(sys.executable).parent))
    if vermin is None:
        pytest.skip("vermin is not installed (pip install -e '.[dev]')")
    files = [str(p) for p in board_modules()]
    res = subprocess.run([vermin, "-t=3.8-", "--no-tips", "--violations", *files], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_pyproject_installs_only_the_board_side_on_python_3_8():
    import tomllib

    project = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.8"
    unconditional = {d.split(">=")[0] for d in project["dependencies"] if ";" not in d}
    assert unconditional <= {"numpy", "onnxruntime", "soundfile", "pyyaml"}  # what the board modules import
    assert any(d.startswith("torch") and "python_version >= '3.10'" in d for d in project["dependencies"])
    assert {"numpy", "onnxruntime"} <= {d.split(">=")[0] for d in project["optional-dependencies"]["board"]}


def test_an_old_python_gets_one_line_naming_what_needs_3_10():
    import edgediag

    assert edgediag.needs_newer_python("edgediag.train") == ""  # this Python is new enough
    for module in ("edgediag.train", "edgediag.models.ldmamba", "edgediag.deploy.pipeline", "edgediag.export"):
        assert "needs Python >= 3.10 (this is 3.8)" in edgediag.needs_newer_python(module, (3, 8))
    for path in board_modules():
        parts = path.relative_to(PKG).with_suffix("").parts
        name = ".".join(("edgediag", *[p for p in parts if p != "__init__"]))
        assert edgediag.needs_newer_python(name, (3, 8)) == "", name
    # the guard itself, as a 3.8 interpreter installs it (the minimum raised instead)
    code = ("import edgediag; edgediag.MIN_TRAINING_PYTHON = (99, 0); edgediag._install_board_guard()\n"
            "import edgediag.runtime, edgediag.verify\n"
            "try:\n    import edgediag.train\nexcept ImportError as e:\n    print(e)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PKG.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith("edgediag.train needs Python >= 99.0")


def board_python() -> tuple[str, str]:
    """(interpreter, PYTHONPATH) for the board side: `make board-venv`'s Python 3.8 venv with
    only the `board` extra where it exists, else this interpreter with its site-packages."""
    import sysconfig

    board = PKG.parent / ".venv-board" / "bin" / "python"
    if board.exists():
        return str(board), str(PKG.parent)
    return sys.executable, f"{PKG.parent}:{sysconfig.get_paths()['purelib']}"


def test_board_modules_import_under_the_oldest_python_here_without_torch(tmp_path):
    """Every board module imports, and `verify` checks a real bundle, under the board's
    interpreter (Python 3.8 from `make board-venv`, as JetPack 5) with torch unimportable."""
    from tests.test_runtime import build_band_artifacts

    python, path = board_python()
    names = []
    for module in board_modules():
        parts = module.relative_to(PKG).with_suffix("").parts
        names.append(".".join(("edgediag", *[p for p in parts if p != "__init__"])))
    bundle = build_band_artifacts(tmp_path)["onnx"].parent
    code = ("import importlib, sys\nsys.modules['torch'] = None\n"
            f"for name in {sorted(set(names))!r}:\n    importlib.import_module(name)\n"
            "from edgediag import cli, verify\n"
            f"code = cli.run(verify.main, [{str(bundle)!r}, '--threads', '1'])\n"
            "print('python', '.'.join(map(str, sys.version_info[:2])), 'verify', code)")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, f"{python}: {res.stderr[-2000:]}"
    assert res.stdout.strip().splitlines()[-1].endswith("verify 0"), res.stdout
    if ".venv-board" in python:
        assert "python 3.8" in res.stdout or "python 3.9" in res.stdout
