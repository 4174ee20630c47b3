"""`Replica`: the engine kept current by a background thread (bootstrap or checkpoint
restore, then tail, resync and periodic checkpoints). The sidecar process and Python services
that embed the replica both use it."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from ..expr import compile_arg
from ..ids import MAX_WAIT_MS, segment_id, user_id, version_arg, wait_ms_arg
from ..memory import fix_mmap_threshold, release_free_memory
from ..partitioner import partition_for
from ..shm import native_or_none
from ..transport.base import LogReader, NewLogIdentity, Transport, TransportError
from . import checkpoint, recovery, view
from .engine import Engine, segment_filter
from .state import BEHIND, NOT_HELD, NOT_READY, STALE_AGE, Health, SegmentState, retry_changed
from .waiters import Waiters

_FRESH = Health.FRESH


def _now_ms() -> int:
    return int(time.time() * 1000)


_DROPPED = "dropped"
_UNKNOWN = "unknown"

log = logging.getLogger(__name__)


class Replica:
    """A gossip-free replica of one log.

    `local(segment)` owns the rule of what is answerable from memory: a segment present (so
    held), fresh, on a replica that is ready. `contains(user, segment)` answers from memory in
    well under a microsecond: True/False for such a segment, None when this replica cannot
    answer (unknown, dropped, stale, diverged, not held, or not ready yet), in which case a
    caller may ask the fallback.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        state_dir: str | Path | None = None,
        segments: list[str] | None = None,
        checkpoint_interval: float = 60.0,
        poll_interval: float = 0.05,
    ) -> None:
        self.transport = transport
        self.state_dir = Path(state_dir) if state_dir else None
        self.holds = segment_filter(segments)
        self.partial = bool(segments)
        #: the clock ages and TTL expiries are judged by (ms); tests give their own
        self.clock_ms = _now_ms
        self.engine = Engine(self.holds, clock_ms=lambda: self.clock_ms())
        self._segments = self.engine.segments  # never replaced (reset() clears it in place)
        #: segments past their max_age_seconds (DESIGN.md "Freshness"), kept by the replica
        #: thread (`refresh_ages`); never replaced, so hot paths may hold it
        self.aged: set[str] = set()
        #: read-your-publish waiters, woken by the engine when their segment changes
        self.waiters = Waiters()
        self.engine.on_change = self.waiters.notify
        #: True once caught up with the log (never goes back): the one readiness flag, a plain
        #: attribute so hot paths read it for the cost of an attribute load
        self.ready = False
        self._ready_cond = threading.Condition()
        self.checkpoint_interval = checkpoint_interval
        self.poll_interval = poll_interval
        self.partitions = 0
        self.positions: dict[int, int] = {}
        self.ends: dict[int, int] = {}
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.error: str | None = None
        #: what the replica is doing, for `reason()` until it is ready
        self.phase = f"connecting to the {transport.describe()}"
        self.last_checkpoint_ms = 0
        self.checkpoints_written = 0
        self._checkpoint_key: tuple[object, ...] | None = None
        #: the periodic checkpoint's writer thread, while it writes (`_checkpoint_aside`)
        self._checkpoint_writing: threading.Thread | None = None
        self.started_from: str | None = None  # "checkpoint" or "log", once known
        self._log_id = ""  # the log's identity, read when the log is first opened
        #: when (epoch s) a serving replica saw its log take a new identity, until the state
        #: bootstrapped from the new log is in (`_bootstrap_again`), else None: the versions it
        #: answers from meanwhile are the old log's, so read-your-publish (`at_version`) waits;
        #: `status` reports it (`rebootstrapping_since_ms`)
        self.rebootstrapping_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: LogReader | None = None
        #: the checkpoint being read while the log is opened (`_read_checkpoint`)
        self._checkpoint_read: tuple[threading.Thread, list[checkpoint.Checkpoint | None]] | None
        self._checkpoint_read = None
        nat = native_or_none()
        #: `_native.LocalCheck` over this replica, or None: `local`'s rule over many segments
        #: in one C call (`members_of`, the servers' batch ops)
        self.native_local: Any = None
        if nat is not None:
            self.native_local = nat.LocalCheck(self._segments, self.aged, self, _FRESH)

    # -- the check path ----------------------------------------------------------------------
    def local(self, segment: str) -> SegmentState | str:
        """The state that answers `segment` from memory, or why it is not answered locally:
        "not_ready", "not_held", "dropped", "unknown", "stale" or "diverged". The one owner of
        that rule (the socket server's inlined check is tested against it)."""
        state = self._segments.get(segment)
        if state is not None and state.health is _FRESH and self.ready:
            return state if segment not in self.aged else STALE_AGE
        if not self.ready:
            return NOT_READY
        if state is None:  # the engine holds no segment outside `holds`
            if not self.holds(segment):
                return NOT_HELD
            return _DROPPED if segment in self.engine.dropped else _UNKNOWN
        return state.health.value

    def contains(self, user: int, segment: str) -> bool | None:
        state = self._segments.get(segment)
        if state is not None and state.health is _FRESH and self.ready:
            return user in state.bitmap if segment not in self.aged else None
        return None

    def refresh_ages(self) -> None:
        """Mark the segments whose max age has passed on this replica's clock (and unmark
        the ones a later publish or heartbeat renewed). The replica thread runs it after
        every poll, so a deadline is seen within `poll_interval`."""
        ages = self.engine.ages
        aged = self.aged
        if not ages and not aged:
            return
        now = self.clock_ms()
        changed = [name for name in aged if name not in ages]  # dropped, or max age cleared
        aged.difference_update(changed)
        for name, age in list(ages.items()):
            if age.passed(now):
                if name not in aged:
                    log.warning("segment %s is stale: not republished within its max age", name)
                    aged.add(name)
                    changed.append(name)
            elif name in aged:
                aged.discard(name)
                changed.append(name)
        if changed:
            # what `local` answers changed: a new checkpoint, and the shared replica's writer
            # (a watcher of the waiters) republishes
            self.engine.generation += 1
            for name in changed:
                self.waiters.notify(name)

    # -- read-your-publish (DESIGN.md "Freshness") -----------------------------------------------
    def at_version(self, segment: str, min_version: int) -> SegmentState | str:
        """`local(segment)` when it answers at `min_version` or later; else why not: "behind"
        (older state, or not answerable yet: waiting may help), or a reason waiting cannot
        change ("not_held", or "dropped" at `min_version` or later)."""
        st = self.local(segment)
        if st == NOT_HELD:
            return st
        if self.rebootstrapping_since is not None:  # the old log's versions: not comparable
            return BEHIND
        if type(st) is SegmentState:
            return st if st.version >= min_version else BEHIND
        if st == _DROPPED and self.engine.dropped.get(segment, 0) >= min_version:
            return st
        return BEHIND

    async def wait_version(
        self, segment: str, min_version: int, timeout: float
    ) -> SegmentState | str:
        """`at_version`, waiting up to `timeout` seconds for it to stop being "behind"; the
        replica thread wakes the waiter when the segment changes (no polling)."""
        found: list[SegmentState | str] = [BEHIND]

        def settled() -> bool:
            found[0] = self.at_version(segment, min_version)
            return found[0] != BEHIND

        await self.waiters.wait(segment, settled, timeout)
        return found[0]

    def check_at(
        self, user: int, segment: str, min_version: int, wait_ms: int = MAX_WAIT_MS
    ) -> bool | None:
        """`contains` at `min_version` or later, blocking up to `wait_ms` (at most 1,000) for
        that version to land; None when it has not (never an answer from older state)."""
        user = user_id(user)
        segment = segment_id(segment)
        min_version = version_arg(min_version, "min_version")
        wait_ms = wait_ms_arg(wait_ms)
        found: list[SegmentState | str] = [BEHIND]

        def settled() -> bool:
            found[0] = self.at_version(segment, min_version)
            return found[0] != BEHIND

        self.waiters.wait_blocking(segment, settled, wait_ms / 1000)
        st = found[0]
        return user in st.bitmap if type(st) is SegmentState else None

    def state(self, segment: str) -> SegmentState | None:
        return self.engine.segments.get(segment)

    def expires_at(self, segment: str, user: int) -> int | None:
        """When `user`'s membership of TTL segment `segment` expires on this replica's clock
        (ms since the epoch); None for a non-member, a permanent member or a plain segment.
        Safe from any thread."""
        return self.engine.expires_at(segment, user)

    def next_expiry(self, segment: str) -> int | None:
        """The earliest pending expiry of TTL segment `segment` (ms), None when it has none
        pending or is not a TTL segment (`segment in replica.engine.expiries` says which
        segments are). Safe from any thread."""
        with self.engine.lock:
            index = self.engine.expiries.get(segment)
            return min(index.buckets, default=None) if index is not None else None

    def segment_items(self) -> list[tuple[str, SegmentState]]:
        """A copy of the segment table, safe to read from another thread."""
        return retry_changed(lambda: list(self._segments.items()))

    def memberships_of(self, user: int) -> tuple[list[str], set[str], bool]:
        """(sorted fresh segments containing `user`, every fresh segment, complete): complete
        when this replica answers for every segment of the log (ready, holds all of them,
        none unhealthy), so the list is the whole answer."""
        found: list[str] = []
        fresh: set[str] = set()
        unhealthy = False
        aged = self.aged
        for name, st in self.segment_items():
            if st.health is _FRESH and name not in aged:
                fresh.add(name)
                if user in st.bitmap:
                    found.append(name)
            else:
                unhealthy = True
        found.sort()
        return found, fresh, self.ready and not self.partial and not unhealthy

    # -- segment expressions (sidecar/replica/view.py), from memory only -------------------------
    def eval(self, user: int, expr: str) -> bool | None:
        """`expr` (say "vip & !churned") for `user`, in Kleene logic: a segment this replica
        does not answer (as `contains` returns None for it) is unknown."""
        compiled = compile_arg(expr)
        values = view.local_answers(self, compiled, user_id(user)).values
        return compiled.evaluate(values.__getitem__)

    def count(self, expr: str) -> view.Count:
        """(count, versions) of a bounded expression; NotLocal names the segments this replica
        does not answer, ExprError (a BadRequest) the position of what is wrong."""
        return view.count(self, compile_arg(expr))

    def audience(self, expr: str) -> view.Audience:
        """(members, versions) of a bounded expression: the members as a new BitMap64."""
        return view.audience(self, compile_arg(expr))

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Replica:
        fix_mmap_threshold()  # before the bootstrap allocates (sidecar/memory.py says why)
        self._thread = threading.Thread(target=self._run, name="replica", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        with self._ready_cond:
            return self._ready_cond.wait_for(lambda: self.ready, timeout)

    def _became_ready(self) -> None:
        self.ready_at = time.time()
        with self._ready_cond:
            self.ready = True
            self._ready_cond.notify_all()
        self.waiters.notify_all()

    def stop(self, *, save: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._wait_checkpoint()
        if save and self.ready:
            self.save_checkpoint()

    def __enter__(self) -> Replica:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- status --------------------------------------------------------------------------------
    def lag(self) -> dict[int, int]:
        return {p: max(0, self.ends.get(p, 0) - off) for p, off in self.positions.items()}

    def log_damage(self) -> str | None:
        reader = self._reader
        return reader.damage() if reader is not None else None

    def reason(self) -> str | None:
        """Why this replica is not ready, or what it serves short of (a damaged log), in one
        line; None when ready and nothing is wrong. Set from the start: a replica waiting for
        a broker that is down says so on the first ask."""
        damage = self.log_damage()
        since = self.rebootstrapping_since
        if self.ready and since is not None:
            reason = (
                f"bootstrapping again for {time.time() - since:.1f} s (the log has a new "
                "identity): answering from the old log's state, min_version waits"
            )
            return f"{reason}; {damage}" if damage else reason
        if self.ready:
            return f"serving the intact prefix only: {damage}" if damage else None
        reason = f"{self.phase} for {time.time() - self.started_at:.1f} s"
        if self.error:
            reason += f": {self.error}"
        return f"{reason}; {damage}" if damage else reason

    def status(self) -> dict[str, object]:
        """Safe to call from another thread."""
        return retry_changed(self._status)

    def _status(self) -> dict[str, object]:
        c = self.engine.counters
        since = self.rebootstrapping_since
        return {
            "ready": self.ready,
            "log": self.transport.describe(),
            "segments": len(self.engine.segments),
            "memberships": self.engine.memberships(),
            "unhealthy": sorted(s for s, st in list(self.engine.segments.items()) if not st.fresh),
            "stale_age": sorted(self.aged),
            "lag": self.lag(),
            "positions": dict(self.positions),
            "applied": c.applied,
            "duplicates": c.duplicates,
            "gaps": c.gaps,
            "diverged": c.diverged,
            "resyncs": c.resyncs,
            "rebootstraps": c.rebootstraps,
            "rebootstrapping_since_ms": None if since is None else int(since * 1000),
            "unknown": c.unknown,
            "corrupt": c.corrupt,
            "skipped": dict(c.skipped),
            "partial": self.partial,
            "started_from": self.started_from,
            "error": self.error,
            "reason": self.reason(),
            "log_damage": self.log_damage(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "last_checkpoint_ms": self.last_checkpoint_ms,
        }

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write a checkpoint of the state now, on the calling thread (shutdown). Call it where
        the replica thread does not run (or from it)."""
        self._wait_checkpoint()
        taken = self._take_checkpoint()
        if taken is not None:
            self._write_checkpoint(*taken)

    def _checkpoint_aside(self) -> None:
        """The replica thread's periodic checkpoint: the state is taken here, between two
        polls (so it matches the positions), and the file written on another thread, so
        expiries and the tail go on meanwhile (DESIGN.md "Freshness": within a second of the
        deadline). Skipped while the previous one is still being written."""
        if self._checkpoint_writing is not None and self._checkpoint_writing.is_alive():
            return
        taken = self._take_checkpoint()
        if taken is None:
            return
        self._checkpoint_writing = threading.Thread(
            target=self._write_checkpoint, args=taken, name="checkpoint-write", daemon=True
        )
        self._checkpoint_writing.start()

    def _wait_checkpoint(self) -> None:
        if self._checkpoint_writing is not None:
            self._checkpoint_writing.join()
            self._checkpoint_writing = None

    def _take_checkpoint(self) -> tuple[checkpoint.Checkpoint, tuple[object, ...]] | None:
        """The state to write (its bitmaps pinned: `Engine.pin`) and its key, or None when
        there is nothing (new) to write."""
        if self.state_dir is None or not self.ready:
            return None
        engine = self.engine
        offsets = checkpoint.resume_offsets(engine, self.positions, self._partition_of)
        # The same state at the same offsets is the checkpoint already on disk: skip it (a
        # quiet log would otherwise rewrite the whole file every interval).
        key = (engine.generation, tuple(sorted(offsets.items())))
        if key == self._checkpoint_key and (self.state_dir / checkpoint.FILENAME).exists():
            return None
        with engine.lock:
            segments = dict(engine.segments)
            engine.pin(segments.values())
            ckpt = checkpoint.Checkpoint(
                log_id=self._log_id,
                partitions=self.partitions,
                offsets=offsets,
                segments=segments,
                dropped=dict(engine.dropped),
                ages=dict(engine.ages),
                # changed in place by deltas and expiries: copied (about a TTL segment's size)
                expiries={name: index.copy() for name, index in engine.expiries.items()},
            )
        return ckpt, key

    def _write_checkpoint(self, ckpt: checkpoint.Checkpoint, key: tuple[object, ...]) -> None:
        assert self.state_dir is not None
        started = time.monotonic()
        try:
            size = checkpoint.save(self.state_dir, ckpt)
        except Exception:
            if threading.current_thread() is not self._checkpoint_writing:
                raise
            log.exception("checkpoint write failed; the next interval tries again")
            return
        finally:
            self.engine.unpin()
        self._checkpoint_key = key
        self.checkpoints_written += 1
        self.last_checkpoint_ms = int(time.time() * 1000)
        log.info("checkpoint: %d bytes in %.2f s", size, time.monotonic() - started)

    def _partition_of(self, segment: str) -> int:
        return partition_for(segment, self.partitions)

    def _read_checkpoint(self) -> None:
        """Start reading the checkpoint file on another thread: deserializing it (seconds
        for 1B memberships) overlaps connecting to the log, whose client waits off the GIL."""
        if self.state_dir is None or self._checkpoint_read is not None:
            return
        state_dir = self.state_dir
        found: list[checkpoint.Checkpoint | None] = []
        reading = threading.Thread(
            target=lambda: found.append(checkpoint.read(state_dir)),
            name="checkpoint-read",
            daemon=True,
        )
        reading.start()
        self._checkpoint_read = (reading, found)

    def _restore(self, reader: LogReader) -> dict[int, int] | None:
        if self.state_dir is None:
            return None
        self._read_checkpoint()
        assert self._checkpoint_read is not None
        reading, found = self._checkpoint_read
        reading.join()
        self._checkpoint_read = None  # a retried start reads the file again
        ckpt = found[0] if found else None
        if ckpt is None or not checkpoint.is_of(ckpt, self._log_id, self.state_dir):
            return None
        if not checkpoint.restore(ckpt, reader, self.engine, self.holds):
            return None
        return ckpt.offsets

    # -- the loop ------------------------------------------------------------------------------
    def _open(self) -> LogReader:
        while not self._stop.is_set():
            try:
                self.phase = f"connecting to the {self.transport.describe()}"
                return self.transport.reader()
            except TransportError as exc:
                # The error first: whoever reads the log line then asks /readyz sees it there.
                said, self.error = self.error, str(exc)
                if said != self.error:
                    log.warning("waiting for the log: %s", exc)
                self._stop.wait(1.0)
        raise TransportError("stopped")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._loop()
            except TransportError as exc:
                if self._stop.is_set():
                    return
                if isinstance(exc, NewLogIdentity) and self.ready:
                    self._saw_new_log()  # until `_bootstrap_again` swaps the new state in
                # Broker restarts, leader elections, topics just created: retry, resuming
                # from the positions reached when the replica was already serving.
                self.error = str(exc)
                log.warning("log error, retrying in 1 s: %s", exc)
                self._stop.wait(1.0)
            except Exception as exc:  # keep the reason visible in status
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("replica failed")
                return

    def _loop(self) -> None:
        if not self.ready:
            self._read_checkpoint()
        reader = self._reader = self._open()
        self.error = None
        opened = reader.identity()  # None: this transport's readers do not know it
        if self.ready and opened is not None and opened != self._log_id:
            self._bootstrap_again(reader, opened)
        elif self.ready:  # a retry after a log error: carry on from where we were
            self.rebootstrapping_since = None  # the log it opened is the one its versions are of
            reader.assign({("deltas", p): off for p, off in self.positions.items()})
        else:
            self._log_id = opened or self._log_id or self.transport.identity()
            self.engine.reset()  # a bootstrap that failed half-way starts over
            self.partitions = reader.partitions
            self.phase = "reading the checkpoint" if self.state_dir else "bootstrapping"
            offsets = self._restore(reader)
            self.started_from = "log" if offsets is None else "checkpoint"
            if offsets is None:
                self.phase = "bootstrapping from the log"
                recovery.bootstrap(reader, self.engine)
                self.positions = {p: reader.position("deltas", p) for p in range(self.partitions)}
            else:
                self.positions = dict(offsets)
                reader.assign({("deltas", p): off for p, off in offsets.items()})
        self._refresh_ends(reader)
        target = dict(self.ends)
        self.phase = "catching up with the log"
        last_ckpt = last_ends = time.monotonic()
        try:
            while not self._stop.is_set():
                for rec in reader.poll(self._poll_timeout()):
                    self.engine.apply_record(rec)
                # membership TTL: expiries due on this replica's clock, without a publish;
                # the change hooks (waiters, the shared replica's writer) hear of each
                self.engine.expire()
                for p in range(self.partitions):
                    self.positions[p] = reader.position("deltas", p)
                self.refresh_ages()
                if self.engine.needs_resync:
                    self._resync()
                now = time.monotonic()
                if now - last_ends > 5.0:  # lag only: readiness uses the ends seen at start
                    self._refresh_ends(reader)
                    last_ends = now
                if not self.ready and all(self.positions[p] >= end for p, end in target.items()):
                    self._became_ready()
                    release_free_memory()
                    log.info("ready: %s", self.status())
                if self.state_dir and now - last_ckpt > self.checkpoint_interval:
                    self._checkpoint_aside()
                    last_ckpt = now
        finally:
            reader.close()

    def _bootstrap_again(self, reader: LogReader, log_id: str) -> None:
        """The log got a new identity under a serving replica (`seg-publish --repair-log`
        kept a damaged log's intact prefix; topics deleted and created again): its offsets
        and versions may mean other changes now. Bootstrap as a fresh replica would, into an
        engine aside, the old state answering meanwhile, then swap the new state in whole."""
        log.warning(
            "the log has a new identity (%s; was %s): bootstrapping again", log_id, self._log_id
        )
        self._saw_new_log()
        self.partitions = reader.partitions
        fresh = Engine(self.holds, clock_ms=self.engine.clock_ms, forms=self.engine.forms)
        fresh.counters = self.engine.counters
        recovery.bootstrap(reader, fresh, tick=self.engine.expire)
        # The new state's segments past their max age marked before the swap (`adopt` drops
        # its due expiries), so it is never answered past an age that passed while it was
        # built; the old state's marks are cleared by `refresh_ages` right after.
        now = self.clock_ms()
        self.aged.update(name for name, age in fresh.ages.items() if age.passed(now))
        self.engine.adopt(fresh)
        self.refresh_ages()
        self.positions = {p: reader.position("deltas", p) for p in range(self.partitions)}
        self._log_id = log_id
        self._checkpoint_key = None
        self.engine.counters.rebootstraps += 1
        self.rebootstrapping_since = None
        self.waiters.notify_all()  # read-your-publish waiters judge the new state now

    def _saw_new_log(self) -> None:
        """The log has a new identity: re-bootstrapping from now (or since it was first seen,
        through the retries of one that failed half-way)."""
        if self.rebootstrapping_since is None:
            self.rebootstrapping_since = time.time()

    def _poll_timeout(self) -> float:
        """`poll_interval`, cut short by the next expiry deadline: a TTL segment's members
        go at their deadline, not up to a poll later."""
        deadline = self.engine.next_expiry()
        if deadline is None:
            return self.poll_interval
        return min(self.poll_interval, max(0.0, (deadline - self.clock_ms()) / 1000))

    def _refresh_ends(self, reader: LogReader) -> None:
        self.ends = {p: end for p, (_, end) in reader.watermarks_all("deltas").items()}

    def _resync(self) -> None:
        wanted = set(self.engine.needs_resync)
        self.engine.needs_resync.clear()
        log.info("resyncing %d segments: %s", len(wanted), sorted(wanted)[:10])
        try:
            recovery.resync(
                self.transport,
                self.engine,
                wanted,
                self.positions.__getitem__,
                self.partitions,
                self.engine.expire,
                identity=self._log_id,
            )
        except BaseException:
            # Asked for again after the retry (a broker down), else they would stay stale,
            # answered by the fallback, until another gap; a new log's bootstrap replaces them.
            self.engine.needs_resync |= wanted
            raise
