"""Bounded, safe reading of YAML/TOML documents (suites, bench files).

Everything read from disk is untrusted: the document size, its nesting depth and the number of
values it expands to (YAML aliases can make a small file a huge tree: "billion laughs") are capped
before anything is built from it, non-UTF-8 bytes are refused, and so is any non-finite float
(`.inf`, `.nan`) anywhere in the document. Numbers in exponent form without a dot (`1e-3`, `1E5`,
`2.5e3`), which YAML 1.1 reads as strings, are read as floats, as YAML 1.2 and TOML do.
Every problem is one `SuiteError` line naming the file (and the key path where there is one).
"""
from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from harness.errors import SuiteError, short_repr

MAX_DOCUMENT_BYTES = 1 << 20  # 1 MiB: a suite is a few KiB
MAX_DEPTH = 64  # nesting of mappings / lists
MAX_VALUES = 100_000  # values after alias expansion

# YAML 1.2 core-schema floats that YAML 1.1's resolver misses: an exponent without a dot
# (1e-3, 1E5) or without a sign (1.0e5). Forms with a dot and a signed exponent already resolve.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Limited(yaml.composer.ComposerError):
    """A document over one of the limits (raised while composing, before any object is built)."""


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with a nesting-depth cap, an alias-expansion cap and YAML 1.2 exponent floats."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D401 - PyYAML hook
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Limited(None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


BoundedSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a node graph that expands to more than MAX_VALUES values or refers to itself.

    Aliases share nodes, so the graph is a DAG (or has cycles); the expanded size is computed once
    per node (memoised), iteratively (no recursion on deep graphs).
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            children = _children(node)
            total = 1 + sum(size[id(c)] for c in children)
            if total > MAX_VALUES:
                raise _Limited(None, None, f"expands to more than {MAX_VALUES} values (through YAML aliases?)",
                               node.start_mark)
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise _Limited(None, None, "an alias refers to a node that contains it (recursive structure)",
                           node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _depth_ok(data: Any) -> bool:
    """True when `data` (plain dicts/lists) nests at most MAX_DEPTH levels (iterative)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return False
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)
    return True


def non_finite_path(data: Any, prefix: str = "") -> tuple[str, float] | None:
    """The key path and value of the first non-finite float in `data`, or None."""
    stack: list[tuple[str, Any]] = [(prefix, data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where or "<top>", value
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file")
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise SuiteError(f"{path}: {size} bytes is larger than the {MAX_DOCUMENT_BYTES}-byte limit of a suite")
        raw = path.read_bytes()[: MAX_DOCUMENT_BYTES + 1]  # the file may grow between stat and read
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise SuiteError(f"{path}: larger than the {MAX_DOCUMENT_BYTES}-byte limit of a suite")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SuiteError(f"{path}: line {line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})"
                         ) from None


def read_mapping(path: Path) -> dict:
    """The top-level mapping of a YAML or TOML file, within the limits above; SuiteError otherwise."""
    path = Path(path)
    text = _read_text(path)
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        data = tomllib.loads(text) if kind == "TOML" else yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506
    except RecursionError:
        raise SuiteError(f"{path}: invalid {kind}: nested more than {MAX_DEPTH} levels deep") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        first = where + " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise SuiteError(f"{path}: invalid {kind}: {first}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (Python's int-conversion limit)
        raise SuiteError(f"{path}: invalid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if not _depth_ok(data):
        raise SuiteError(f"{path}: invalid {kind}: nested more than {MAX_DEPTH} levels deep")
    bad = non_finite_path(data)
    if bad is not None:
        raise SuiteError(f"{path}: {bad[0]}: {short_repr(bad[1])} is not a finite number")
    return data
