"""The replica: engine (version rules), recovery (bootstrap, resync), checkpoints, runner;
and `RecoveredLog`, the log's state as a writer (the publisher) recovers and keeps it.
Imported on first use (sidecar/lazy.py): a publisher loads the recovery, not the runner."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from ..expr import Audience, Count
    from .engine import Engine, LogObserver, segment_filter
    from .recovered import RecoveredLog
    from .runner import Replica
    from .state import Counters, Health, SegmentState
    from .view import NotLocal

__all__ = [
    "Audience",
    "Count",
    "Counters",
    "Engine",
    "Health",
    "LogObserver",
    "NotLocal",
    "RecoveredLog",
    "Replica",
    "SegmentState",
    "segment_filter",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "Audience": "..expr",
        "Count": "..expr",
        "Engine": ".engine",
        "LogObserver": ".engine",
        "segment_filter": ".engine",
        "RecoveredLog": ".recovered",
        "Replica": ".runner",
        "Counters": ".state",
        "Health": ".state",
        "SegmentState": ".state",
        "NotLocal": ".view",
    },
)
