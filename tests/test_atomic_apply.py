"""A delta's adds and removes reach readers on other threads in one step (issue 12, defect 6).

Readers (the servers' event loop thread) and the replica thread share the engine's bitmaps;
Python switches threads only between bytecodes, and pyroaring holds the GIL for a whole call.
So a change applied by one in-place roaring call is atomic for every reader: the first test
shows the GIL is held through a long call, the second traces every bytecode boundary of
`Engine.apply_delta` (where another thread could run) and checks what a reader would see
there is the state before the change or after it, never a mix.
"""

from __future__ import annotations

import sys
import threading
import time
from types import FrameType
from typing import Any

import pytest
from pyroaring import BitMap64

from sidecar.record import Delta
from sidecar.replica import engine as engine_module
from sidecar.replica.engine import Engine


def test_pyroaring_holds_the_gil_for_a_whole_in_place_call() -> None:
    step = 2**40 // 2_000_000  # one id per container: a slow call
    big = BitMap64(range(0, 2**40, step))
    other = BitMap64(range(1, 2**40, step))
    ticks: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.05)
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            big ^= other  # one call, tens of milliseconds
            t1 = time.perf_counter()
            # The ticker may run between t0 and the call, or between the call and t1, for a
            # switch interval (5 ms) or longer when the OS preempts it: what the call holds is
            # one stretch at least as long as the call with no tick, never there if the ticker
            # ran during it (it ticks every microsecond or so).
            window = [t0, *(t for t in list(ticks) if t0 < t < t1), t1]
            stretch = max(b - a for a, b in zip(window, window[1:], strict=False))
            assert stretch > 0.01, f"another thread ran: {stretch * 1e3:.1f} ms without a tick"
    finally:
        stop.set()
        thread.join()


CASES = {
    "add and remove": ([1, 2, 3, 100], [7, 8], [2, 100]),
    "adds only": ([1, 2], [5, 6], []),
    "removes only": ([1, 2, 3], [], [1, 3]),
    "inconsistent (diverges)": ([1, 2], [2, 9], [5]),
    "large": (list(range(0, 300_000, 2)), list(range(1, 5_000, 2)), list(range(0, 5_000, 4))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_bytecode_boundary_of_an_apply_shows_half_a_change(case: str) -> None:
    members, adds, removes = CASES[case]
    engine = Engine()
    engine.apply_delta(Delta("s", 0, 1, BitMap64(members), BitMap64(), len(members), 0))
    watched = sorted(set(adds[:3] + removes[:3] + adds[-3:] + removes[-3:]))

    def view() -> tuple[Any, ...]:
        st = engine.segments["s"]
        return tuple(u in st.bitmap for u in watched)

    before = view()
    after_members = (BitMap64(members) | BitMap64(adds)) - BitMap64(removes)
    after = tuple(u in after_members for u in watched)
    seen: set[tuple[Any, ...]] = set()
    engine_file = engine_module.__file__

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            seen.add(view())
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code.co_filename != engine_file:
            return None
        frame.f_trace_opcodes = True
        return local

    delta = Delta("s", 1, 2, BitMap64(adds), BitMap64(removes), len(after_members), 0)
    sys.settrace(tracer)
    try:
        engine.apply_delta(delta)
    finally:
        sys.settrace(None)
    assert view() == after
    assert seen <= {before, after}, f"a reader could see {seen - {before, after}}"
    assert len(seen) >= 1
