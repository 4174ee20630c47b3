"""`shared`: the shared replica (docs/SHARED_REPLICA.md) read from other processes, against
peers measured in the same run on the same data set (the serve sidecar's):

- `SharedReplica.contains` in a reader process (the C path, `sidecar/shm/_native.c`);
- the same files searched in pure Python in that process (`bisect` over `memoryview`s of the
  mapped files, a `struct` read of the index's sequence number): what the C earns;
- `x in BitMap64` in this process (the in-process floor), and the socket check
  (`SidecarClient.check`) from this process.

Latency per call is a `perf_counter_ns` pair around the call (the pair included; its own cost
is reported); the loops' ns/check are medians over rounds of `for u, s in qs: f(u, s)`, the
empty loop subtracted. Memory: `READERS` reader processes map the replica and touch every page
of every segment file; each reports `/proc/self/smaps_rollup` (Rss, Pss) before and after, so
the table shows what N readers cost together against the size of one copy.
"""

from __future__ import annotations

import bisect
import gc
import mmap
import multiprocessing as mp
import statistics
import struct
import time
from pathlib import Path
from typing import Any

from . import data
from .hist import Hist
from .report import table, target
from .services import Context, log

READERS = 4
LOOP = 10_000
THROUGHPUT_S = 3.0


def smaps_rollup() -> dict[str, int]:
    """The process's memory totals in bytes (Rss, Pss, ... as the kernel has them)."""
    out: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def mapped_under(directory: str) -> dict[str, int]:
    """Rss and Pss (bytes) of this process's mappings of files under `directory`, from
    /proc/self/smaps: what mapping the shared replica costs this process."""
    out = {"Rss": 0, "Pss": 0}
    mine = False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                mine = len(parts) >= 6 and parts[5].startswith(directory)
            elif mine and parts[0] in ("Rss:", "Pss:"):
                out[parts[0][:-1]] += int(parts[1]) * 1024
    return out


class PySegment:
    """A segment file searched in pure Python: the comparator the C path is measured against."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mv = memoryview(self.map)
        (self.kind,) = struct.unpack_from("<I", mv, 8)
        self.n, _version, self.k = struct.unpack_from("<QQQ", mv, 16)
        k = self.k
        self.mv = mv
        if self.kind == 1:
            self.ids = mv[64 : 64 + 8 * self.n].cast("Q")
        elif self.kind == 2:
            self.keys = mv[64 : 64 + 8 * k].cast("Q")
            self.offs = mv[64 + 8 * k : 64 + 16 * k].cast("Q")
            self.cards = mv[64 + 16 * k : 64 + 20 * k].cast("I")
        else:  # 3, Elias-Fano: k is L, the low bits per id
            self.min, upper_bits = struct.unpack_from("<QQ", mv, 40)
            lows = -(-self.n * k // 64)
            uppers = -(-upper_bits // 64)
            self.zeros = upper_bits - self.n
            self.lows = mv[64 : 64 + 8 * lows].cast("Q")
            self.upper = mv[64 + 8 * lows : 64 + 8 * (lows + uppers)].cast("Q")
            at = 64 + 8 * (lows + uppers)
            self.samples = mv[at : at + 8 * -(-self.zeros // 256)].cast("Q")

    def _select0(self, q: int) -> int:
        """The position of zero number q (from 0) of the upper bitvector."""
        j = q >> 8
        pos = self.samples[j]
        left = q - (j << 8)
        b = pos + 1
        while left:
            w = b >> 6
            word = ~self.upper[w] & ((1 << 64) - 1) & ~((1 << (b & 63)) - 1)
            c = word.bit_count()
            if c >= left:
                for _ in range(left - 1):
                    word &= word - 1
                return (w << 6) + (word & -word).bit_length() - 1
            left -= c
            b = (w + 1) << 6
        return pos

    def _low(self, i: int) -> int:
        width = self.k
        if not width:
            return 0
        bit = i * width
        w, off = bit >> 6, bit & 63
        value = self.lows[w] >> off
        if off + width > 64:
            value |= self.lows[w + 1] << (64 - off)
        return value & ((1 << width) - 1)

    def _ef_contains(self, x: int) -> bool:
        d = x - self.min
        h = d >> self.k
        if d < 0 or h >= self.zeros:
            return False
        low = d & ((1 << self.k) - 1)
        start = self._select0(h - 1) + 1 if h else 0
        for p in range(start, self._select0(h)):  # the ids whose high part is h, ascending
            got = self._low(p - h)
            if got >= low:
                return got == low
        return False

    def contains(self, x: int) -> bool:
        if self.kind == 1:
            i = bisect.bisect_left(self.ids, x)
            return i < self.n and self.ids[i] == x
        if self.kind == 3:
            return self._ef_contains(x)
        key = x >> 16
        i = bisect.bisect_left(self.keys, key)
        if i == self.k or self.keys[i] != key:
            return False
        card, off, low = self.cards[i], self.offs[i], x & 0xFFFF
        if card > 4096:
            return bool((self.mv[off + (low >> 3)] >> (low & 7)) & 1)
        a = self.mv[off : off + 2 * card].cast("H")
        j = bisect.bisect_left(a, low)
        return j < card and a[j] == low

    def touch(self) -> int:
        """Read one byte of every page (so the page is mapped in this process)."""
        m = self.map
        return sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))


def _loop_ns(fn: Any, qs: list[tuple[int, str]], rounds: int) -> float:
    vals = []
    for _ in range(rounds):
        gc.disable()
        t0 = time.perf_counter_ns()
        for u, s in qs:
            fn(u, s)
        vals.append((time.perf_counter_ns() - t0) / len(qs))
        gc.enable()
    return statistics.median(vals)


def _per_call(fn: Any, qs: list[tuple[int, str]], repeat: int) -> dict[str, Any]:
    clock = time.perf_counter_ns
    lat: list[int] = []
    rec = lat.append
    gc.disable()
    try:
        for _ in range(repeat):
            for u, s in qs:
                t0 = clock()
                fn(u, s)
                rec(clock() - t0)
    finally:
        gc.enable()
    h = Hist()
    h.record_many(lat)
    return h.summary(cdf=False)


def _empty(u: int, s: str) -> None:
    return None


def reader(conn: Any, uds: str, n_segments: int, qs: list[tuple[int, str]], latency: bool) -> None:
    """A reader process: map, touch, report memory; the first one also times the checks."""
    from sidecar.client import SharedReplica

    r = SharedReplica(uds)
    deadline = time.monotonic() + 120
    while len(r.segments()) < n_segments:
        if time.monotonic() > deadline:
            conn.send({"error": f"only {len(r.segments())} of {n_segments} segments published"})
            return
        time.sleep(0.05)
    before = smaps_rollup()
    conn.send("mapped")
    conn.recv()  # every reader mapped: touch
    files = r._files  # segment -> (file number, Segment, Entry)
    directory = Path(r._index_path or "").parent
    from sidecar.shm import layout

    py = {
        name: PySegment(str(layout.segment_file(directory, r.instance or 0, f[0])))
        for name, f in files.items()
    }
    size = sum(len(p.map) for p in py.values())
    for p in py.values():
        p.touch()
    conn.send("touched")
    conn.recv()  # every reader touched: measure
    after = smaps_rollup()
    out: dict[str, Any] = {
        "before": before,
        "after": after,
        "replica_bytes": size,
        "mapped": mapped_under(str(directory)),
    }
    if latency:
        contains = r.contains
        index = r._reader
        seen = index.seen
        load = index.load

        def py_contains(u: int, s: str) -> bool | None:
            if load(16) != seen:  # as the C path: the sequence number, then the search
                return None
            seg = py.get(s)
            return None if seg is None else seg.contains(u)

        wrong_c = sum(contains(u, s) is not py_contains(u, s) for u, s in qs)
        rounds = 20
        for fn in (contains, py_contains, _empty):
            _loop_ns(fn, qs[:1000], 2)  # warm up
        out["loop_ns"] = {
            "SharedReplica.contains": _loop_ns(contains, qs, rounds),
            "pure Python over the mapping": _loop_ns(py_contains, qs, max(3, rounds // 4)),
            "empty loop": _loop_ns(_empty, qs, rounds),
        }
        out["per_call"] = {
            "SharedReplica.contains": _per_call(contains, qs, 5),
            "pure Python over the mapping": _per_call(py_contains, qs, 1),
        }
        out["answers"] = [contains(u, s) for u, s in qs]
        out["c_vs_python_disagreements"] = wrong_c
    conn.send(out)
    seconds = conn.recv()  # every reader together, flat out (closed loop)
    contains = r.contains
    n = 0
    t0 = time.perf_counter()
    stop = t0 + seconds
    gc.disable()
    while time.perf_counter() < stop:
        for u, s in qs:
            contains(u, s)
        n += len(qs)
    took = time.perf_counter() - t0
    gc.enable()
    conn.send({"checks": n, "seconds": took})
    conn.recv()
    r.close()


def run(ctx: Context) -> dict[str, Any]:
    from sidecar.client import SidecarClient

    serve = ctx.serve()
    qs = data.queries(serve.segments, LOOP, seed=77)
    expected = [u in serve.segments[s] for u, s in qs]
    mpc = mp.get_context("spawn")
    procs = []
    log(f"shared: {READERS} reader processes over {len(serve.segments)} segments")
    try:
        for j in range(READERS):
            parent, child = mpc.Pipe()
            args = (child, str(serve.sidecar.uds), len(serve.segments), qs, j == 0)
            p = mpc.Process(target=reader, args=args, daemon=True)
            p.start()
            procs.append((p, parent))

        def all_say(what: str, timeout: float = 180) -> list[Any]:
            got = []
            for _p, parent in procs:
                if not parent.poll(timeout):
                    raise RuntimeError(f"a reader process did not answer ({what})")
                msg = parent.recv()
                if isinstance(msg, dict) and "error" in msg:
                    raise RuntimeError(msg["error"])
                got.append(msg)
            return got

        all_say("mapped")
        for _p, parent in procs:
            parent.send("touch")
        all_say("touched")
        for _p, parent in procs:
            parent.send("measure")
        results = all_say("measured", 600)
        for _p, parent in procs:
            parent.send(THROUGHPUT_S)
        flat = all_say("throughput", 120)
        for _p, parent in procs:
            parent.send("done")
    finally:
        for p, _parent in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    first = results[0]
    wrong = sum(a is not e for a, e in zip(first["answers"], expected, strict=True))

    # the peers, in this process, same run, same queries
    bitmaps = serve.segments
    client = SidecarClient(str(serve.sidecar.uds), timeout=5).connect()
    try:
        in_bitmap = lambda u, s: u in bitmaps[s]  # noqa: E731
        loop_bitmap = _loop_ns(in_bitmap, qs, 20)
        loop_empty = _loop_ns(_empty, qs, 20)
        per_call = {
            "x in BitMap64 (in process)": _per_call(in_bitmap, qs, 5),
            "socket check (SidecarClient)": _per_call(client.check, qs[:5000], 1),
        }
    finally:
        client.close()
    per_call = {**first["per_call"], **per_call}
    loops = dict(first["loop_ns"])
    net = {n: round(v - loops["empty loop"], 1) for n, v in loops.items() if n != "empty loop"}
    net["x in BitMap64 (in process)"] = round(loop_bitmap - loop_empty, 1)

    size = first["replica_bytes"]
    memory = []
    for i, res in enumerate(results):
        b, a = res["before"], res["after"]
        memory.append(
            {
                "reader": i,
                "mapped_rss": res["mapped"]["Rss"],
                "mapped_pss": res["mapped"]["Pss"],
                "process_rss_delta": a.get("Rss", 0) - b.get("Rss", 0),
                "process_pss_delta": a.get("Pss", 0) - b.get("Pss", 0),
            }
        )
    total_pss = sum(m["mapped_pss"] for m in memory)
    throughput = round(sum(f["checks"] / f["seconds"] for f in flat))
    shared_p50 = per_call["SharedReplica.contains"]["p50_us"]
    socket_p50 = per_call["socket check (SidecarClient)"]["p50_us"]
    bitmap_p50 = per_call["x in BitMap64 (in process)"]["p50_us"]
    py_p50 = per_call["pure Python over the mapping"]["p50_us"]
    return {
        "segments": len(serve.segments),
        "memberships": serve.memberships,
        "readers": READERS,
        "checks": len(qs),
        "wrong_answers": wrong,
        "c_vs_python_disagreements": first["c_vs_python_disagreements"],
        "per_call": per_call,
        "loop_ns": {**loops, "x in BitMap64 (in process)": loop_bitmap},
        "net_of_loop_ns": net,
        "replica_bytes": size,
        "bytes_per_membership": round(size / max(1, serve.memberships), 3),
        "memory": memory,
        "readers_pss_total": total_pss,
        "readers_pss_over_one_copy": round(total_pss / size, 3) if size else None,
        "throughput_checks_per_s": throughput,
        "targets": [
            target(
                f"shared: checks/s from {READERS} reader processes together (closed loop)",
                throughput,
                ">= 1000000 checks/s",
                detail=f"{THROUGHPUT_S:g} s flat out, the Python loop included; the open-loop "
                "steps with their p99 are in fanout",
            ),
            target(
                "shared: check from another process, p50",
                shared_p50,
                "< 1 us",
                detail=f"x in BitMap64 in process {bitmap_p50:.3f} us, socket check "
                f"{socket_p50:.1f} us, pure Python over the mapping {py_p50:.2f} us "
                "(timer pair included)",
                peer=f"socket check p50 {socket_p50:.1f} us",
            ),
            target(
                f"shared: {READERS} readers' memory (PSS) over one copy",
                round(total_pss / size, 3) if size else None,
                "<= 1.1 x",
                detail=f"{total_pss / 2**20:.1f} MiB PSS in all for a {size / 2**20:.1f} MiB "
                f"replica; each reader's RSS of the mapping about "
                f"{memory[0]['mapped_rss'] / 2**20:.1f} MiB",
                peer=f"one copy of the mapping: {size / 2**20:.1f} MiB",
            ),
        ],
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"The serve data set ({res['segments']} segments, {res['memberships']:,} memberships), "
        f"{res['checks']:,} (user, segment) checks; the shared replica read from a reader "
        f"process, the peers from the harness process, same run.",
        "",
    ]
    rows = [
        [name, h["p50_us"] * 1000, h["p99_us"] * 1000, h["p999_us"] * 1000,
         res["net_of_loop_ns"].get(name, "")]
        for name, h in res["per_call"].items()
    ]  # fmt: skip
    lines += table(["check", "p50 ns", "p99 ns", "p99.9 ns", "loop ns/check, net"], rows)
    lines += [
        "",
        f"Per call with a perf_counter_ns pair around it. Wrong answers: {res['wrong_answers']}"
        f" (against the published bitmaps); C and pure Python disagreed "
        f"{res['c_vs_python_disagreements']} times.",
        "",
        f"Memory: one copy of the replica is {res['replica_bytes'] / 2**20:.1f} MiB "
        f"({res['bytes_per_membership']} bytes per membership). {res['readers']} readers, each "
        "touching every page: Rss and Pss of their mappings of the replica's files "
        "(/proc/self/smaps), and the change of the whole process's (/proc/self/smaps_rollup, "
        "before and after the touch):",
        "",
    ]
    lines += table(
        ["reader", "mapped RSS MiB", "mapped PSS MiB", "process RSS delta MiB",
         "process PSS delta MiB"],
        [[m["reader"], m["mapped_rss"] / 2**20, m["mapped_pss"] / 2**20,
          m["process_rss_delta"] / 2**20, m["process_pss_delta"] / 2**20]
         for m in res["memory"]],
    )  # fmt: skip
    lines += [
        "",
        f"Together {res['readers_pss_total'] / 2**20:.1f} MiB PSS: "
        f"{res['readers_pss_over_one_copy']}x one copy. (Each reader maps the files twice, the "
        "C reader's mapping and the pure-Python peer's, so its RSS counts the touched pages "
        "twice; PSS divides every page among the mappings that share it.)",
        "",
        f"Throughput: {res['readers']} readers together, flat out for "
        f"{THROUGHPUT_S:g} s over the same checks: "
        f"**{res.get('throughput_checks_per_s', 0):,} checks/s**.",
    ]
    return lines
