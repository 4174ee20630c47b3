"""Writing the segment-set directory, compute's output and the publisher's input (DESIGN.md):

    DIR/manifest.json   {"format": 1, "computed_at": "<ISO 8601 UTC>",
                         "segments": {"<segment>": {"file": "<file>", "cardinality": N,
                                                    "min_cardinality": M (optional),
                                                    "max_age_seconds": S (optional),
                                                    "ttl_seconds": T (optional)}}}
    DIR/<file>          BitMap64.serialize() bytes of that segment's members

File names are `<nnnn>-<segment id with ':' replaced by '_'>.roaring`: the index keeps names
unique on case-insensitive file systems and the rest keeps them readable. Readers must take
the name from the manifest, never derive it. The directory is built beside DIR and renamed
into place, so DIR is always either the previous complete set or the new complete set.
Reading belongs to the publisher.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from pathlib import Path

from pyroaring import BitMap64

from compute.definitions import SEGMENT_RE
from compute.fsutil import atomic_directory, write_file

FORMAT = 1
MANIFEST = "manifest.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def iso_utc(when: dt.datetime) -> str:
    """ISO 8601 in UTC with a Z suffix, millisecond precision."""
    if when.tzinfo is None:
        raise ValueError("computed_at must be timezone-aware")
    text = when.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def file_name(index: int, segment: str) -> str:
    return f"{index:04d}-{_UNSAFE.sub('_', segment)}.roaring"


def write_segment_set(
    path: Path | str,
    bitmaps: Mapping[str, BitMap64],
    computed_at: dt.datetime,
    options: Mapping[str, Mapping[str, int]] | None = None,
) -> dict:
    """Write `bitmaps` (segment id -> members) as a segment-set directory at `path`, with the
    definitions' options of each segment (`min_cardinality`, `max_age_seconds`,
    `ttl_seconds`: see publisher/segment_set.py `OPTIONS`) in its entry.

    An existing segment set at `path` is replaced atomically; any other non-empty directory
    is refused. Returns the manifest that was written.
    """
    for name, bitmap in bitmaps.items():
        if not isinstance(name, str) or not SEGMENT_RE.match(name):
            raise ValueError(f"invalid segment id {name!r}")
        if not isinstance(bitmap, BitMap64):
            raise TypeError(f"segment {name!r}: expected a BitMap64, got {type(bitmap).__name__}")
    manifest: dict = {"format": FORMAT, "computed_at": iso_utc(computed_at), "segments": {}}
    with atomic_directory(Path(path), MANIFEST, "segment set") as tmp:
        for index, (name, bitmap) in enumerate(bitmaps.items()):
            file = file_name(index, name)
            write_file(tmp / file, bitmap.serialize())
            entry = manifest["segments"][name] = {"file": file, "cardinality": len(bitmap)}
            entry.update((options or {}).get(name, {}))
        write_file(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
