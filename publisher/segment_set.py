"""Reading and validating a segment-set directory (DESIGN.md "Publisher input").

Everything is checked before anything is written: the manifest's shape, every segment id,
every file (present, inside the directory, a valid BitMap64) and every cardinality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pyroaring import BitMap64

from sidecar.ids import BadRequest, segment_id
from sidecar.record import MAX_AGE_SECONDS

#: the optional integer fields of a manifest entry (and of a [[segment]] definition), with
#: their ranges: publish guards and freshness (DESIGN.md "Publisher input", "Freshness")
OPTIONS: dict[str, tuple[int, int]] = {
    "min_cardinality": (0, 2**64 - 1),
    "max_age_seconds": (1, MAX_AGE_SECONDS),
    "ttl_seconds": (1, MAX_AGE_SECONDS),
}


def option_value(key: str, value: object) -> int:
    """`value` of the entry option `key`, checked; ValueError naming it otherwise."""
    low, high = OPTIONS[key]
    if type(value) is not int or not low <= value <= high:
        what = "a non-negative integer" if low == 0 else f"an integer in {low}..{high}"
        raise ValueError(f"{key} must be {what}, got {value!r}")
    return value


class InputError(ValueError):
    """The segment-set directory is not valid; the message names the part."""


@dataclass(frozen=True, slots=True)
class SegmentSet:
    computed_at: str
    segments: dict[str, BitMap64]
    #: the entries' optional "min_cardinality" (publish guards)
    min_cardinality: dict[str, int] = field(default_factory=dict)
    #: the entries' optional "max_age_seconds" (heartbeats; DESIGN.md "Freshness")
    max_age: dict[str, int] = field(default_factory=dict)
    #: the entries' optional "ttl_seconds" (membership TTL: additive publishes)
    ttl: dict[str, int] = field(default_factory=dict)


def read_segment_set(path: str | Path) -> SegmentSet:
    root = Path(path)
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{manifest_path} does not exist") from None
    except NotADirectoryError:
        raise InputError(f"{root} is not a directory (a segment set is one)") from None
    except OSError as exc:
        raise InputError(f"cannot read {manifest_path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != 1:
        raise InputError(f'{manifest_path}: expected an object with "format": 1')
    computed_at = manifest.get("computed_at")
    if not isinstance(computed_at, str):
        raise InputError(f'{manifest_path}: "computed_at" must be an ISO 8601 string')
    entries = manifest.get("segments")
    if not isinstance(entries, dict):
        raise InputError(f'{manifest_path}: "segments" must be an object')
    segments: dict[str, BitMap64] = {}
    floors: dict[str, int] = {}
    max_age: dict[str, int] = {}
    ttl: dict[str, int] = {}
    for name, entry in entries.items():
        try:
            segment_id(name)
        except BadRequest as exc:
            raise InputError(f"{manifest_path}: {exc}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise InputError(f'segment {name}: entry must be {{"file": ..., "cardinality": N}}')
        card = entry.get("cardinality")
        if type(card) is not int or card < 0:
            raise InputError(f"segment {name}: cardinality must be a non-negative integer")
        for key, found in (
            ("min_cardinality", floors),
            ("max_age_seconds", max_age),
            ("ttl_seconds", ttl),
        ):
            if key in entry:
                try:
                    found[name] = option_value(key, entry[key])
                except ValueError as exc:
                    raise InputError(f"segment {name}: {exc}") from None
        file = (root / entry["file"]).resolve()
        if root.resolve() not in file.parents:
            raise InputError(f"segment {name}: file {entry['file']!r} is outside {root}")
        try:
            bitmap = BitMap64.deserialize(file.read_bytes())
        except FileNotFoundError:
            raise InputError(f"segment {name}: file {file} does not exist") from None
        except Exception as exc:
            raise InputError(f"segment {name}: {file} is not a BitMap64: {exc}") from exc
        if len(bitmap) != card:
            raise InputError(
                f"segment {name}: {file.name} holds {len(bitmap)} members, manifest says {card}"
            )
        segments[name] = bitmap
    return SegmentSet(computed_at, segments, floors, max_age, ttl)
