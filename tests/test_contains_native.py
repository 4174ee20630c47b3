"""`Replica.contains` in C (`_native.LocalCheck`, installed on every replica when the C
extension is built) against the Python method it replaces: the same answers in every segment
state and form, and the same errors for users the members refuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.replica import Replica, SegmentState
from tests.test_batch_native import HIGH, SHAPES, STATES, _replica

USERS = st.one_of(
    st.integers(0, HIGH),
    st.sampled_from([0, 1, HIGH, 2**32, -1, 2**64, True, 1.0, "1", None]),
    st.integers(0, HIGH).map(np.uint64),
)


def _outcome(fn: Any, user: object, segment: object) -> tuple[str, object]:
    try:
        return "value", fn(user, segment)
    except Exception as exc:  # the exception's type is the outcome
        return "raises", type(exc)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    segments=st.dictionaries(
        st.sampled_from(["s0", "s1", "s2", "out3"]),
        st.tuples(st.sampled_from(STATES), SHAPES, st.booleans()),
        min_size=1,
    ),
    ready=st.booleans(),
    asks=st.lists(
        st.tuples(
            st.one_of(USERS, st.just("member")), st.sampled_from(["s0", "s1", "s2", "out3", "x"])
        ),
        max_size=40,
    ),
)
def test_c_contains_is_the_python_method(
    tmp_path_factory: pytest.TempPathFactory,
    segments: dict[str, tuple[str, set[int], bool]],
    ready: bool,
    asks: list[tuple[object, str]],
) -> None:
    replica = _replica(tmp_path_factory.mktemp("c"), segments, ready)
    assert replica.contains != Replica.contains.__get__(replica)  # the C one is installed
    python = Replica.contains.__get__(replica)
    for user, seg in asks:
        if user == "member":
            members = sorted(segments.get(seg, ("", set(), False))[1])
            user = members[len(members) // 2] if members else 0
        got = _outcome(replica.contains, user, seg)
        assert got == _outcome(python, user, seg), (user, seg)
        state = segments.get(seg, ("unknown",))[0]
        if got[0] == "value" and not (ready and state == "fresh"):
            assert got[1] is None
    # members_of: the members `local` answers with, per segment; None for a name not known
    names = ["s0", "s1", "s2", "out3", "x"]
    local = [replica.local(s) for s in names]
    want = [st.bitmap if isinstance(st, SegmentState) else None for st in local]
    found = replica.native_local.members_of(names, set(names))
    assert [type(m) for m in found] == [type(m) for m in want]
    assert all(a is b for a, b in zip(found, want, strict=True))
    assert replica.native_local.members_of(names, set(names[1:])) is None
    assert replica.native_local.members_of([*names, 5], set(names)) is None


def test_unhashable_segment_and_arity(tmp_path: Path) -> None:
    replica = _replica(tmp_path, {"s0": ("fresh", {1}, False)}, True)
    with pytest.raises(TypeError):
        replica.contains(1, ["s0"])
    with pytest.raises(TypeError):
        replica.contains(1)  # type: ignore[call-arg]
    assert replica.contains(1, "s0") is True and replica.contains(2, "s0") is False
