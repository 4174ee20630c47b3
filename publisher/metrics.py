"""What a scheduled `seg-publish` tells Prometheus about its last run, so an alert can say "no
successful publish within the schedule" (deploy/observability/). A one-shot process has no
/metrics to scrape: it writes a textfile (node_exporter's textfile collector) or pushes to a
Pushgateway (a Kubernetes CronJob), one group per writer id.

On a failed run the last success is kept: read back from the textfile, and on the Pushgateway
left in place by pushing with POST (which replaces only the metrics pushed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from .publish import PublishResult

LAST_SUCCESS = "seg_publish_last_success_timestamp_seconds"
LAST_RUN = "seg_publish_last_run_timestamp_seconds"
EXIT_CODE = "seg_publish_last_exit_code"
DURATION = "seg_publish_last_duration_seconds"
CHANGED = "seg_publish_last_segments_changed"
ADDS = "seg_publish_last_adds"
RENEWED = "seg_publish_last_renewed"
REMOVES = "seg_publish_last_removes"

_DOCS = {
    LAST_SUCCESS: "When the last successful publish ended (unix seconds).",
    LAST_RUN: "When the last publish run ended, whatever its outcome (unix seconds).",
    EXIT_CODE: "Exit code of the last run (0 ok, 1 log/Aerospike error, 2 bad input or "
    "refused by a guard, 3 fenced).",
    DURATION: "Seconds the last run took.",
    CHANGED: "Segments the last successful publish changed.",
    ADDS: "Memberships the last successful publish added.",
    RENEWED: "Memberships the last successful publish re-affirmed (TTL segments: held already, "
    "given a new expiry).",
    REMOVES: "Memberships the last successful publish removed.",
}
#: every metric name seg-publish exports (the observability test checks the rules use these)
METRICS = tuple(_DOCS)
JOB = "seg-publish"


@dataclass(slots=True)
class RunMetrics:
    writer: str
    textfile: str | None = None
    pushgateway: str | None = None

    def record(self, exit_code: int, seconds: float, result: PublishResult | None) -> None:
        now = time.time()
        values = {LAST_RUN: now, EXIT_CODE: float(exit_code), DURATION: seconds}
        if exit_code == 0 and result is not None:
            values |= {
                LAST_SUCCESS: now,
                CHANGED: result.segments_changed,
                ADDS: result.adds,
                RENEWED: result.renewed,
                REMOVES: result.removes,
            }
        if self.textfile:
            kept = {k: v for k, v in self._previous().items() if k not in values}
            write_to_textfile(self.textfile, self._registry(kept | values))
        if self.pushgateway:
            pushadd_to_gateway(
                self.pushgateway,
                job=JOB,
                registry=self._registry(values),
                grouping_key={"writer": self.writer},
                timeout=10,
            )

    def _registry(self, values: dict[str, float]) -> CollectorRegistry:
        registry = CollectorRegistry()
        for name in METRICS:
            if name in values:
                gauge = Gauge(name, _DOCS[name], ["writer"], registry=registry)
                gauge.labels(self.writer).set(values[name])
        return registry

    def _previous(self) -> dict[str, float]:
        """This writer's values in the existing textfile (none if absent or unreadable)."""
        assert self.textfile
        try:
            text = Path(self.textfile).read_text()
            families = list(text_string_to_metric_families(text))
        except (OSError, ValueError):
            return {}
        return {
            s.name: s.value
            for f in families
            for s in f.samples
            if s.name in _DOCS and s.labels.get("writer") == self.writer
        }
