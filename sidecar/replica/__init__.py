"""The replica: engine (version rules), recovery (bootstrap, resync), checkpoints, runner."""

from .engine import Engine, segment_filter
from .runner import Replica
from .state import Counters, Health, SegmentState

__all__ = ["Counters", "Engine", "Health", "Replica", "SegmentState", "segment_filter"]
