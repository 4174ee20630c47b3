"""Latency histograms: a thin wrapper over HdrHistogram (values in nanoseconds).

Hot loops store raw `perf_counter_ns` deltas in a list and call `record_many` after the loop,
so the histogram's own cost (a few microseconds a value in Python) never lands inside a timed
region.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hdrh.histogram import HdrHistogram

#: 1 ns .. 10 min, 3 significant digits (0.1 % resolution).
LOWEST_NS = 1
HIGHEST_NS = 600 * 10**9
SIGNIFICANT = 3

#: Percentiles sampled for CDF and percentile plots.
CDF_PERCENTILES = (
    [0.0, 0.1, 0.5]
    + [float(p) for p in range(1, 99)]
    + [99.0, 99.3, 99.5, 99.7, 99.8, 99.9, 99.95, 99.97, 99.99, 99.995, 99.999, 100.0]
)


class Hist:
    """`Hist()`; `.record(ns)`, `.record_many(values)`, `.merge(other)`, `.summary()`."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.h = HdrHistogram(LOWEST_NS, HIGHEST_NS, SIGNIFICANT)

    # -- recording ----------------------------------------------------------------------------
    def record(self, ns: int) -> None:
        self.h.record_value(min(max(int(ns), LOWEST_NS), HIGHEST_NS))

    def record_many(self, values: Iterable[int]) -> None:
        rec = self.h.record_value
        for ns in values:
            rec(min(max(int(ns), LOWEST_NS), HIGHEST_NS))

    def merge(self, other: Hist) -> Hist:
        self.h.add(other.h)
        return self

    @classmethod
    def merged(cls, parts: Iterable[Hist], name: str = "") -> Hist:
        out = cls(name)
        for p in parts:
            out.merge(p)
        return out

    # -- reading ------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.h.get_total_count()

    def percentile_ns(self, p: float) -> int:
        return self.h.get_value_at_percentile(p) if self.count else 0

    def percentile_us(self, p: float) -> float:
        return self.percentile_ns(p) / 1000.0

    @property
    def p50_us(self) -> float:
        return self.percentile_us(50)

    @property
    def p99_us(self) -> float:
        return self.percentile_us(99)

    @property
    def p999_us(self) -> float:
        return self.percentile_us(99.9)

    def cdf_points(self) -> list[list[float]]:
        """[[latency_us, percentile], ...] at CDF_PERCENTILES (monotonic in both)."""
        if not self.count:
            return []
        out: list[list[float]] = []
        for p in CDF_PERCENTILES:
            v = self.h.get_value_at_percentile(p) / 1000.0
            if p == 0.0:
                v = self.h.get_min_value() / 1000.0
            out.append([round(v, 3), p])
        return out

    def summary(self, *, cdf: bool = True) -> dict[str, Any]:
        """Figures in microseconds, as stored in the results JSON."""
        if not self.count:
            return {"count": 0}
        doc: dict[str, Any] = {
            "count": self.count,
            "mean_us": round(self.h.get_mean_value() / 1000.0, 3),
            "min_us": round(self.h.get_min_value() / 1000.0, 3),
            "p50_us": round(self.p50_us, 3),
            "p90_us": round(self.percentile_us(90), 3),
            "p99_us": round(self.p99_us, 3),
            "p999_us": round(self.p999_us, 3),
            "p9999_us": round(self.percentile_us(99.99), 3),
            "max_us": round(self.h.get_max_value() / 1000.0, 3),
        }
        if cdf:
            doc["cdf"] = self.cdf_points()
        return doc

    def encode(self) -> str:
        """HdrHistogram's compressed base64 form (portable, for merging across processes)."""
        return self.h.encode().decode("ascii")

    @classmethod
    def decode(cls, text: str, name: str = "") -> Hist:
        out = cls(name)
        out.h.decode_and_add(text)
        return out


def ratio(a: float, b: float) -> float | None:
    """a / b rounded, or None when b is 0."""
    return round(a / b, 3) if b else None
