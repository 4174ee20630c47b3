"""sidecar/replica/sorted_ids.py against a set model: every operation of `SortedIds`, and
counts and audiences through `operands` over segments of mixed forms (roaring, and each
compact kind: sorted ids, containers, Elias-Fano), never changing an input."""

from __future__ import annotations

from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from sidecar.expr import compile_expr
from sidecar.replica.forms import is_compact
from sidecar.replica.sorted_ids import SortedIds, operands
from sidecar.shm import native_or_none

pytestmark = pytest.mark.skipif(native_or_none() is None, reason="needs the C extension")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOP = 2**64 - 1

# Shapes that lead `encode` to each compact kind: ids spread over 2^64 (sorted ids), dense
# runs in far-apart chunks (containers), an even stride (Elias-Fano), plus the edges.
spread = st.sets(st.integers(0, TOP), max_size=12)
chunks = st.builds(
    lambda ks, start, n, step: {k * 2**40 + start + i * step for k in ks for i in range(n)},
    st.sets(st.integers(0, 2**24 - 1), min_size=1, max_size=3),
    st.integers(0, 1000),
    st.integers(0, 120),
    st.integers(1, 3),
)
stride = st.builds(
    lambda start, n, step: set(range(start, start + n * step, step)),
    st.integers(0, 2**40),
    st.integers(0, 200),
    st.integers(1, 50),
)
edges = st.sets(st.sampled_from([0, 1, 2**32, 2**63 - 1, 2**63, TOP - 1, TOP]))
small = st.sets(st.integers(0, 40), max_size=15)  # overlaps between segments
id_sets = st.builds(lambda a, b: a | b, st.one_of(spread, chunks, stride, edges, small), small)


def compact(ids: set[int]) -> Any:
    native = native_or_none()
    assert native is not None
    return native.Segment.frombytes(native.encode(array("Q", sorted(ids)).tobytes(), 1))


members_of = st.tuples(id_sets, st.booleans()).map(
    lambda t: (t[0], compact(t[0]) if t[1] else BitMap64(t[0]))
)


@SETTINGS
@given(id_sets, id_sets, st.lists(id_sets, min_size=1, max_size=4))
def test_every_operation_is_the_set_truth(a: set[int], b: set[int], more: list[set[int]]) -> None:
    x, y = SortedIds(compact(a).to_array()), SortedIds(compact(b).to_array())
    assert list(x) == sorted(a) and len(x) == len(a)
    assert all((u in x) == (u in a) for u in a | b | {0, TOP})
    assert list(x | y) == sorted(a | b)
    assert list(x - y) == sorted(a - b)
    assert list(x & y) == sorted(a & b)
    assert x.union_cardinality(y) == len(a | b)
    assert x.intersection_cardinality(y) == len(a & b)
    assert x.difference_cardinality(y) == len(a - b)
    others = [SortedIds(array("Q", sorted(s))) for s in more]
    assert list(SortedIds.union(x, *others)) == sorted(a.union(*more))
    assert list(SortedIds.intersection(x, *others)) == sorted(a.intersection(*more))
    assert list(x) == sorted(a) and list(y) == sorted(b)  # inputs unchanged
    assert x == SortedIds(array("Q", sorted(a))) and x.copy() == x and x.copy() is not x


trees = st.recursive(
    st.sampled_from("abcde").map(lambda n: ("seg", n)),
    lambda inner: st.one_of(
        inner.map(lambda t: ("not", t)),
        st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3)),
    ),
    max_leaves=8,
)


def render(tree: tuple) -> str:
    kind, arg = tree
    if kind == "seg":
        return arg
    if kind == "not":
        return f"!({render(arg)})"
    return "(" + f" {'&' if kind == 'and' else '|'} ".join(render(t) for t in arg) + ")"


def truth(tree: tuple, member: dict[str, bool]) -> bool:
    kind, arg = tree
    if kind == "seg":
        return member[arg]
    if kind == "not":
        return not truth(arg, member)
    values = [truth(t, member) for t in arg]
    return all(values) if kind == "and" else any(values)


@SETTINGS
@given(trees, st.sampled_from("abcde"), st.fixed_dictionaries({n: members_of for n in "abcde"}))
def test_counts_and_audiences_over_mixed_forms(
    tree: tuple, bound: str, segments: dict[str, tuple[set[int], Any]]
) -> None:
    """What view.py runs under the lock: `operands` of the segments as held (each roaring or
    compact), then the expression; equal to the model, and no held segment changed."""
    tree = ("and", [("seg", bound), tree])  # bounded
    expr = compile_expr(render(tree))
    sets = {n: s for n, (s, _) in segments.items()}
    held = [segments[n][1] for n in expr.segments]
    before = [list(m.to_array()) for m in held]
    ops = operands(held)
    compact_members = sum(len(m) for m in held if is_compact(m))
    if compact_members and 2 * compact_members >= sum(len(m) for m in held):
        assert all(type(o) is SortedIds for o in ops)
    else:
        assert all(type(o) is BitMap64 for o in ops)
    pool = set().union(*sets.values())
    want = {u for u in pool if truth(tree, {n: u in sets[n] for n in "abcde"})}
    got = expr.members(ops)
    assert sorted(got) == sorted(want)
    assert expr.count(ops) == len(want)
    assert [list(m.to_array()) for m in held] == before
    assert all(got is not o for o in ops)


def test_the_shapes_reach_every_compact_kind() -> None:
    """The strategies above do reach each compact kind (1 sorted ids, 2 containers, 3 EF)."""
    kinds = {
        compact({7 * i for i in range(1, 6)} | {2**63, TOP}).kind,
        compact({k * 2**40 + i for i in range(100) for k in range(3)}).kind,
        compact(set(range(5, 5 + 200 * 37, 37))).kind,
    }
    assert kinds == {1, 2, 3}
