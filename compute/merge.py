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
HAVING's COUNT(DISTINCT c) is a bitmask of c's values with the FILTER when c is an integer or
a string with at most 63 distinct values in the segment's rows (`bitmasked`: a Spark job lists
them first), else size(collect_set(c)). HAVING's SUM and AVG of a decimal too wide for Spark
to sum in a long itself (money: decimal(12,2)) come from a BIGINT sum of its unscaled values,
cast back to the SUM's or AVG's type and value (`exact_sums`). A semi/anti join of one
view on another by user_id (`parse_join`) adds a column to each side's merged query (its
WHERE on the left, its ON on the right) and is taken from their bitmaps on the driver (W & J
or W - J: `Plan`), so no table is read twice; so is a set operation of the shapes above
(`parse_set`: UNION, EXCEPT, INTERSECT), one column per operand, the union, difference or
intersection of their bitmaps. Anything else (other joins, subqueries, EXCEPT ALL,
window functions, other DISTINCT aggregates, which Spark expands into a copy of every row per
distinct group, functions this module does not know in HAVING, non-deterministic functions)
runs as written. Set semantics: a segment is a set of user ids,
so duplicate rows of the first shape do not matter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pyroaring import BitMap64

from compute.bitmaps import Found, Source, decided, source_results

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import DataType

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
    #: for each of `distinct`, the index of the piece its size(collect_set(c) ends
    distinct_at: tuple[int, ...] = ()
    #: HAVING's SUM and AVG calls: the index of the piece each ends, "sum" or "avg", the call
    #: and its argument as written (`exact_sums`)
    sums: tuple[tuple[int, str, str, str], ...] = ()


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
        having, counted, at, sums = split
        return Simple(view, where_text, True, having, counted, at, sums)
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


def _split_having(
    sql: str, tokens: list[_Token]
) -> (
    tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...], tuple[tuple[int, str, str, str], ...]]
    | None
):
    """HAVING's text cut after each aggregate call's closing parenthesis, COUNT(DISTINCT c)
    as size(collect_set(c)) (the same count: both skip NULLs), the columns c and the pieces
    their size(collect_set(c) ends, and the SUM and AVG calls (`Simple.sums`); None when it calls
    something this module does not know."""
    if not tokens:
        return None
    pieces: list[str] = []
    counted: list[str] = []
    at: list[int] = []
    sums: list[tuple[int, str, str, str]] = []
    start = tokens[0].start
    k = 0
    while k < len(tokens):
        t = tokens[k]
        opens = k + 1 < len(tokens) and tokens[k + 1].text == "("
        if t.kind in {"word", "quoted"} and opens:
            name = t.word
            if name == "count" and _counts(tokens, k + 2):
                counted.append(tokens[k + 3].text)
                at.append(len(pieces))
                pieces.append(f"{sql[start : t.start]}size(collect_set({tokens[k + 3].text})")
                start = tokens[k + 4].start
                k += 5
                continue
            if name in AGGREGATES:
                close = next(
                    j for j in range(k + 2, len(tokens))
                    if tokens[j].text == ")" and tokens[j].depth == t.depth
                )  # fmt: skip
                if name in {"sum", "avg", "mean"} and close > k + 2:
                    argument = sql[tokens[k + 2].start : tokens[close - 1].end]
                    call = sql[t.start : tokens[close].end]
                    sums.append((len(pieces), "sum" if name == "sum" else "avg", call, argument))
                pieces.append(sql[start : tokens[close].end])
                start = tokens[close].end
                k = close + 1
                continue
            if name not in SCALARS:
                return None
        k += 1
    pieces.append(sql[start : tokens[-1].end])
    return tuple(pieces), tuple(counted), tuple(at), tuple(sums)


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


#: the set operators of `parse_set` and the bitmap operation of each
_SET_OPS = {"union": "|", "except": "-", "minus": "-", "intersect": "&"}


@dataclass(frozen=True)
class SetOp:
    """`<left> UNION|EXCEPT|INTERSECT <right>` of segment queries of the module's shapes (or of
    set operations in parentheses): the ids in either side, in the left and not the right, in
    both. `op` is the bitmap operation: "|", "-" or "&"."""

    op: str
    left: Simple | SetOp
    right: Simple | SetOp

    def leaves(self) -> Iterator[Simple]:
        for side in (self.left, self.right):
            if isinstance(side, SetOp):
                yield from side.leaves()
            else:
                yield side


def parse_set(sql: str) -> SetOp | None:
    """The set operation of `SetOp`, or None: a chain of UNION [ALL|DISTINCT] and EXCEPT or
    MINUS [DISTINCT], left to right, or a chain of INTERSECT [ALL|DISTINCT], each operand a
    shape of `parse` or a set operation in parentheses. As sets of ids, UNION ALL is UNION and
    INTERSECT ALL is INTERSECT; EXCEPT ALL is not (an id twice on the left and once on the
    right stays), nor is a chain mixing INTERSECT with the others unambiguous (it binds
    tighter unless a legacy setting says otherwise): those, and a trailing ORDER BY or LIMIT
    (the last operand does not parse), run as written."""
    sql = sql.strip().rstrip(";").rstrip()
    tokens = _tokens(sql)
    if not tokens:
        return None
    if _wrapped(tokens):
        return parse_set(sql[tokens[0].end : tokens[-1].start])
    ops: list[str] = []
    operands: list[str] = []
    start = 0
    for k, t in enumerate(tokens):
        if t.depth > 0 or t.kind != "word" or t.word not in _SET_OPS:
            continue
        if k < start + 1:
            return None  # an operator with no operand before it
        op = _SET_OPS[t.text.lower()]
        after = tokens[k + 1] if k + 1 < len(tokens) else None
        quantifier = after.word if after is not None and after.kind == "word" else None
        if quantifier not in {"all", "distinct"}:
            quantifier = None
        if quantifier == "all" and op == "-":
            return None
        operands.append(sql[tokens[start].start : tokens[k - 1].end])
        ops.append(op)
        start = k + 1 + (quantifier is not None)
    if not ops or start >= len(tokens) or ("&" in ops and len(set(ops)) > 1):
        return None
    operands.append(sql[tokens[start].start : tokens[-1].end])
    parsed = [_operand(text) for text in operands]
    out = parsed[0]
    for op, operand in zip(ops, parsed[1:], strict=True):
        if out is None or operand is None:
            return None
        out = SetOp(op, out, operand)
    return out if isinstance(out, SetOp) else None


def _operand(sql: str) -> Simple | SetOp | None:
    """A set operation's operand: a shape of `parse`, or either in parentheses."""
    tokens = _tokens(sql)
    if tokens and _wrapped(tokens):
        inner = sql[tokens[0].end : tokens[-1].start]
        return _operand(inner) or parse_set(inner)
    return parse(sql)


def _wrapped(tokens: list[_Token]) -> bool:
    """The tokens are one pair of parentheses and what they hold."""
    return (
        tokens[0].text == "(" and tokens[-1].text == ")" and all(t.depth > 0 for t in tokens[1:-1])
    )


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
    and j0, j1, ... per semi/anti join's ON condition on it: the user has a row meeting it
    (a NULL or negative id never has: no valid left id matches it, `Plan`)."""
    grouped = bool(ons) or any(s.grouped for s in shapes)
    if grouped:
        flags = [_flag(s) for s in shapes]
    else:
        flags = [f"(\n{s.where}\n)" if s.where is not None else "true" for s in shapes]
    columns = [f"coalesce({f}, false) AS s{k}" for k, f in enumerate(flags)]
    columns += [
        f"coalesce({_flag(Simple(view, on, True, None))} AND user_id >= 0, false) AS j{k}"
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


@dataclass(frozen=True)
class Derived:
    """A segment's members from bitmaps of the pass (`Plan`): `op` ("&", "-" or "|") of two
    of them, each the key of a bitmap in the pass or a Derived itself."""

    op: str
    left: str | Derived
    right: str | Derived

    def value(self, found: Found) -> BitMap64 | None:
        """The members, or None when a bitmap it needs is an error (a bad id)."""
        sides = [side.value(found) if isinstance(side, Derived) else found[side]
                 for side in (self.left, self.right)]  # fmt: skip
        left, right = sides
        if not (isinstance(left, BitMap64) and isinstance(right, BitMap64)):
            return None
        return left - right if self.op == "-" else left & right if self.op == "&" else left | right


@dataclass(frozen=True)
class Plan:
    """The pass: its sources (compute/bitmaps.py), and the segments taken from their bitmaps
    on the driver (`derived`):

    - a semi join is W & J, an anti join W - J, W the left view's ids meeting the join's
      WHERE, J the right view's ids >= 0 with a row meeting its ON. That is the join's answer
      whenever W holds only valid ids: a NULL id on the right matches nothing and a negative
      one no valid left id;
    - a set operation is the union, difference or intersection of its operands' bitmaps, the
      answer whenever every operand holds only valid ids.

    When a bitmap it needs has a bad id (NULL, negative, a type the bitmaps refuse), the
    segment runs as written (`written`), which decides: a NULL left id is an anti join's
    member and a bad id, a semi join's only when the right side has it; a set operation
    takes NULLs as equal."""

    sources: list[Source]
    derived: dict[str, Derived]  # by segment name
    written: dict[str, DataFrame]  # the derived segments' own frames

    @property
    def merged(self) -> bool:
        return bool(self.derived) or any(s.flags for s in self.sources)


def bitmaps(plan: Plan, order: Sequence[str]) -> dict[str, BitMap64]:
    """The members of the segments in `order` from the plan's pass (one Spark job, and one
    more for the derived segments the bitmaps cannot decide); bad ids raise DefinitionError
    for the first such segment in `order`."""
    found = source_results(plan.sources)
    undecided = []
    for name, derived in plan.derived.items():
        members = derived.value(found)
        if members is None:
            undecided.append(name)
        else:
            found[name] = members
    if undecided:
        found |= source_results([Source(plan.written[n], (n,)) for n in undecided])
    return decided(found, order)


def sources(segments: Sequence[Segment], frames: Sequence[DataFrame]) -> list[Source]:
    """The plan's sources (`plan`)."""
    return plan(segments, frames).sources


def plan(segments: Sequence[Segment], frames: Sequence[DataFrame]) -> Plan:
    """The segments as bitmap sources (compute/bitmaps.py): one merged query per view that two
    or more of them read in a shape above, or that a semi/anti join (`parse_join`) or a set
    operation (`parse_set`) reads, in the place of the first segment that reads it; every
    other segment's own frame. A join adds a column to each of its views' merged queries: its
    WHERE to the left view's, its ON to the right view's; a set operation one per operand to
    the operand's view's (`Plan`), so each table is read once. A merged query that does not
    analyze (a name that is no view, a type the rewrite does not fit) leaves its segments as
    written; one with a join's or an operand's columns, every join and set operation (and
    the merged queries run without them)."""
    try:
        return _plan(segments, frames, derived=True)
    except _NotMerged:
        return _plan(segments, frames, derived=False)


def _counted_exactly(spark: SparkSession, shape: Simple | None) -> Simple | None:
    """The shape, or None when a column it counts DISTINCT is a float or double (DISTINCT
    takes -0.0 and 0.0, and NaNs, as one value; collect_set may not) or no column of its view.
    """
    if shape is None or not shape.distinct:
        return shape
    from pyspark.sql.types import DoubleType, FloatType

    for column in shape.distinct:
        kind = _column_type(spark, shape.view, column)
        if kind is None or isinstance(kind, (DoubleType, FloatType)):
            return None
    return shape


def _column_type(spark: SparkSession, view: str, column: str) -> DataType | None:
    """The type of the view's column (as written, maybe quoted); None when there is none."""
    from pyspark.errors import PySparkException

    try:
        fields = {f.name.lower(): f.dataType for f in spark.table(view).schema.fields}
    except PySparkException:
        return None
    return fields.get(column.strip("`").replace("``", "`").lower())


#: COUNT(DISTINCT c) is a bitmask when c has at most this many distinct non-NULL values: the
#: bits 1..63 of a BIGINT, at array_position's 1-based positions
BITMASK_VALUES = 63


def bitmasked(shape: Simple, values: Sequence[Sequence[str] | None]) -> Simple:
    """The shape with its k-th COUNT(DISTINCT c) counted as
    `coalesce(bit_count(bit_or(shiftleft(1L, array_position(array(<values[k]>), c)))), 0L)`,
    bit_or FILTERed like the other aggregates, where values[k] is given: SQL literals of every
    distinct non-NULL value of c in the rows the segment's WHERE keeps, at most BITMASK_VALUES
    (`_listed`); size(collect_set(c)) where it is None. A NULL c has a NULL position, so a NULL
    bit, which bit_or skips, as COUNT(DISTINCT) skips NULLs; a group without a non-NULL c has
    a NULL bit_or, counted 0. A plain HashAggregate, where collect_set is an
    ObjectHashAggregate without code generation (perf/ANALYSIS.md, eighth session)."""
    pieces = list(shape.having or ())
    kept: list[tuple[str, int]] = []  # still collect_set
    for column, at, listed in zip(shape.distinct, shape.distinct_at, values, strict=True):
        if listed is None:
            kept.append((column, at))
            continue
        written = f"size(collect_set({column})"
        head = pieces[at][: -len(written)]
        array = f"array({', '.join(listed)})"
        pieces[at] = (
            f"{head}coalesce(bit_count(bit_or(shiftleft(1L, array_position({array}, {column})))"
        )
        pieces[at + 1] = f"), 0L{pieces[at + 1]}"  # closes bit_count, then coalesce
    return replace(
        shape,
        having=tuple(pieces),
        distinct=tuple(c for c, _ in kept),
        distinct_at=tuple(at for _, at in kept),
    )


def _listed(spark: SparkSession, shape: Simple, column: str) -> tuple[str, ...] | None:
    """SQL literals of the column's distinct non-NULL values in the view's rows that the
    shape's WHERE keeps (one Spark job), when there are at most BITMASK_VALUES and the column
    is an integer or a string compared byte by byte (UTF8_BINARY); None otherwise, or when the
    job fails (the merged query then decides). Strings are read as hex and written back as
    binary literals, so any bytes survive."""
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException
    from pyspark.sql.types import ByteType, IntegerType, LongType, ShortType, StringType

    kind = _column_type(spark, shape.view, column)
    if isinstance(kind, (ByteType, ShortType, IntegerType, LongType)):
        shown, literal, typed = f"CAST({column} AS STRING)", "CAST({} AS BIGINT)", "BIGINT"
    elif isinstance(kind, StringType) and kind.collation == "UTF8_BINARY":
        shown, literal, typed = f"hex({column})", "CAST(X'{}' AS STRING)", "STRING"
    else:
        return None
    kept = f"(\n{shape.where}\n) AND " if shape.where is not None else ""
    sql = (
        f"SELECT {shown} FROM (SELECT DISTINCT {column} FROM {shape.view} "
        f"WHERE {kept}{column} IS NOT NULL) LIMIT {BITMASK_VALUES + 1}"
    )
    try:
        rows = spark.sql(sql).collect()
    except (PySparkException, Py4JError):
        return None
    if len(rows) > BITMASK_VALUES:
        return None
    # no value: a typed array that matches none (no row of the FILTER has a non-NULL value)
    return tuple(literal.format(r[0]) for r in rows) or (f"CAST(NULL AS {typed})",)


#: the largest precision a Decimal keeps in a long (Spark's Decimal.MAX_LONG_DIGITS)
LONG_DIGITS = 18


def exact_sums(shape: Simple, kinds: Sequence[tuple[int, int] | None]) -> Simple:
    """The shape with its k-th SUM(a) or AVG(a) computed from a BIGINT sum of a's unscaled
    values where kinds[k] is a's (precision, scale) p, s, the FILTER after each aggregate:

        SUM(a): CAST(CAST(SUM(CAST((a) * 10^s AS BIGINT)) AS DECIMAL(20, 0)) * 10^-s
                     AS DECIMAL(p + 10, s))
        AVG(a): CAST(try_divide(<that>, CAST(COUNT((a)) AS DECIMAL(20, 0)))
                     AS DECIMAL(p + 4, s + 4))

    The same values and types as Spark's SUM and AVG of a decimal (its AVG divides the
    decimal(p + 10, s) sum by the count cast to decimal(20, 0), NULL when there is no row, and
    casts to decimal(p + 4, s + 4)), in an ANSI session, where a BIGINT sum that overflows is
    an error and the queries then run as written (`batch.evaluate`). Spark keeps that sum in
    a decimal(p + 10, s) buffer, which past 18 digits lives in a java BigDecimal: about 2x
    slower (perf/ANALYSIS.md, twelfth session). kinds[k] is None: the call as written."""
    pieces = list(shape.having or ())
    distinct_at = list(shape.distinct_at)
    # last call first: an AVG adds a piece (its COUNT's), which moves the pieces after it
    for (at, name, call, argument), kind in sorted(
        zip(shape.sums, kinds, strict=True), key=lambda item: -item[0][0]
    ):
        if kind is None:
            continue
        precision, scale = kind
        step = "1BD" if scale == 0 else f"0.{'0' * (scale - 1)}1BD"
        summed = f"CAST(CAST(SUM(CAST(({argument}) * {10**scale}BD AS BIGINT))"
        typed = f" AS DECIMAL(20, 0)) * {step} AS DECIMAL({min(38, precision + 10)}, {scale}))"
        head = pieces[at][: -len(call)]
        if name == "sum":
            pieces[at] = head + summed
            pieces[at + 1] = typed + pieces[at + 1]
            continue
        pieces[at] = f"{head}CAST(try_divide({summed}"
        pieces.insert(at + 1, f"{typed}, CAST(COUNT(({argument}))")
        averaged = f"DECIMAL({min(38, precision + 4)}, {min(38, scale + 4)})"
        pieces[at + 2] = f" AS DECIMAL(20, 0))) AS {averaged}){pieces[at + 2]}"
        distinct_at = [d + 1 if d > at else d for d in distinct_at]
    return replace(shape, having=tuple(pieces), distinct_at=tuple(distinct_at), sums=())


def _long_summed(
    spark: SparkSession, shape: Simple, name: str, argument: str
) -> tuple[int, int] | None:
    """(precision, scale) of the decimal `argument` over the shape's view when `exact_sums`
    speeds its SUM or AVG (`name`) up: Spark's own rewrite does not apply (its DecimalAggregates
    rule: SUM with p + 10 <= 18, in a long; AVG with p + 4 <= 15, in a double, whose rounding
    this must not change), each row's unscaled value, a decimal(p + s + 2, s), still in a long,
    and the session ANSI; else None."""
    from pyspark.errors import PySparkException
    from pyspark.sql.types import DecimalType

    if (spark.conf.get("spark.sql.ansi.enabled") or "").lower() != "true":
        return None
    try:
        kind = spark.table(shape.view).selectExpr(argument).schema.fields[0].dataType
    except PySparkException:
        return None
    if not isinstance(kind, DecimalType):
        return None
    spark_own = kind.precision + 10 <= LONG_DIGITS if name == "sum" else kind.precision + 4 <= 15
    fits = kind.precision + kind.scale + 2 <= LONG_DIGITS
    return (kind.precision, kind.scale) if fits and not spark_own else None


def _rewritten(spark: SparkSession, shape: Simple) -> Simple:
    """The shape with each COUNT(DISTINCT c) a bitmask where `_listed` gives c's values and
    each SUM or AVG of a decimal from a BIGINT sum where `_long_summed` says it pays."""
    if shape.sums:
        kinds = [_long_summed(spark, shape, name, a) for _, name, _, a in shape.sums]
        shape = exact_sums(shape, kinds)
    if not shape.distinct:
        return shape
    return bitmasked(shape, [_listed(spark, shape, c) for c in shape.distinct])


class _NotMerged(Exception):
    pass


def _plan(segments: Sequence[Segment], frames: Sequence[DataFrame], *, derived: bool) -> Plan:
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

    names = [s.name for s in segments]
    shapes = {k: _counted_exactly(spark, parse(s.sql)) for k, s in enumerate(segments)}
    found = {k: parse_join(s.sql) for k, s in enumerate(segments) if shapes[k] is None}
    shaped = {k: j for k, j in found.items() if j is not None and derived}
    set_ops = {k: parse_set(segments[k].sql) for k, j in found.items() if j is None and derived}
    combined = {
        k: op for k, op in set_ops.items()
        if op is not None and all(_counted_exactly(spark, leaf) for leaf in op.leaves())
    }  # fmt: skip
    by_view: dict[str, list[int]] = {}
    for k, shape in shapes.items():
        if shape is not None:
            by_view.setdefault(shape.view.lower(), []).append(k)
    # per view: the joins' WHERE and ON conditions on it and the set operations' operands (each
    # once), the first segment to read it and its name as written
    wheres: dict[str, list[str | None]] = {}
    ons: dict[str, list[str | None]] = {}
    operands: dict[str, list[Simple]] = {}
    first: dict[str, int] = {k_view: ks[0] for k_view, ks in by_view.items()}
    written_name: dict[str, str] = {v: shapes[ks[0]].view for v, ks in by_view.items()}  # type: ignore[union-attr]

    def reads(k: int, view: str, columns: dict[str, list[Any]], item: object) -> None:
        """Segment k needs a column of `view`'s merged query for `item` (one per equal item)."""
        listed = columns.setdefault(view.lower(), [])
        if item not in listed:
            listed.append(item)
        first[view.lower()] = min(first.get(view.lower(), k), k)
        written_name.setdefault(view.lower(), view)

    for k, j in shaped.items():
        reads(k, j.left, wheres, j.where)
        reads(k, j.right, ons, j.on)
    for k, op in combined.items():
        for leaf in op.leaves():
            reads(k, leaf.view, operands, leaf)

    def key(view: str, kind: str, at: int) -> str:
        name = f"{view}\x00{kind}{at}"  # no segment's name: internal bitmaps of the pass
        while name in names:
            name += "\x00"
        return name

    merged: dict[int, list[Source]] = {}  # by the first segment reading its view
    for view in sorted(
        set(by_view) | set(wheres) | set(ons) | set(operands), key=lambda v: first[v]
    ):
        members = by_view.get(view, [])
        view_wheres, view_ons = wheres.get(view, []), ons.get(view, [])
        view_operands = operands.get(view, [])
        if len(members) < 2 and not view_wheres and not view_ons and not view_operands:
            continue
        picked = [_rewritten(spark, shapes[k]) for k in members]  # type: ignore[arg-type]
        extra = [Simple(written_name[view], w, False, None) for w in view_wheres]
        extra += [_rewritten(spark, shape) for shape in view_operands]
        frame = query(merged_sql(written_name[view], [*picked, *extra], view_ons))  # type: ignore[list-item]
        if frame is None and (view_wheres or view_ons or view_operands):
            raise _NotMerged
        if frame is None:
            continue
        keys = [key(view, "w", at) for at in range(len(view_wheres))]
        keys += [key(view, "o", at) for at in range(len(view_operands))]
        keys += [key(view, "j", at) for at in range(len(view_ons))]
        flags = [f"s{at}" for at in range(len(picked) + len(extra))]
        flags += [f"j{at}" for at in range(len(view_ons))]
        merged.setdefault(first[view], []).append(
            Source(frame, tuple(segments[k].name for k in members) + tuple(keys), tuple(flags))
        )

    def formula(op: SetOp) -> Derived:
        sides = [
            formula(side) if isinstance(side, SetOp)
            else key(side.view.lower(), "o", operands[side.view.lower()].index(side))
            for side in (op.left, op.right)
        ]  # fmt: skip
        return Derived(op.op, *sides)

    taken: dict[str, Derived] = {}
    for k in sorted([*shaped, *combined]):
        if k in combined:
            taken[names[k]] = formula(combined[k])
            continue
        j = shaped[k]
        left, right = j.left.lower(), j.right.lower()
        taken[names[k]] = Derived(
            "-" if j.anti else "&",
            key(left, "w", wheres[left].index(j.where)),
            key(right, "j", ons[right].index(j.on)),
        )
    inside = {name for listed in merged.values() for s in listed for name in s.segments}
    inside |= set(taken)
    out: list[Source] = []
    for k, (segment, frame) in enumerate(zip(segments, frames, strict=True)):
        out += merged.get(k, [])
        if segment.name not in inside:
            out.append(Source(frame, (segment.name,)))
    written = {names[k]: frames[k] for k in [*shaped, *combined]}
    return Plan(out, taken, written)
