"""Prometheus metrics of one sidecar server instance, on its own CollectorRegistry.

The hot path only bumps plain Python numbers (one dict increment, one bucket increment per
request, never per item, no label lookups, no locks: everything runs on the event loop
thread); custom collectors turn them into Prometheus families on scrape. Replica numbers are
read from `replica.status()` and `engine.counters` on scrape too.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..replica.state import retry_changed
from .results import SOURCES

if TYPE_CHECKING:
    from ..replica.runner import Replica

log = logging.getLogger(__name__)

#: Request latency buckets (seconds): a local check takes a few microseconds in the server.
LATENCY_BUCKETS: tuple[float, ...] = (
    2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
FALLBACK_BUCKETS: tuple[float, ...] = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
)  # fmt: skip


class Histogram:
    """A cumulative-on-export histogram made of plain ints (cheap to observe)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            out.append((repr(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


#: The source label of requests that look nothing up (ping, status, bad requests).
NO_SOURCE = "-"
#: (source, "ok") keys, built once: recording never allocates a label tuple.
OK_KEYS: dict[str, tuple[str, str]] = {source: (source, "ok") for source in (*SOURCES, NO_SOURCE)}


class OpStats:
    """Requests of one (transport, op): counts by (source, result) and a latency histogram.
    Servers fetch it once per op and keep it: recording is a dict bump and a bisect."""

    __slots__ = ("counts", "latency")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = dict.fromkeys(OK_KEYS.values(), 0)
        self.latency = Histogram(LATENCY_BUCKETS)

    def record(self, key: tuple[str, str], seconds: float) -> None:
        """Count one request under `key` = (source, result); pass a constant tuple."""
        counts = self.counts
        if key in counts:
            counts[key] += 1
        else:
            counts[key] = 1
        latency = self.latency
        latency.counts[bisect.bisect_left(latency.bounds, seconds)] += 1
        latency.sum += seconds


class Metrics(Collector):
    """All metrics of one server instance. `render()` is the /metrics body."""

    def __init__(self, replica: Replica | None = None, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.ops: dict[tuple[str, str], OpStats] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.fallback_calls: dict[str, int] = {"ok": 0, "none": 0}
        self.fallback_latency = Histogram(FALLBACK_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.registry.register(self)
        if replica is not None:
            self.registry.register(ReplicaCollector(replica))
        if process:
            ProcessCollector(registry=self.registry)

    # -- recording ---------------------------------------------------------------------------
    def op(self, transport: str, op: str) -> OpStats:
        key = (transport, op)
        stats = self.ops.get(key)
        if stats is None:
            stats = self.ops[key] = OpStats()
        return stats

    def error(self, transport: str, kind: str) -> None:
        key = (transport, kind)
        self.errors[key] = self.errors.get(key, 0) + 1

    def fallback_call(self, ok: bool, seconds: float) -> None:
        self.fallback_calls["ok" if ok else "none"] += 1
        self.fallback_latency.observe(seconds)

    def request_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Requests so far as `{transport: {op: {key: count}}}`, the key being the answer's
        source for a served request (`ok` for ops without one), else the result (e.g.
        `bad_request`): the JSON view of `seg_requests_total` that /v1/status carries."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (transport, op), stats in list(self.ops.items()):
            counts: dict[str, int] = {}
            for (source, result), n in list(stats.counts.items()):
                if n:
                    key = result if result != "ok" else ("ok" if source == NO_SOURCE else source)
                    counts[key] = counts.get(key, 0) + n
            out.setdefault(transport, {})[op] = counts
        return out

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge read on scrape (e.g. open connections)."""
        self.gauges[name] = (doc, read)

    # -- export ----------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "seg_requests",
            "Requests by transport, op, answer source and result.",
            labels=["transport", "op", "source", "result"],
        )
        latency = HistogramMetricFamily(
            "seg_request_duration_seconds",
            "Time from receiving a request to its response being ready, per op.",
            labels=["transport", "op"],
        )
        for (transport, op), stats in sorted(self.ops.items()):
            for (source, result), count in sorted(stats.counts.items()):
                if count == 0:
                    continue
                requests.add_metric([transport, op, source, result], count)
            latency.add_metric([transport, op], stats.latency.buckets(), stats.latency.sum)
        yield requests
        yield latency
        errors = CounterMetricFamily(
            "seg_errors",
            "Requests answered with an error or closed, by transport and kind.",
            labels=["transport", "kind"],
        )
        for (transport, kind), count in sorted(self.errors.items()):
            errors.add_metric([transport, kind], count)
        yield errors
        calls = CounterMetricFamily(
            "seg_fallback_calls",
            "Fallback lookups by result (ok: answered, none: could not answer).",
            labels=["result"],
        )
        for result, count in sorted(self.fallback_calls.items()):
            calls.add_metric([result], count)
        yield calls
        fb = HistogramMetricFamily(
            "seg_fallback_duration_seconds",
            "Fallback lookup latency.",
            buckets=self.fallback_latency.buckets(),
            sum_value=self.fallback_latency.sum,
        )
        yield fb
        for name, (doc, read) in sorted(self.gauges.items()):
            try:
                value = float(read())
            except Exception:
                log.exception("gauge %s failed", name)
                continue
            yield GaugeMetricFamily(name, doc, value=value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_RECORD_COUNTERS = (
    "applied",
    "duplicates",
    "gaps",
    "diverged",
    "resyncs",
    "rebootstraps",
    "unknown",
    "corrupt",
    "drops",
    "ignored",
    "heartbeats",
    # TTL deltas applied without their cardinality check (a lagging replica's clock had
    # already expired members the publisher still counted; DESIGN.md "Freshness")
    "ttl_unchecked",
)


class ReplicaCollector(Collector):
    """Replica state read on scrape."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        status: dict[str, Any] = self.replica.status()
        counters = self.replica.engine.counters
        records = CounterMetricFamily(
            "seg_replica_records",
            "Log records by what the replica did with them.",
            labels=["outcome"],
        )
        for name in _RECORD_COUNTERS:
            records.add_metric([name], getattr(counters, name, 0))
        yield records
        skipped = CounterMetricFamily(
            "seg_replica_skipped_records",
            "Log records not applied because they are unknown or invalid, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(dict(counters.skipped).items()):
            skipped.add_metric([reason], count)
        yield skipped
        yield CounterMetricFamily(
            "seg_replica_expired_memberships",
            "Memberships of TTL segments dropped at their expiry on this replica's clock.",
            value=counters.expired,
        )
        yield GaugeMetricFamily(
            "seg_replica_ready", "1 once caught up with the log.", value=int(bool(status["ready"]))
        )
        yield GaugeMetricFamily(
            "seg_replica_log_damaged",
            "1 while the log directory is damaged: the replica serves its intact prefix only.",
            value=int(bool(status.get("log_damage"))),
        )
        since_ms = status.get("rebootstrapping_since_ms")
        yield GaugeMetricFamily(
            "seg_replica_rebootstrapping",
            "1 while the replica bootstraps again from a log with a new identity (answering "
            "from the old log's state meanwhile).",
            value=int(since_ms is not None),
        )
        yield GaugeMetricFamily(
            "seg_replica_rebootstrap_started_timestamp_seconds",
            "When the re-bootstrap under way began (0: none under way).",
            value=(since_ms or 0) / 1000,
        )
        yield GaugeMetricFamily(
            "seg_replica_segments", "Segments held.", value=status.get("segments", 0)
        )
        yield GaugeMetricFamily(
            "seg_replica_unhealthy_segments",
            "Held segments that are stale or diverged (answered by the fallback).",
            value=len(status.get("unhealthy", ())),
        )
        yield GaugeMetricFamily(
            "seg_replica_stale_age_segments",
            "Held segments not republished within their max_age_seconds (answered by the "
            "fallback until the next publish or heartbeat).",
            value=len(status.get("stale_age", ())),
        )
        yield GaugeMetricFamily(
            "seg_replica_memberships", "Memberships held.", value=status.get("memberships", 0)
        )
        yield GaugeMetricFamily(
            "seg_replica_bitmap_bytes",
            "Bytes in roaring containers.",
            value=retry_changed(self.replica.engine.bitmap_bytes),
        )
        lag = GaugeMetricFamily(
            "seg_replica_lag_records",
            "Delta records behind the end of the log, per partition.",
            labels=["partition"],
        )
        for partition, value in sorted(dict(status.get("lag", {})).items()):
            lag.add_metric([str(partition)], value)
        yield lag
        yield GaugeMetricFamily(
            "seg_replica_last_checkpoint_timestamp_seconds",
            "When the last checkpoint was written (0: never).",
            value=status.get("last_checkpoint_ms", 0) / 1000,
        )
