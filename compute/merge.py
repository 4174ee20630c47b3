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
HAVING's COUNT(DISTINCT c) is size(collect_set(c)) with the FILTER. Semi/anti joins of one view
on another by user_id (`parse_join`) become a per-user flag column of the right view's merged
query, joined once to the left view (`joined_sql`). Anything else (other joins, subqueries,
window functions, other DISTINCT aggregates, which Spark expands into a copy of every row per
distinct group, functions this module does not know in HAVING, non-deterministic functions)
runs as written. Set semantics: a segment is a set of user ids,
so duplicate rows of the first shape do not matter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compute.bitmaps import Source

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

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
#: the words of the semi/anti-join shape (`parse_join`) that _REFUSED has
_JOIN_WORDS = frozenset({"select", "from", "where", "join"})
#: words that are no view name or alias in that shape
_KEYWORDS = _REFUSED | {
    "left", "right", "inner", "outer", "full", "cross", "natural", "semi", "anti", "on", "as",
    "using",
}  # fmt: skip
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
    #: the columns of HAVING's COUNT(DISTINCT c), written size(collect_set(c)) in the pieces
    distinct: tuple[str, ...] = ()


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
        if t.word == "distinct" and having_at is not None and _counts(body, k):
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
        split = _split_having(sql, body[having_at + 1 :])
        if split is None:
            return None
        having, counted = split
        return Simple(view, where_text, True, having, counted)
    return Simple(view, where_text, grouped_at is not None, None)


def _counts(tokens: list[_Token], k: int) -> bool:
    """tokens[k] (DISTINCT) opens `COUNT(DISTINCT <one column>)`."""
    return (
        k >= 2
        and tokens[k - 1].text == "("
        and tokens[k - 2].word == "count"
        and k + 2 < len(tokens)
        and tokens[k + 1].kind in {"word", "quoted"}
        and tokens[k + 2].text == ")"
    )


def _split_having(sql: str, tokens: list[_Token]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """HAVING's text cut after each aggregate call's closing parenthesis, COUNT(DISTINCT c)
    as size(collect_set(c)) (the same count: both skip NULLs), and the columns c; None when it
    calls something this module does not know."""
    if not tokens:
        return None
    pieces: list[str] = []
    counted: list[str] = []
    start = tokens[0].start
    k = 0
    while k < len(tokens):
        t = tokens[k]
        opens = k + 1 < len(tokens) and tokens[k + 1].text == "("
        if t.kind in {"word", "quoted"} and opens:
            name = t.word
            if name == "count" and _counts(tokens, k + 2):
                counted.append(tokens[k + 3].text)
                pieces.append(f"{sql[start : t.start]}size(collect_set({tokens[k + 3].text})")
                start = tokens[k + 4].start
                k += 5
                continue
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
    return tuple(pieces), tuple(counted)


@dataclass(frozen=True)
class Join:
    """`SELECT a.user_id FROM <left> [a] LEFT SEMI|ANTI JOIN <right> [b] ON b.user_id =
    a.user_id [AND <on>] [WHERE <where>]`, the aliases' qualifiers taken out of <on> (about
    <right> only) and <where> (about <left> only)."""

    left: str
    right: str
    anti: bool
    on: str | None
    where: str | None


def _unqualified(sql: str, tokens: list[_Token], alias: str) -> str:
    """The tokens' text with `alias.` dropped before each column."""
    out, at = [], tokens[0].start
    for k, t in enumerate(tokens[:-1]):
        if t.word == alias and tokens[k + 1].text == ".":
            out.append(sql[at : t.start])
            at = tokens[k + 1].end
    out.append(sql[at : tokens[-1].end])
    return "".join(out)


def parse_join(sql: str) -> Join | None:
    """The semi/anti-join shape of `Join`, or None. The ON condition past the key equality
    may name only the right side's columns and have no top-level OR (`a = b AND x OR y` is
    not `a = b AND (x OR y)`); WHERE sees only the left side's (a semi/anti join's output)."""
    sql = sql.strip().rstrip(";").rstrip()
    tokens = _tokens(sql)
    if not tokens or any(t.word in _REFUSED - _JOIN_WORDS for t in tokens):
        return None
    if any(t.word in _JOIN_WORDS and t.depth > 0 for t in tokens):
        return None
    words = [t.word for t in tokens]
    i = 0

    def take(*expected: str) -> bool:
        nonlocal i
        if [t.word or t.text for t in tokens[i : i + len(expected)]] == list(expected):
            i += len(expected)
            return True
        return False

    def name() -> str | None:
        nonlocal i
        if i < len(tokens) and tokens[i].kind == "word" and words[i] not in _KEYWORDS:
            i += 1
            return tokens[i - 1].text
        return None

    if not take("select"):
        return None
    selected = name()
    if selected is not None and take("."):
        selected = f"{selected.lower()}.{name()}"
    if not (selected and take("from")):
        return None
    left = name()
    take("as")
    left_alias = (name() or left or "").lower()
    if not (left and take("left")):
        return None
    anti = take("anti")
    if not (anti or take("semi")) or not take("join"):
        return None
    right = name()
    take("as")
    right_alias = (name() or right or "").lower()
    if not right or right_alias == left_alias or not take("on"):
        return None
    key_a, key_b = [right_alias, ".", "user_id"], [left_alias, ".", "user_id"]
    if not (take(*key_a, "=", *key_b) or take(*key_b, "=", *key_a)):
        return None
    if selected.lower() not in {"user_id", f"{left_alias}.user_id"}:
        return None
    where_at = next((k for k in range(i, len(tokens)) if words[k] == "where"), len(tokens))
    on_tokens, where_tokens = tokens[i:where_at], tokens[where_at + 1 :]
    if on_tokens and (on_tokens[0].word != "and" or len(on_tokens) < 2):
        return None
    on_tokens = on_tokens[1:]
    if where_at < len(tokens) and not where_tokens:
        return None
    if any(t.word in _JOIN_WORDS for t in on_tokens + where_tokens):
        return None
    if any(t.depth == 0 and t.word == "or" for t in on_tokens):
        return None
    for part, other in ((on_tokens, left_alias), (where_tokens, right_alias)):
        if any(t.word == other and k + 1 < len(part) and part[k + 1].text == "."
               for k, t in enumerate(part)):  # fmt: skip
            return None
    on = _unqualified(sql, on_tokens, right_alias) if on_tokens else None
    where = _unqualified(sql, where_tokens, left_alias) if where_tokens else None
    return Join(left, right, anti, on, where)


def _flag(s: Simple) -> str:
    where = f"(\n{s.where}\n)" if s.where is not None else "true"
    present = f"COUNT(*) FILTER (WHERE {where}) > 0"
    if s.having is None:
        return present
    filtered = f" FILTER (WHERE {where})"
    having = filtered.join(s.having[:-1]) + (filtered if len(s.having) > 1 else "")
    return f"{present} AND (\n{having}{s.having[-1]}\n)"


def merged_sql(view: str, shapes: Sequence[Simple], ons: Sequence[str | None] = ()) -> str:
    """One query over `view` with a boolean column s0, s1, ... per shape (module docstring)
    and j0, j1, ... per semi/anti join's ON condition on it: the user has a row meeting it."""
    grouped = bool(ons) or any(s.grouped for s in shapes)
    if grouped:
        flags = [_flag(s) for s in shapes]
    else:
        flags = [f"(\n{s.where}\n)" if s.where is not None else "true" for s in shapes]
    columns = [f"coalesce({f}, false) AS s{k}" for k, f in enumerate(flags)]
    columns += [
        f"coalesce({_flag(Simple(view, on, True, None))}, false) AS j{k}"
        for k, on in enumerate(ons)
    ]
    wheres = list(dict.fromkeys([s.where for s in shapes] + list(ons)))
    where = (
        ""
        if any(w is None for w in wheres)
        else "\nWHERE " + " OR ".join(f"(\n{w}\n)" for w in wheres)
    )
    group = "\nGROUP BY user_id" if grouped else ""
    listed = ",\n".join(columns)
    return f"SELECT user_id,\n{listed}\nFROM {view}{where}{group}"


def joined_sql(left: str, joins: Sequence[tuple[Join, str, int]]) -> str:
    """One query over `left` with a boolean column s0, s1, ... per join: (the right view's
    merged query, the index of its j column) for each; a user with no row on the right side
    has no flags there: false."""
    rights = list(dict.fromkeys(sql for _, sql, _ in joins))
    wheres = ",\n".join(
        f"coalesce((\n{j.where}\n), false) AS w{k}" if j.where is not None else f"true AS w{k}"
        for k, (j, _, _) in enumerate(joins)
    )
    columns = ",\n".join(
        f"b.w{k} AND {'NOT ' if j.anti else ''}coalesce(f{rights.index(sql)}.j{at}, false) AS s{k}"
        for k, (j, sql, at) in enumerate(joins)
    )
    ons = "".join(
        f"\nLEFT JOIN (\n{sql}\n) f{r} ON f{r}.user_id = b.user_id" for r, sql in enumerate(rights)
    )
    return f"SELECT b.user_id,\n{columns}\nFROM (SELECT user_id,\n{wheres}\nFROM {left}) b{ons}"


def sources(segments: Sequence[Segment], frames: Sequence[DataFrame]) -> list[Source]:
    """The segments as bitmap sources (compute/bitmaps.py): one merged query per view that two
    or more of them read in a shape above, in the place of its first segment; one query per
    left view of the semi/anti joins (`parse_join`) over the right views' merged queries
    (read again there: the optimizer prunes that copy to its j columns, a plan of its own, so
    no exchange is reused; perf/ANALYSIS.md, sixth session); every other segment's
    own frame. A merged query that does not analyze (a name that is no view, a type the
    rewrite does not fit) leaves its segments as written; a join query that does not, its
    joins (and the merged queries run without their j columns)."""
    try:
        return _sources(segments, frames, joins=True)
    except _NotMerged:
        return _sources(segments, frames, joins=False)


def _counted_exactly(spark: SparkSession, shape: Simple | None) -> Simple | None:
    """The shape, or None when a column it counts DISTINCT is a float or double (DISTINCT
    takes -0.0 and 0.0, and NaNs, as one value; collect_set may not) or no column of its view.
    """
    if shape is None or not shape.distinct:
        return shape
    from pyspark.errors import PySparkException
    from pyspark.sql.types import DoubleType, FloatType

    try:
        fields = {f.name.lower(): f.dataType for f in spark.table(shape.view).schema.fields}
    except PySparkException:
        return None
    for column in shape.distinct:
        kind = fields.get(column.strip("`").replace("``", "`").lower())
        if kind is None or isinstance(kind, (DoubleType, FloatType)):
            return None
    return shape


class _NotMerged(Exception):
    pass


def _sources(
    segments: Sequence[Segment], frames: Sequence[DataFrame], *, joins: bool
) -> list[Source]:
    from pyspark.errors import PySparkException
    from pyspark.sql.types import BooleanType

    spark = frames[0].sparkSession

    def query(sql: str) -> DataFrame | None:
        try:
            frame = spark.sql(sql)
        except PySparkException:
            return None
        if any(not isinstance(f.dataType, BooleanType) for f in frame.schema.fields[1:]):
            return None
        return frame

    shapes = {k: _counted_exactly(spark, parse(s.sql)) for k, s in enumerate(segments)}
    found = {k: parse_join(s.sql) for k, s in enumerate(segments) if shapes[k] is None}
    shaped = {k: j for k, j in found.items() if j is not None and joins}
    by_view: dict[str, list[int]] = {}
    for k, shape in shapes.items():
        if shape is not None:
            by_view.setdefault(shape.view.lower(), []).append(k)
    ons: dict[str, list[int]] = {}  # right view: its joins
    names: dict[str, str] = {}
    for k, j in shaped.items():
        ons.setdefault(j.right.lower(), []).append(k)
        names[j.right.lower()] = j.right
    merged: dict[int, Source] = {}  # by its first segment
    right_sql: dict[int, tuple[str, int]] = {}  # a join's right query and j column
    for view in dict.fromkeys([*by_view, *ons]):
        members = by_view.get(view, [])
        members = members if len(members) >= 2 else []
        picked = [shapes[k] for k in members]
        on_members = ons.get(view, [])
        if not members and not on_members:
            continue
        name = picked[0].view if picked else names[view]  # type: ignore[union-attr]
        sql = merged_sql(name, picked, [shaped[k].on for k in on_members])  # type: ignore[arg-type]
        frame = query(sql)
        if frame is None and on_members:
            raise _NotMerged
        if frame is None:
            continue
        for at, k in enumerate(on_members):
            right_sql[k] = (sql, at)
        if members:
            flags = tuple(f"s{j}" for j in range(len(members)))
            merged[members[0]] = Source(frame, tuple(segments[k].name for k in members), flags)
    by_left: dict[str, list[int]] = {}
    for k, j in shaped.items():
        by_left.setdefault(j.left.lower(), []).append(k)
    for members in by_left.values():
        sql = joined_sql(shaped[members[0]].left, [(shaped[k], *right_sql[k]) for k in members])
        frame = query(sql)
        if frame is None:
            raise _NotMerged
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
