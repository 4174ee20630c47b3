"""Documents, queries and updates: the small subset of MongoDB's semantics the tests use.

Filters: field equality (dotted paths), `$eq $ne $gt $gte $lt $lte $in $nin $exists`, `$and
$or`. Updates: `$set $unset $inc`, or a replacement document. Sort: one or more fields,
ascending or descending. Anything else is a CommandError, never a silent wrong answer.
"""

from __future__ import annotations

import copy
from typing import Any

from bson import ObjectId

_MISSING = object()


class CommandError(Exception):
    """A command failure answered as `{ok: 0, errmsg, code, codeName}`."""

    def __init__(self, code: int, code_name: str, message: str, labels: list[str] | None = None):
        super().__init__(message)
        self.code, self.code_name, self.labels = code, code_name, labels or []


def bad_value(message: str) -> CommandError:
    return CommandError(2, "BadValue", message)


def get_path(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


def _type_rank(value: Any) -> int:
    if value is None or value is _MISSING:
        return 0
    if isinstance(value, bool):
        return 5
    if isinstance(value, int | float):
        return 1
    if isinstance(value, str):
        return 2
    if isinstance(value, dict):
        return 3
    if isinstance(value, list):
        return 4
    return 6


def compare(a: Any, b: Any) -> int:
    """A total order close to BSON's: numbers, strings, documents, arrays, then the rest."""
    ra, rb = _type_rank(a), _type_rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if ra == 0:
        return 0
    try:
        return -1 if a < b else (1 if a > b else 0)
    except TypeError:
        sa, sb = repr(a), repr(b)
        return -1 if sa < sb else (1 if sa > sb else 0)


def _equal(value: Any, want: Any) -> bool:
    if isinstance(value, list) and not isinstance(want, list):
        return any(_equal(v, want) for v in value)
    if value is _MISSING:
        return want is None
    return _type_rank(value) == _type_rank(want) and value == want


_ORDERED = {"$gt": lambda c: c > 0, "$gte": lambda c: c >= 0, "$lt": lambda c: c < 0,
            "$lte": lambda c: c <= 0}  # fmt: skip


def _match_operators(value: Any, ops: dict[str, Any]) -> bool:
    for op, arg in ops.items():
        if op == "$eq":
            ok = _equal(value, arg)
        elif op == "$ne":
            ok = not _equal(value, arg)
        elif op in _ORDERED:
            ok = (
                value is not _MISSING
                and _type_rank(value) == _type_rank(arg)
                and _ORDERED[op](compare(value, arg))
            )
        elif op == "$in":
            ok = any(_equal(value, a) for a in arg)
        elif op == "$nin":
            ok = not any(_equal(value, a) for a in arg)
        elif op == "$exists":
            ok = (value is not _MISSING) == bool(arg)
        else:
            raise bad_value(f"unknown operator: {op} (not supported by the test server)")
        if not ok:
            return False
    return True


def matches(doc: dict[str, Any], query: dict[str, Any]) -> bool:
    for key, want in query.items():
        if key == "$and":
            if not all(matches(doc, q) for q in want):
                return False
        elif key == "$or":
            if not any(matches(doc, q) for q in want):
                return False
        elif key.startswith("$"):
            raise bad_value(f"unknown top level operator: {key} (not supported by the test server)")
        elif isinstance(want, dict) and want and all(k.startswith("$") for k in want):
            if not _match_operators(get_path(doc, key), want):
                return False
        elif not _equal(get_path(doc, key), want):
            return False
    return True


def sort_docs(docs: list[dict[str, Any]], spec: dict[str, int]) -> list[dict[str, Any]]:
    import functools

    def cmp(a: dict[str, Any], b: dict[str, Any]) -> int:
        for path, direction in spec.items():
            c = compare(get_path(a, path), get_path(b, path))
            if c:
                return c if direction >= 0 else -c
        return 0

    return sorted(docs, key=functools.cmp_to_key(cmp))


def _set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        doc = doc.setdefault(part, {})
        if not isinstance(doc, dict):
            raise CommandError(28, "PathNotViable", f"cannot create field in {path}")
    doc[parts[-1]] = value


def _unset_path(doc: dict[str, Any], path: str) -> bool:
    parts = path.split(".")
    for part in parts[:-1]:
        doc = doc.get(part)
        if not isinstance(doc, dict):
            return False
    return doc.pop(parts[-1], _MISSING) is not _MISSING


def is_operator_update(update: Any) -> bool:
    if isinstance(update, list):
        raise bad_value("pipeline updates are not supported by the test server")
    keys = list(update)
    if keys and all(k.startswith("$") for k in keys):
        return True
    if any(k.startswith("$") for k in keys):
        raise bad_value("an update mixes operators and fields")
    return False


def apply_update(
    doc: dict[str, Any], update: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(new document, updatedFields, removedFields) of an operator update."""
    new = copy.deepcopy(doc)
    updated: dict[str, Any] = {}
    removed: list[str] = []
    for op, fields in update.items():
        for path, arg in fields.items():
            if path == "_id" or path.startswith("_id."):
                raise CommandError(66, "ImmutableField", "Performing an update on the path "
                                   "'_id' would modify the immutable field '_id'")  # fmt: skip
            if op == "$set":
                _set_path(new, path, copy.deepcopy(arg))
                updated[path] = copy.deepcopy(arg)
            elif op == "$unset":
                if _unset_path(new, path):
                    removed.append(path)
            elif op == "$inc":
                old = get_path(new, path)
                if old is _MISSING:
                    old = 0
                if not isinstance(old, int | float) or not isinstance(arg, int | float):
                    raise CommandError(14, "TypeMismatch", f"Cannot apply $inc to {path}")
                _set_path(new, path, old + arg)
                updated[path] = old + arg
            else:
                raise CommandError(9, "FailedToParse", f"Unknown modifier: {op} (not supported "
                                   "by the test server)")  # fmt: skip
    return new, updated, removed


def with_id(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with `_id` first (added as an ObjectId when missing), as mongod stores it."""
    out = {"_id": doc["_id"] if "_id" in doc else ObjectId()}
    out.update((k, v) for k, v in doc.items() if k != "_id")
    return out


def id_key(value: Any) -> Any:
    """A hashable stand-in for an `_id` value."""
    import bson

    return bson.encode({"v": value})
