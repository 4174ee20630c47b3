"""The lake columns a batch's queries read, so the one pass caches only those (compute/batch.py).

Read from each query's analyzed plan (no data is read): a column counts when its attribute is
referenced by any node of the plan or of a subquery in it. That is a superset of what the
optimizer keeps, and enough: a view narrowed to these columns gives every query the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


def _seq(scala_seq: Any) -> list[Any]:
    return [scala_seq.apply(i) for i in range(scala_seq.size())]


def _read_by(frame: DataFrame, views: dict[str, str]) -> dict[str, set[str]]:
    referenced: set[int] = set()
    outputs: list[tuple[str, list[tuple[str, int]]]] = []
    stack = [frame._jdf.queryExecution().analyzed()]
    while stack:
        node = stack.pop()
        referenced.update(a.exprId().id() for a in _seq(node.references().toSeq()))
        view = views.get(node.alias().lower()) if node.nodeName() == "SubqueryAlias" else None
        if view is not None:
            outputs.append((view, [(a.name(), a.exprId().id()) for a in _seq(node.output())]))
        stack.extend(_seq(node.subqueries()))
        stack.extend(_seq(node.children()))
    read: dict[str, set[str]] = {}
    for view, attrs in outputs:
        read.setdefault(view, set()).update(name for name, i in attrs if i in referenced)
    return read


def columns_read(frames: Iterable[DataFrame], views: Sequence[str]) -> dict[str, set[str]]:
    """{view: the columns any of the frames reads}; a view none of them reads is absent."""
    read: dict[str, set[str]] = {}
    for frame in frames:
        for view, columns in _read_by(frame, {v.lower(): v for v in views}).items():
            read.setdefault(view, set()).update(columns)
    return read
