"""The package's layout rules, checked on its source (docs/decisions.md, "Layout"): no function over 80 lines, the
model's typed config built in one place, the router computed only by the model, commands importable together."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "moe_jax"
MAX_FUNCTION_LINES = 80


def _trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text(), filename=str(path))


def test_no_function_is_longer_than_80_lines():
    """Counted as ast's end_lineno - lineno + 1 of each def (docstring included, decorators not)."""
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _trees() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def _calls_and_defs(name: str):
    """Where `name(...)` is called and where `def name` / `class name` stands, across the package."""
    calls, defs = [], []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                    calls.append(f"{path}:{node.lineno}")
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                defs.append(str(path))
    return calls, defs


def test_model_config_is_built_in_one_place():
    """ModelConfig is constructed only by config.typed.parse (directly or handed to its piece builder)."""
    calls, defs = _calls_and_defs("ModelConfig")
    assert defs == ["moe_jax/config/typed.py"] and not calls, calls
    uses = [f"{path}:{node.lineno}" for path, tree in _trees() for node in ast.walk(tree)
            if isinstance(node, ast.Call) and any(isinstance(a, ast.Name) and a.id == "ModelConfig"
                                                  for a in node.args)]
    assert len(uses) == 1 and uses[0].startswith("moe_jax/config/typed.py:"), uses


def test_router_logits_are_computed_only_by_the_model():
    calls, defs = _calls_and_defs("router_logits")
    assert all(p.startswith("moe_jax/model/") for p in defs + calls), (defs, calls)
