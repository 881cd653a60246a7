"""The benchmark scripts run where CI does not (a GPU machine, a long A/B
run), so a rename in the shim reaches them only when someone runs them: on
2026-12-04 bench/gpu_validate.py failed at import on a lent GPU (ShardList
had moved to ucm.shards). Every `from ucm... import name` in bench/ and
examples/ must name something that exists."""

from __future__ import annotations

import ast
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(
    os.path.join(d, f)
    for d in (os.path.join(ROOT, "bench"), os.path.join(ROOT, "examples"))
    for f in os.listdir(d)
    if f.endswith(".py")
)


def ucm_imports(path: str) -> list[tuple[str, str, int]]:
    """(module, name, line) of every `from ucm... import name` in the file, at any depth."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ucm" and not node.level:
            out.extend((node.module, a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "ucm")
    return out


def test_the_scripts_are_found():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"gpu_validate.py", "store_bench.py", "sched_steps.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_every_ucm_name_a_script_imports_exists(path):
    missing = []
    for module, name, line in ucm_imports(path):
        try:
            m = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"line {line}: {module}: {e}")
            continue
        if name and not hasattr(m, name):
            try:
                importlib.import_module(f"{module}.{name}")  # a submodule
            except ImportError:
                missing.append(f"line {line}: {module} has no {name}")
    assert not missing, f"{os.path.relpath(path, ROOT)}: " + "; ".join(missing)
