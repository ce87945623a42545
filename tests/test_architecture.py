"""Static checks of the rules in DESIGN.md that no behavioural test would notice."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("src", "node", "coordinator", "bench", "tests")
NETWORK_MODULES = (
    "grpc",
    "starling.exchange",
    "starling.v1",
    "starling.node",
    "starling.coordinator",
    "socket",
    "http",
    "urllib",
    "requests",
)


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_model_code_knows_nothing_of_the_network() -> None:
    imports = imported_modules(ROOT / "src" / "starling" / "model.py")
    assert not [m for m in imports if m.startswith(NETWORK_MODULES)], imports


@pytest.mark.parametrize("path", python_files("src"), ids=lambda p: p.name)
def test_core_never_imports_node_or_coordinator(path: Path) -> None:
    bad = [
        m for m in imported_modules(path) if m.startswith(("starling.node", "starling.coordinator"))
    ]
    assert not bad, f"{path}: {bad}"


def test_no_pickle_and_no_unsafe_torch_load() -> None:
    offenders = []
    this_file = Path(__file__).resolve()
    for path in python_files(*CODE_DIRS):
        if path.resolve() == this_file:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if {"pickle", "cPickle", "dill", "cloudpickle"} & imported_modules(path):
            offenders.append(f"{path}: imports pickle")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and getattr(node.func.value, "id", "") == "torch"
            ):
                safe = any(
                    k.arg == "weights_only" and getattr(k.value, "value", None) is True
                    for k in node.keywords
                )
                if not safe:
                    offenders.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert not offenders, offenders


@pytest.mark.parametrize(
    "folder, forbidden",
    [("node", "starling.coordinator"), ("coordinator", "starling.node")],
)
def test_node_and_coordinator_never_import_each_other(folder: str, forbidden: str) -> None:
    """They talk only through proto/ (DESIGN.md); `starling demo` starts the coordinator
    as a process, it does not import it."""
    offenders = {
        str(path): sorted(m for m in imported_modules(path) if m.startswith(forbidden))
        for path in python_files(folder)
    }
    assert not {p: m for p, m in offenders.items() if m}
