"""The package's layout rules, read from its source (issue 21): imports go one way, stages
ask the registry instead of naming model or layer classes, the board-side runtime imports
no torch, modules stay short. A failure names the offending module and import."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "edgediag"
VERBS = {"train", "evaluate", "predict", "prune", "export", "bench", "monitor", "demo", "tegrastats", "verify",
         "__main__"}
STAGES = ("compress", "deploy", "measure", "runtime")
# Lower layers never import higher ones. Stages sit side by side (the cycle test keeps them
# one-way among themselves); a verb is the top and imports no other verb.
LAYERS = {"core": 0, "ops": 1, "nn": 2, "data": 3, "engine": 4, "models": 5, **dict.fromkeys(STAGES, 6), "verb": 7}
MAX_LINES, MAX_VERB_LINES = 600, 150


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "core"
    if len(parts) == 2 and parts[1] in VERBS:
        return "verb"
    return parts[1] if parts[1] in LAYERS else "core"


def imports(mod: str, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(edgediag module, line) of every import in ``mod`` (function-level ones too, unless
    ``top_level_only``): ``from a import b`` counts as ``a.b`` where that is a module."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    base = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = node.module or ""
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                prefix = ".".join(parts + ([prefix] if prefix else []))
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in MODULES and name != mod and name != "edgediag":
                out.append((name, node.lineno))
    return out


def test_no_import_cycle():
    graph = {m: {t for t, _ in imports(m)} for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_go_one_way():
    bad = []
    for mod in MODULES:
        for target, line in imports(mod):
            src, dst = layer(mod), layer(target)
            if src == "verb" and dst == "verb":
                bad.append(f"{mod}:{line} imports the verb {target}")
            elif LAYERS[dst] > LAYERS[src]:
                bad.append(f"{mod}:{line} ({src}) imports {target} ({dst})")
    assert not bad, "\n".join(bad)


def _model_and_layer_classes() -> set[str]:
    """Classes defined by models/ and nn/, less names torch has too (``torch.Generator``,
    ``nn.PReLU``: a stage may use torch's own)."""
    import torch

    names = set()
    for mod, path in MODULES.items():
        if layer(mod) in ("models", "nn"):
            names |= {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}
    return {n for n in names if not hasattr(torch, n) and not hasattr(torch.nn, n)}


def test_stages_name_no_model_or_layer_class():
    """Stage code asks the registry (pruners, gates, export switches) instead of naming a
    model's or layer's class, so a new model family needs no change to any stage."""
    classes = _model_and_layer_classes()
    bad = []
    for mod, path in MODULES.items():
        if layer(mod) not in (*STAGES, "verb"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                    else node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None)
            if name in classes:
                bad.append(f"{mod}:{node.lineno} names {name}")
        bad += [f"{mod}:{line} imports {t}" for t, line in imports(mod) if t.startswith("edgediag.models.")]
    assert not bad, "\n".join(bad)


def test_runtime_imports_no_torch_at_module_level():
    bad = []
    for mod, path in MODULES.items():
        if layer(mod) != "runtime":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{mod}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in ("torch", "onnx")]
    assert not bad, "\n".join(bad)
    # and nothing it imports pulls torch in: import every runtime module with torch made unimportable
    runtime_mods = sorted(m for m in MODULES if layer(m) == "runtime")
    code = ("import sys\nsys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in runtime_mods))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("kind", ["module", "verb"])
def test_modules_are_short(kind):
    limit = MAX_VERB_LINES if kind == "verb" else MAX_LINES
    long = {m: n for m, p in MODULES.items()
            if (layer(m) == "verb") == (kind == "verb") and (n := len(p.read_text().splitlines())) > limit}
    assert not long, f"{kind}s over {limit} lines: {long}"


def test_layering_of_this_test_covers_every_package():
    """A new subpackage must be given a layer here (else it counts as core, the strictest)."""
    packages = defaultdict(list)
    for mod in MODULES:
        parts = mod.split(".")
        if len(parts) > 2 or (len(parts) == 2 and MODULES[mod].name == "__init__.py"):
            packages[parts[1]].append(mod)
    assert set(packages) <= set(LAYERS), set(packages) - set(LAYERS)
