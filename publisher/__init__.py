"""The publisher: segment sets in, Aerospike records and log records out."""

from .plan import SnapshotPolicy
from .publish import Publisher, PublishResult, publish
from .segment_set import InputError, SegmentSet, read_segment_set

__all__ = [
    "InputError",
    "PublishResult",
    "Publisher",
    "SegmentSet",
    "SnapshotPolicy",
    "publish",
    "read_segment_set",
]
