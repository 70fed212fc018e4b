"""Structural checks of JSON documents read from datasets and run folders (manifests, shard indices,
checkpoint state): malformed text, wrong types, missing keys and deep nesting become one
:class:`DocumentError` line that names the file, never an ``AttributeError`` or ``RecursionError``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

MAX_DEPTH = 64

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTAINERS = frozenset((dict, list))


class DocumentError(ValueError):
    """A JSON document is malformed or does not have the expected structure; the message names it."""


def load_json(data: bytes | str, where: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text; undecodable text and nesting deeper than ``max_depth`` are one-line errors."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise DocumentError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:
        raise DocumentError(f"{where}: not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    depth = nesting_depth(doc)
    if depth > max_depth:
        raise DocumentError(f"{where}: JSON nested {depth} levels deep, more than the {max_depth} allowed")
    return doc


def nesting_depth(doc: Any) -> int:
    """The container depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if _CONTAINERS.isdisjoint(map(type, children)):  # long flat columns: one pass in C
            continue
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def count(v: Any) -> str | None:
    return None if is_int(v) and v >= 0 else "a non-negative integer"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) else "an object"


def array(v: Any) -> str | None:
    return None if isinstance(v, list) else "a list"


def sha256_hex(v: Any) -> str | None:
    return None if isinstance(v, str) and HEX64.fullmatch(v) else "a sha256 hex digest"


def safe_name(v: Any) -> str | None:
    return None if isinstance(v, str) and SAFE_NAME.fullmatch(v) else "a plain file name ([A-Za-z0-9._-], no '%')"


def list_of(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A list whose every item passes ``check``."""
    def inner(v: Any) -> str | None:
        if not isinstance(v, list):
            return "a list"
        bad = next((i for i, x in enumerate(v) if check(x) is not None), None)
        return None if bad is None else f"a list of {check(v[bad])} (item {bad} is {_show(v[bad])})"
    return inner


def int_list(v: Any) -> str | None:
    """A list of non-negative integers (checked fast: these columns hold one entry per sample)."""
    if not isinstance(v, list):
        return "a list"
    if set(map(type, v)) <= {int} and (not v or min(v) >= 0):
        return None
    bad = next(i for i, x in enumerate(v) if not (type(x) is int and x >= 0))
    return f"a list of non-negative integers (item {bad} is {_show(v[bad])})"


def str_list(v: Any) -> str | None:
    if not isinstance(v, list):
        return "a list"
    if set(map(type, v)) <= {str}:
        return None
    bad = next(i for i, x in enumerate(v) if type(x) is not str)
    return f"a list of strings (item {bad} is {_show(v[bad])})"


def _show(v: Any) -> str:
    return f"{type(v).__name__} {json.dumps(v)[:40]}" if not isinstance(v, (dict, list)) else type(v).__name__


Check = Callable[[Any], "str | None"]


def check_fields(doc: Any, where: str, required: Mapping[str, Check],
                 optional: Mapping[str, Check] | None = None, what: str = "document") -> dict[str, Any]:
    """``doc`` must be an object with every ``required`` key; each present key must pass its check."""
    if not isinstance(doc, dict):
        raise DocumentError(f"{where}: the {what} must be a JSON object, got {type(doc).__name__}")
    missing = [k for k in required if k not in doc]
    if missing:
        raise DocumentError(f"{where}: the {what} lacks key(s) {missing}")
    for key, check in (*required.items(), *(optional or {}).items()):
        if key in doc:
            problem = check(doc[key])
            if problem is not None:
                got = "" if "(item" in problem else f", got {_show(doc[key])}"
                raise DocumentError(f"{where}: {key!r} must be {problem}{got}")
    return doc
