"""The error tree: every code once in ``core/errors.py``, and no code written as a bare string elsewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from marketpipe.core import errors
from marketpipe.core.errors import ERROR_CODES, SKIP_REASONS, UPSTREAM_DOWN, MarketpipeError

SRC = Path(__file__).resolve().parents[2] / "src" / "marketpipe"
CODE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$|^(INTERNAL|UNSUPPORTED|DISABLED|FORBIDDEN|UNAUTHENTICATED)$")
# calls whose positional string arguments are codes
CODE_CALLS = {"_err", "_error", "error_response", "StreamError", "StreamRequestError", "Attempt", "labels"}


def _classes() -> list[type[MarketpipeError]]:
    found: list[type[MarketpipeError]] = []
    todo: list[type[MarketpipeError]] = [MarketpipeError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == errors.__name__:
            found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_error_class_is_in_the_table_under_its_own_code() -> None:
    classes = _classes()
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)
    assert {c.code: c for c in classes} == ERROR_CODES
    assert not SKIP_REASONS & set(ERROR_CODES) and set(ERROR_CODES) >= UPSTREAM_DOWN
    for code, cls in ERROR_CODES.items():
        assert CODE.match(code), code
        assert 400 <= cls.http_status < 600, cls
        assert cls.__name__ in errors.__all__


def test_every_name_in_all_exists() -> None:
    assert len(set(errors.__all__)) == len(errors.__all__)
    for name in errors.__all__:
        assert hasattr(errors, name), name


def _code_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that stand where a code stands: ``code=…``, ``{"code": …}``, ``x.code == …``
    (or ``in (…)``), ``code = …``, a WebSocket close ``"reason"``, the code argument of the calls in
    CODE_CALLS, members of a collection assigned to a ``*CODE*``/``*DOWN*``/``*REASON*`` name."""
    hits: list[tuple[int, str]] = []

    def consts(node: ast.AST | None) -> None:
        if node is None:
            return
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and CODE.match(sub.value):
                hits.append((sub.lineno, sub.value))

    def is_code(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "code") or (
            isinstance(node, ast.Name) and node.id == "code"
        )

    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "code":
            consts(node.value)
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value in ("code", "reason"):  # a WebSocket close reason too
                    consts(v)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            getters = [
                s
                for s in sides
                if isinstance(s, ast.Call)
                and isinstance(s.func, ast.Attribute)
                and s.func.attr == "get"
                and s.args
                and isinstance(s.args[0], ast.Constant)
                and s.args[0].value == "code"
            ]
            if any(is_code(s) for s in sides) or getters:
                for s in sides:
                    consts(s)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", "") for t in targets]
            if any(n == "code" or re.search(r"CODE|DOWN|REASON", n) for n in names):
                consts(node.value)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in CODE_CALLS:
                for a in node.args[:2]:  # (code, message) or (provider, code, …): the message is no code
                    consts(a)
    return hits


def test_no_code_is_a_bare_string_outside_the_error_tree() -> None:
    """Every code used in src/ is declared in core/errors.py, and used there by name (``X.code``)."""
    declared = set(ERROR_CODES) | SKIP_REASONS
    stray: list[str] = []
    undeclared: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "core/errors.py" or rel.startswith(("sim/", "wire/")):  # vendor wire formats, not our codes
            continue
        for line, value in _code_literals(ast.parse(path.read_text())):
            stray.append(f"{rel}:{line}: {value}")
            if value not in declared:
                undeclared.append(f"{rel}:{line}: {value}")
    assert not undeclared, "codes not declared in core/errors.py:\n" + "\n".join(undeclared)
    assert not stray, "codes written as string literals (use SomeError.code):\n" + "\n".join(stray)


@pytest.mark.parametrize(
    "snippet",
    [
        'raise Thing(code="NEW_CODE")',
        'x = {"code": "UNSUPPORTED", "message": "m"}',
        'if exc.code == "STREAM_CLOSED": pass',
        'if a.code in ("DISABLED", "CIRCUIT_OPEN"): pass',
        'self.code = "UNAUTHENTICATED" if s == 401 else "FORBIDDEN"',
        'skipped.append(Attempt(p.name, "PROVIDER_DOWN", "down"))',
        'UPSTREAM_DOWN = frozenset({"RATE_LIMITED"})',
        'if n.get("code") == "SLOW_CONSUMER": pass',
        'raise StreamError(str(problem.get("code") or "STREAM_UNAVAILABLE"), f"{message}")',
        'await send({"type": "websocket.close", "code": 1009, "reason": "HEADERS_TOO_LARGE"})',
    ],
)
def test_the_walk_finds_each_kind_of_code_literal(snippet: str) -> None:
    assert _code_literals(ast.parse(snippet)), snippet
    assert not _code_literals(ast.parse('log.info("event_name", code=exc.code)'))
