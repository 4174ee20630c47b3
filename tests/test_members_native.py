"""`Replica.local`'s rule over a request's segments in C (`_native.LocalCheck.members_of`,
used by the servers' batch ops through `Queries._bitmaps`) against `Replica.local` itself, in
every segment state and form, on replicas ready or not."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.replica import SegmentState
from tests.test_batch_native import SHAPES, STATES, _replica

NAMES = ["s0", "s1", "s2", "out3", "x"]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    segments=st.dictionaries(
        st.sampled_from(NAMES[:4]),
        st.tuples(st.sampled_from(STATES), SHAPES, st.booleans()),
        min_size=1,
    ),
    ready=st.booleans(),
    asked=st.lists(st.sampled_from(NAMES), max_size=12),
)
def test_members_of_is_what_local_answers_with(
    tmp_path_factory: pytest.TempPathFactory,
    segments: dict[str, tuple[str, set[int], bool]],
    ready: bool,
    asked: list[str],
) -> None:
    replica = _replica(tmp_path_factory.mktemp("m"), segments, ready)
    local = [replica.local(s) for s in asked]
    want = [st.bitmap if isinstance(st, SegmentState) else None for st in local]
    found = replica.native_local.members_of(asked, set(NAMES))
    assert len(found) == len(want)
    assert all(a is b for a, b in zip(found, want, strict=True))
    for seg, members in zip(asked, found, strict=True):  # None exactly when local says why
        fresh = ready and segments.get(seg, ("unknown",))[0] == "fresh"
        assert (members is not None) is fresh


def test_a_name_not_validated_yet_is_left_to_python(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    replica = _replica(tmp_path_factory.mktemp("m"), {"s0": ("fresh", {1}, False)}, True)
    members_of = replica.native_local.members_of
    assert members_of(["s0"], {"s0"})[0] is replica.engine.segments["s0"].bitmap
    assert members_of(["s0", "s1"], {"s0"}) is None
    assert members_of(["s0", 5], {"s0"}) is None
    assert members_of((), {"s0"}) == []
    with pytest.raises(TypeError):
        members_of(["s0"], ["s0"])
