"""The segment file layout as docs/SHARED_REPLICA.md documents it, read by an independent
pure-Python reader (perf/shared.py's `PySegment`, the benchmark's peer, written from the doc):
it answers as the C reader and the truth do for every kind the writer picks."""

from __future__ import annotations

from array import array
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perf.shared import PySegment
from sidecar.shm import _native

U64 = 2**64 - 1

shapes = st.one_of(
    st.sets(st.integers(0, U64), max_size=300),  # spread over 2^64: Elias-Fano or sorted ids
    st.sets(st.integers(0, 2**32 - 1), max_size=300),
    st.builds(lambda lo, n: set(range(lo, lo + n)), st.integers(0, 2**40), st.integers(0, 6000)),
    st.sets(st.integers(U64 - 5000, U64), max_size=200),  # the top of the id space
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=shapes, probes=st.lists(st.integers(0, U64), max_size=40))
def test_python_reader_follows_the_documented_layout(
    tmp_path: Path, ids: set[int], probes: list[int]
) -> None:
    data = _native.encode(array("Q", sorted(ids)), 7)
    path = tmp_path / "s.seg"
    path.write_bytes(data)
    py, c = PySegment(str(path)), _native.Segment.frombytes(data)
    assert py.kind == c.kind and py.n == len(ids)
    near = [x + d for x in list(ids)[:20] for d in (-1, 0, 1) if 0 <= x + d <= U64]
    for x in [*probes, *near, 0, U64]:
        assert py.contains(x) is c.contains(x) is (x in ids), (c.kind, x)


def test_every_kind_is_covered() -> None:
    kinds = {
        _native.Segment.frombytes(_native.encode(array("Q", sorted(ids)), 1)).kind
        for ids in ({5}, set(range(0, 100_000, 2)), {i * 2**50 + 3 for i in range(2000)})
    }
    assert kinds == {1, 2, 3}
