"""The replica: engine (version rules), recovery (bootstrap, resync), checkpoints, runner."""

from ..expr import Audience, Count
from .engine import Engine, segment_filter
from .runner import Replica
from .state import Counters, Health, SegmentState
from .view import NotLocal

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
