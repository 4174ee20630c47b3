"""Partition choice shared by every producer: Kafka's Java client murmur2.

A segment lives in partition `murmur2(segment_id) % partitions` in both topics, so a producer
written in Java, Go or anything else that uses the Java partitioner lands in the same place.
"""

from __future__ import annotations

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2`, returned as a signed 32-bit int like Java does."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    end = length & ~3
    for i in range(0, end, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    rest = length & 3
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(segment: str, partitions: int) -> int:
    """The partition of `segment` (Java's `toPositive(murmur2(key)) % partitions`)."""
    return (murmur2(segment.encode()) & 0x7FFFFFFF) % partitions
