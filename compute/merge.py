"""Merge the batch's simple segments over one view into one query: one scan and one
aggregation of the table for all of them (compute/batch.py, `merge=True`).

A segment is merged only when its SQL has one of these shapes, read with a small tokenizer
(strings, quoted identifiers and comments skipped; nothing else at the top level):

    SELECT [DISTINCT] user_id FROM <view> [WHERE <w>]
    SELECT user_id FROM <view> [WHERE <w>] GROUP BY user_id [HAVING <h>]

The segments of one view become one query with a boolean column per segment, true exactly
for the segment's members:

    SELECT user_id, coalesce(COUNT(*) FILTER (WHERE <w1>) > 0 AND <h1'>, false) AS s0, ...
    FROM <view> WHERE (<w1>) OR (<w2>) ... GROUP BY user_id

where <h'> is <h> with `FILTER (WHERE <w>)` after each aggregate call, so each aggregate sees
the rows the segment's own WHERE keeps; the COUNT(*) > 0 term keeps out the groups the segment
would not have (HAVING COUNT(*) < 5 is true for a group the segment has no row of). Without any
GROUP BY in the view's segments it is a projection: `coalesce(<w>, false)` per segment.
Anything else (joins, subqueries, window functions, DISTINCT aggregates, which Spark expands
into a copy of every row per distinct group, functions this module does not know in HAVING,
non-deterministic functions) runs as written. Set semantics: a segment is a set of user ids,
so duplicate rows of the first shape do not matter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compute.bitmaps import Source

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from compute.definitions import Segment

#: aggregate functions rewritten with FILTER in HAVING
AGGREGATES = frozenset({"sum", "count", "avg", "mean", "min", "max"})
#: what else may be called in HAVING: scalar functions and keywords followed by "("
SCALARS = frozenset(
    [
        "and",
        "or",
        "not",
        "in",
        "cast",
        "coalesce",
        "nvl",
        "ifnull",
        "abs",
        "round",
        "floor",
        "ceil",
        "greatest",
        "least",
        "date_sub",
        "date_add",
        "datediff",
        "to_date",
        "hour",
        "dayofweek",
        "year",
        "month",
        "day",
        "lower",
        "upper",
        "length",
    ]
)
#: words that make a query something else than the shapes above, wherever they appear
_REFUSED = frozenset(
    [
        "select",
        "from",
        "where",
        "group",
        "having",
        "order",
        "limit",
        "offset",
        "union",
        "except",
        "intersect",
        "minus",
        "join",
        "window",
        "sort",
        "cluster",
        "distribute",
        "qualify",
        "lateral",
        "pivot",
        "unpivot",
        "tablesample",
        "over",
        "filter",
        "distinct",
        "rand",
        "randn",
        "random",
        "uuid",
        "shuffle",
        "monotonically_increasing_id",
    ]
)
_TOKEN = re.compile(
    r"""(?P<space>\s+|--[^\n]*|/\*.*?\*/)
      |(?P<string>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
      |(?P<quoted>`(?:[^`]|``)*`)
      |(?P<word>[A-Za-z_][A-Za-z_0-9]*)
      |(?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str  # as written
    start: int
    end: int
    depth: int  # parentheses open before it

    @property
    def word(self) -> str | None:
        """A word or quoted identifier, lower case (unquoted); None for anything else."""
        if self.kind == "word":
            return self.text.lower()
        if self.kind == "quoted":
            return self.text[1:-1].replace("``", "`").lower()
        return None


def _tokens(sql: str) -> list[_Token] | None:
    out: list[_Token] = []
    depth = 0
    for m in _TOKEN.finditer(sql):
        kind = m.lastgroup or "other"
        if kind == "space":
            continue
        text = m.group()
        if text == ")":
            depth -= 1
            if depth < 0:
                return None
        out.append(_Token(kind, text, m.start(), m.end(), depth))
        if text == "(":
            depth += 1
    return out if depth == 0 else None


@dataclass(frozen=True)
class Simple:
    """A segment query of one of the module's shapes."""

    view: str
    where: str | None  # as written
    grouped: bool
    having: tuple[str, ...] | None  # the HAVING text in pieces: an aggregate call ends each


def parse(sql: str) -> Simple | None:
    """The query's shape, or None when it is not one this module merges (its FROM is any
    plain name: `sources` runs it as written when the merged query does not analyze)."""
    sql = sql.strip().rstrip(";").rstrip()
    tokens = _tokens(sql)
    if not tokens:
        return None
    words = [t.word for t in tokens]
    i = 0

    def take(*expected: str) -> bool:
        nonlocal i
        if i + len(expected) <= len(tokens) and all(
            words[i + k] == e and tokens[i + k].depth == 0 for k, e in enumerate(expected)
        ):
            i += len(expected)
            return True
        return False

    if not (take("select") and (take("user_id") or take("distinct", "user_id")) and take("from")):
        return None
    distinct = words[1] == "distinct"
    if i >= len(tokens) or tokens[i].kind != "word" or words[i] in _REFUSED:
        return None
    view = tokens[i].text
    i += 1
    body = tokens[i:]
    where = grouped_at = having_at = None
    for k, t in enumerate(body):
        if t.word not in _REFUSED:
            continue
        if t.depth == 0 and t.word == "where" and where is None:
            where = k
        elif t.depth == 0 and t.word == "group" and grouped_at is None:
            grouped_at = k
        elif t.depth == 0 and t.word == "having" and having_at is None:
            having_at = k
        else:
            return None
    if body and body[0].word not in {"where", "group"}:
        return None
    if any(t.depth == 0 and t.text == "," for t in body):
        return None
    order = [k for k in (where, grouped_at, having_at) if k is not None]
    if order != sorted(order) or (having_at is not None and grouped_at is None):
        return None
    if grouped_at is not None:
        group = body[grouped_at : having_at if having_at is not None else len(body)]
        if distinct or [t.word for t in group] != ["group", "by", "user_id"]:
            return None
    end = grouped_at if grouped_at is not None else len(body)
    where_text = None
    if where is not None:
        if where + 1 >= end:
            return None
        where_text = sql[body[where + 1].start : body[end - 1].end]
    having = None
    if having_at is not None:
        having = _split_having(sql, body[having_at + 1 :])
        if having is None:
            return None
    return Simple(view, where_text, grouped_at is not None, having)


def _split_having(sql: str, tokens: list[_Token]) -> tuple[str, ...] | None:
    """HAVING's text cut after each aggregate call's closing parenthesis; None when it calls
    something this module does not know."""
    if not tokens:
        return None
    pieces: list[str] = []
    start = tokens[0].start
    k = 0
    while k < len(tokens):
        t = tokens[k]
        opens = k + 1 < len(tokens) and tokens[k + 1].text == "("
        if t.kind in {"word", "quoted"} and opens:
            name = t.word
            if name in AGGREGATES:
                close = next(
                    j for j in range(k + 2, len(tokens))
                    if tokens[j].text == ")" and tokens[j].depth == t.depth
                )  # fmt: skip
                pieces.append(sql[start : tokens[close].end])
                start = tokens[close].end
                k = close + 1
                continue
            if name not in SCALARS:
                return None
        k += 1
    pieces.append(sql[start : tokens[-1].end])
    return tuple(pieces)


def _flag(s: Simple) -> str:
    where = f"(\n{s.where}\n)" if s.where is not None else "true"
    present = f"COUNT(*) FILTER (WHERE {where}) > 0"
    if s.having is None:
        return present
    filtered = f" FILTER (WHERE {where})"
    having = filtered.join(s.having[:-1]) + (filtered if len(s.having) > 1 else "")
    return f"{present} AND (\n{having}{s.having[-1]}\n)"


def merged_sql(view: str, shapes: Sequence[Simple]) -> str:
    """One query over `view` with a boolean column s0, s1, ... per shape (module docstring)."""
    grouped = any(s.grouped for s in shapes)
    if grouped:
        flags = [_flag(s) for s in shapes]
    else:
        flags = [f"(\n{s.where}\n)" if s.where is not None else "true" for s in shapes]
    columns = ",\n".join(f"coalesce({f}, false) AS s{k}" for k, f in enumerate(flags))
    wheres = list(dict.fromkeys(s.where for s in shapes))
    where = (
        ""
        if any(w is None for w in wheres)
        else "\nWHERE " + " OR ".join(f"(\n{w}\n)" for w in wheres)
    )
    group = "\nGROUP BY user_id" if grouped else ""
    return f"SELECT user_id,\n{columns}\nFROM {view}{where}{group}"


def sources(segments: Sequence[Segment], frames: Sequence[DataFrame]) -> list[Source]:
    """The segments as bitmap sources (compute/bitmaps.py): one merged query per view that two
    or more of them read in a shape above, in the place of its first segment; every other
    segment's own frame. A merged query that does not analyze (a name that is no view, a
    type the rewrite does not fit) leaves its segments as written."""
    from pyspark.errors import PySparkException
    from pyspark.sql.types import BooleanType

    shapes = {k: parse(s.sql) for k, s in enumerate(segments)}
    by_view: dict[str, list[int]] = {}
    for k, shape in shapes.items():
        if shape is not None:
            by_view.setdefault(shape.view.lower(), []).append(k)
    merged: dict[int, Source] = {}  # by its first segment
    for members in by_view.values():
        if len(members) < 2:
            continue
        picked = [shapes[k] for k in members]
        sql = merged_sql(picked[0].view, picked)  # type: ignore[arg-type]
        try:
            frame = frames[0].sparkSession.sql(sql)
        except PySparkException:
            continue
        if any(not isinstance(f.dataType, BooleanType) for f in frame.schema.fields[1:]):
            continue
        flags = tuple(f"s{j}" for j in range(len(members)))
        merged[members[0]] = Source(frame, tuple(segments[k].name for k in members), flags)
    inside = {name for source in merged.values() for name in source.segments}
    out: list[Source] = []
    for k, (segment, frame) in enumerate(zip(segments, frames, strict=True)):
        if k in merged:
            out.append(merged[k])
        elif segment.name not in inside:
            out.append(Source(frame, (segment.name,)))
    return out
