"""Segment expressions (sidecar/expr/): the parser, Kleene evaluation for one and many users,
audience set algebra with the boundedness rule, and chunked export.

The truth is computed independently of the implementation: Kleene logic as min / max / 1 - x
over {0, 1/2, 1}, applied to Python sets, from a tree the test renders to text itself.
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from sidecar.expr import (
    MAX_LENGTH,
    MAX_REFERENCES,
    ExprError,
    compile_arg,
    compile_expr,
    id_chunks,
)
from sidecar.expr.stream import as_lines
from sidecar.ids import BadRequest
from sidecar.replica.sorted_ids import SortedIds

NAMES = ["a", "b", "c", "vip.buyers", "cart:30m", "x-1"]
HALF = Fraction(1, 2)
_VALUE = {True: Fraction(1), False: Fraction(0), None: HALF}
_BACK = {Fraction(1): True, Fraction(0): False, HALF: None}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- expression trees the test renders and evaluates itself ---------------------------------
# ("seg", name) | ("not", t) | ("and", [t, ...]) | ("or", [t, ...])

trees = st.recursive(
    st.sampled_from(NAMES).map(lambda n: ("seg", n)),
    lambda inner: st.one_of(
        inner.map(lambda t: ("not", t)),
        st.tuples(st.just("and"), st.lists(inner, min_size=2, max_size=3)),
        st.tuples(st.just("or"), st.lists(inner, min_size=2, max_size=3)),
    ),
    max_leaves=12,
)
_RANK = {"or": 0, "and": 1, "not": 2, "seg": 3}


@st.composite
def rendered(draw: st.DrawFn, tree: object) -> str:
    """`tree` as text: parentheses where precedence needs them (and sometimes where it does
    not), random whitespace between tokens."""

    def ws() -> str:
        return draw(st.sampled_from(["", "", " ", "  ", "\t", "\n"]))

    def show(t: tuple, parent: int) -> str:
        kind = t[0]
        if kind == "seg":
            text = t[1]
        elif kind == "not":
            text = "!" + ws() + show(t[1], _RANK["not"])
        else:
            op = "&" if kind == "and" else "|"
            # the left operand may share our rank (left-associative); the right may not
            # unless it is the same operator, which is associative
            text = (ws() + op + ws()).join(show(x, _RANK[kind]) for x in t[1])
        if _RANK[kind] < parent or draw(st.integers(0, 9)) == 0:
            text = "(" + ws() + text + ws() + ")"
        return text

    return ws() + show(tree, -1) + ws()  # type: ignore[arg-type]


def kleene(tree: tuple, value: dict[str, bool | None]) -> Fraction:
    kind = tree[0]
    if kind == "seg":
        return _VALUE[value[tree[1]]]
    if kind == "not":
        return 1 - kleene(tree[1], value)
    parts = [kleene(t, value) for t in tree[1]]
    return min(parts) if kind == "and" else max(parts)


def truth(tree: tuple, value: dict[str, bool | None]) -> bool | None:
    return _BACK[kleene(tree, value)]


def leaves(tree: tuple) -> int:
    if tree[0] == "seg":
        return 1
    if tree[0] == "not":
        return leaves(tree[1])
    return sum(leaves(t) for t in tree[1])


def referenced(tree: tuple) -> set[str]:
    if tree[0] == "seg":
        return {tree[1]}
    if tree[0] == "not":
        return referenced(tree[1])
    return set().union(*(referenced(t) for t in tree[1]))


@st.composite
def expressions(draw: st.DrawFn) -> tuple[tuple, str]:
    tree = draw(trees)
    return tree, draw(rendered(tree))


wide_ids = st.integers(0, 500) | st.integers(0, 2**64 - 1)
answers = st.sampled_from([True, False, None])
# few distinct ids, so that random segments overlap in every way
users = st.integers(0, 24) | st.sampled_from([2**32, 2**63, 2**64 - 1])
segment_sets = st.fixed_dictionaries({n: st.sets(users, max_size=20) for n in NAMES})


# -- one user ---------------------------------------------------------------------------------
@SETTINGS
@given(expressions(), st.fixed_dictionaries({n: answers for n in NAMES}))
def test_one_user_is_kleene_logic(case: tuple[tuple, str], value: dict[str, bool | None]) -> None:
    tree, text = case
    expr = compile_expr(text)
    assert set(expr.segments) == referenced(tree)
    asked: list[int] = []

    def answer(i: int) -> bool | None:
        asked.append(i)
        return value[expr.segments[i]]

    assert expr.evaluate(answer) is truth(tree, value)
    assert len(asked) <= leaves(tree)  # each reference asked at most once


@pytest.mark.parametrize(
    "text,table",
    [
        # (a, b) -> result over True / False / None
        ("a & b", {(1, 1): 1, (1, 0): 0, (1, None): None, (0, None): 0, (None, None): None}),
        ("a | b", {(0, 0): 0, (1, 0): 1, (0, None): None, (1, None): 1, (None, None): None}),
        ("!a & b", {(1, 1): 0, (0, 1): 1, (None, 1): None, (None, 0): 0}),
        ("!(a | b)", {(0, 0): 1, (None, 0): None, (None, 1): 0}),
    ],
)
def test_kleene_tables(text: str, table: dict[tuple, int | None]) -> None:
    expr = compile_expr(text)
    for (x, y), want in table.items():
        for a, b in {(x, y), (y, x)} if text in ("a & b", "a | b") else {(x, y)}:
            vals = {"a": None if a is None else bool(a), "b": None if b is None else bool(b)}
            got = expr.evaluate(lambda i, vals=vals: vals[expr.segments[i]])
            assert got is (None if want is None else bool(want)), (text, a, b)
    neg = compile_expr("!a")
    assert [neg.evaluate(lambda _i, v=v: v) for v in (True, False, None)] == [False, True, None]


def test_short_circuit_skips_what_cannot_matter() -> None:
    asked: list[str] = []
    expr = compile_expr("a & b & c")

    def answer(i: int) -> bool | None:
        asked.append(expr.segments[i])
        return {"a": None, "b": False, "c": True}[expr.segments[i]]

    assert expr.evaluate(answer) is False
    assert asked == ["a", "b"]  # c cannot change false


# -- many users -------------------------------------------------------------------------------
@SETTINGS
@given(expressions(), segment_sets, st.sets(st.sampled_from(NAMES)), st.sets(users, max_size=30))
def test_many_users_match_one_user(
    case: tuple[tuple, str], sets: dict[str, set[int]], unknown: set[str], who: set[int]
) -> None:
    tree, text = case
    expr = compile_expr(text)
    bitmaps = [None if n in unknown else BitMap64(sets[n]) for n in expr.segments]
    members, unsure = expr.evaluate_many(bitmaps, BitMap64(who))
    for u in who:
        value = {n: None if n in unknown else u in sets[n] for n in NAMES}
        want = truth(tree, value)
        assert (u in members, u in unsure) == (want is True, want is None), u
    assert set(members) | set(unsure) <= who


@SETTINGS
@given(expressions(), segment_sets, st.lists(users, max_size=30))
def test_many_users_all_known_in_request_order(
    case: tuple[tuple, str], sets: dict[str, set[int]], who: list[int]
) -> None:
    tree, text = case
    expr = compile_expr(text)
    bitmaps = [BitMap64(sets[n]) for n in expr.segments]
    want = bytes(truth(tree, {n: u in sets[n] for n in NAMES}) for u in who)  # type: ignore[misc]
    assert expr.members_of(bitmaps, who) == want


def test_many_users_at_the_deepest_nesting() -> None:
    chain = "a"
    for i in range((MAX_REFERENCES - 1) // 2):  # two references per level
        chain = f"s{i} & !({chain} | s{i})"
    expr = compile_expr(chain)
    bitmaps = [BitMap64([1]) for _ in expr.segments]
    got = expr.members_of(bitmaps, [1, 2])
    assert got == bytes(expr.evaluate(lambda _i, u=u: u == 1) for u in (1, 2))  # type: ignore[misc]


# -- audiences --------------------------------------------------------------------------------
@st.composite
def audiences(draw: st.DrawFn) -> tuple[tuple, str]:
    """Expressions, half of them put under `seg & (...)`, which bounds any inner negation."""
    tree = draw(trees)
    if draw(st.booleans()):
        tree = ("and", [("seg", draw(st.sampled_from(NAMES))), tree])
    return tree, draw(rendered(tree))


@pytest.mark.parametrize("form", ["roaring", "sorted ids"])
@SETTINGS
@given(audiences(), segment_sets)
def test_audience_is_the_set_truth(
    form: str, case: tuple[tuple, str], sets: dict[str, set[int]]
) -> None:
    """In either algebra: BitMap64, or the replica's SortedIds for compact segments."""
    tree, text = case
    expr = compile_expr(text)
    bitmaps: list[Any] = [BitMap64(sets[n]) for n in expr.segments]
    if form == "sorted ids":
        bitmaps = [SortedIds(bm.to_array()) for bm in bitmaps]
    before = [bm.copy() for bm in bitmaps]
    everyone_else = {n: False for n in NAMES}  # a user in no segment
    if truth(tree, everyone_else):
        assert not expr.bounded
        with pytest.raises(ExprError) as info:
            expr.members(bitmaps)
        assert text[info.value.position] == "!"
        with pytest.raises(ExprError):
            expr.count(bitmaps)
        return
    assert expr.bounded
    pool = set().union(*sets.values())
    want = {u for u in pool if truth(tree, {n: u in sets[n] for n in NAMES})}
    got = expr.members(bitmaps)
    assert set(got) == want and type(got) is type(bitmaps[0])
    assert expr.count(bitmaps) == len(want)
    assert all(got is not bm for bm in bitmaps)
    # the result is the caller's: changing it changes no input
    if form == "sorted ids":
        got.ids.append(2**64 - 2)
    else:
        got.add(2**64 - 2)
    assert bitmaps == before


@pytest.mark.parametrize(
    "text,ok",
    [
        ("a", True),
        ("!a", False),
        ("!a | b", False),
        ("a & !b", True),
        ("!a & b", True),
        ("!a & !b", False),
        ("(a | !b) & c", True),
        ("!(!a | !b)", True),  # = a & b
        ("!(a & !b)", False),  # = !a | b
        ("(c & !a) | !b", False),
        ("c & (!a | (d & !b))", True),
    ],
)
def test_boundedness_rule(text: str, ok: bool) -> None:
    assert compile_expr(text).bounded is ok


@pytest.mark.parametrize(
    "text",
    [
        "a",
        "a & b",
        "a | b",
        "a & !b",
        "!b & a",
        "a & b & c",
        "(a | b) & !c",
        "!(!a | !b | c)",
        "(a | !b) & c",
        "c & (!a | !b)",
        "c & !(a | b)",
    ],
)
def test_count_shortcuts_agree_with_members(text: str) -> None:
    bm = {
        "a": BitMap64(range(0, 10_000, 2)),
        "b": BitMap64(range(0, 10_000, 3)),
        "c": BitMap64(range(5_000, 20_000)),
    }
    expr = compile_expr(text)
    maps = [bm[n] for n in expr.segments]
    assert expr.count(maps) == len(expr.members(maps))


# -- errors -----------------------------------------------------------------------------------
_JUNK = st.text(alphabet="ab_c.1:-!&|() \t$é\x00'\"", max_size=40)


@settings(max_examples=1000, deadline=None)
@given(_JUNK)
def test_any_text_compiles_or_names_a_position(text: str) -> None:
    try:
        compile_expr(text)
    except ExprError as exc:
        assert 0 <= exc.position <= len(text)
        assert f"at position {exc.position}:" in str(exc)


@SETTINGS
@given(expressions(), st.data())
def test_a_broken_expression_names_where(case: tuple[tuple, str], data: st.DataObject) -> None:
    _, text = case
    i = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.sampled_from(["(", ")", "&", "|", "!", "$", "_", " "]))
    broken = text[:i] + junk + text[i:]
    try:
        compile_expr(broken)
    except ExprError as exc:
        assert 0 <= exc.position <= len(broken)


@pytest.mark.parametrize(
    "text,position,words",
    [
        ("", 0, "empty"),
        ("   ", 0, "empty"),
        ("a &", 3, "ends"),
        ("a & ", 3, "ends"),
        ("(a", 0, "never closed"),
        ("a)", 1, "no matching"),
        ("a b", 2, "segment 'b'"),
        ("a & & b", 4, "found '&'"),
        ("a & $", 4, "unexpected character '$'"),
        ("_x", 0, "not a valid segment id"),
        ("a & " + "b" * 129, 4, "not a valid segment id"),
        ("()", 1, "found ')'"),
        ("a (b)", 2, "found '('"),
        ("a !b", 2, "found '!'"),
        ("!a", 0, "unbounded"),
    ],
)
def test_error_messages(text: str, position: int, words: str) -> None:
    with pytest.raises(ExprError) as info:
        compile_expr(text).require_bounded()
    assert info.value.position == position
    assert words in str(info.value)
    assert isinstance(info.value, BadRequest)


def test_limits() -> None:
    ok = " | ".join(f"s{i}" for i in range(MAX_REFERENCES))
    assert len(compile_expr(ok).segments) == MAX_REFERENCES
    assert len(compile_expr(" & ".join(["a"] * MAX_REFERENCES)).segments) == 1
    with pytest.raises(ExprError, match="more than 64 segment references") as info:
        compile_expr(ok + " | z")
    assert info.value.position == len(ok) + 3
    longest = "a" + " " * (MAX_LENGTH - 1)
    compile_expr(longest)
    with pytest.raises(ExprError, match="1,025 characters") as info:
        compile_expr(longest + " ")
    assert info.value.position == MAX_LENGTH


def test_deep_nesting_is_no_recursion_error() -> None:
    depth = (MAX_LENGTH - 1) // 2
    assert compile_expr("(" * depth + "a" + ")" * depth).segments == ("a",)
    assert compile_expr("!" * (MAX_LENGTH - 1) + "a").bounded is False
    chain = "a"
    for i in range(MAX_REFERENCES - 1):  # a & !(b & !(c ...)): the deepest tree 64 refs allow
        chain = f"s{i} & !({chain})"
    expr = compile_expr(chain)
    assert expr.evaluate(lambda _i: True) in (True, False)


@pytest.mark.parametrize("value", [None, 5, b"a", ["a"], 1.5])
def test_not_a_string(value: object) -> None:
    with pytest.raises(BadRequest, match="expr must be a string"):
        compile_arg(value)


def test_compiled_forms_are_cached() -> None:
    assert compile_expr("a & !b") is compile_expr("a & !b")
    assert compile_arg("a & !b") is compile_expr("a & !b")


# -- export -----------------------------------------------------------------------------------
@SETTINGS
@given(
    st.sets(wide_ids, max_size=200),
    st.none() | wide_ids,
    st.none() | st.integers(0, 250),
    st.integers(1, 50),
)
def test_chunks_page_in_order(
    members: set[int], after: int | None, limit: int | None, size: int
) -> None:
    chunks = list(id_chunks(BitMap64(members), after, limit, size))
    want = sorted(u for u in members if after is None or u > after)[:limit]
    assert list(itertools.chain.from_iterable(chunks)) == want
    assert all(0 < len(c) <= size for c in chunks)
    lines = b"".join(as_lines(c) for c in chunks)
    assert lines.decode().splitlines() == [str(u) for u in want]


@pytest.mark.parametrize("size", [1, 3, 100])
def test_chunks_reach_the_largest_id(size: int) -> None:
    top = 2**64 - 1
    members = BitMap64([*range(0, 100), *range(top - 10, top + 1)])
    assert [u for c in id_chunks(members, size=size) for u in c] == list(members)
    assert [u for c in id_chunks(members, top - 1, size=size) for u in c] == [top]
    assert list(id_chunks(members, top, size=size)) == []


def test_paging_with_after_walks_everything() -> None:
    members = BitMap64(range(0, 100_000, 7))
    seen: list[int] = []
    after = None
    while True:
        page = [u for c in id_chunks(members, after, 1000) for u in c]
        if not page:
            break
        seen.extend(page)
        after = page[-1]
    assert seen == list(members)
