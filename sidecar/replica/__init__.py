"""The replica: engine (version rules), recovery (bootstrap, resync), checkpoints, runner."""

from .engine import Engine, segment_filter
from .runner import Replica
from .state import Counters, Health, SegmentState
from .view import Audience, Count, NotLocal

__all__ = [
    "Audience",
    "Count",
    "Counters",
    "Engine",
    "Health",
    "NotLocal",
    "Replica",
    "SegmentState",
    "segment_filter",
]
