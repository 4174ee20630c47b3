"""The replica: engine (version rules), recovery (bootstrap, resync), checkpoints, runner;
and `RecoveredLog`, the log's state as a writer (the publisher) recovers and keeps it."""

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
