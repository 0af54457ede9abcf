"""The shape of the code a newcomer reads: no module in src/ over 400 lines, no class over 250,
no function over 6 parameters or 70 lines; and a transport known only through the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "netloader"
MAX_MODULE, MAX_CLASS, MAX_FUNCTION, MAX_PARAMETERS = 400, 250, 70, 6


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def oversized(path: Path) -> list[str]:
    """What in ``path`` breaks the size rules, one line each."""
    source = path.read_text()
    found = []
    if (lines := len(source.splitlines())) > MAX_MODULE:
        found.append(f"module of {lines} lines")
    for node in ast.walk(ast.parse(source)):
        length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.ClassDef) and length > MAX_CLASS:
            found.append(f"class {node.name} of {length} lines")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            count = len([a for a in named if a.arg not in ("self", "cls")])
            if length > MAX_FUNCTION:
                found.append(f"function {node.name} of {length} lines")
            if count > MAX_PARAMETERS:
                found.append(f"function {node.name} with {count} parameters")
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_sizes(path):
    assert not oversized(path), oversized(path)


def test_the_size_check_sees_what_it_guards(tmp_path):
    wide = ", ".join(f"a{i}" for i in range(7))
    body = "\n".join(f"    x{i} = {i}" for i in range(71))
    sample = tmp_path / "sample.py"
    sample.write_text(f"def f({wide}):\n    pass\n\n\ndef g():\n{body}\n")
    assert oversized(sample) == ["function f with 7 parameters", "function g of 72 lines"]


def test_only_the_registry_names_transport_classes():
    """Server, client and integrations reach transports through ``netloader.transport``
    (engines by name), never a transport's module: a new transport is its module plus one
    registration line. (The benchmark measures raw gloo as a baseline, so it may.)"""
    users = [p for p in modules() if {"server", "client", "integrations"} & set(p.parts)]
    for path in [*users, SRC / "cli.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("netloader.transport."), (path, node.module)
