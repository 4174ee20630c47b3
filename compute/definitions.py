"""Segment definitions: a TOML file of `[[segment]]` tables holding Spark SQL.

    [params]                      # optional, shared by every segment
    min_spend = 1000

    [[segment]]
    name = "vip_buyers"           # the segment id
    description = "..."           # optional
    sql = '''
    SELECT user_id FROM users WHERE tier = 'vip'
    '''
    [segment.params]              # optional, this segment only
    days = 90

`{name}` in the SQL (and the description) is replaced by the parameter's value, as text
(strings are not quoted: write `'{country}'`); `{{` and `}}` stand for literal braces.
Parameters come from, lowest precedence first: the caller's base parameters (batch supplies
`as_of`), the file's `[params]`, the segment's `[segment.params]`, and the caller's overrides
(`--param`, `--as-of`).

Everything here runs before Spark starts; the Spark-side checks (the query analyzes and returns
exactly one integer `user_id` column) live in compute.batch.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from publisher.segment_set import OPTIONS, option_value  # the manifest entry's options
from sidecar.ids import SEGMENT_RE  # the one segment-id rule, shared by every part

PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SEGMENT_KEYS = frozenset({"name", "description", "sql", "params", *OPTIONS})
# [[stream]] tables are streaming rules, read by compute.rules (`seg-compute stream`).
_TOP_KEYS = frozenset({"params", "segment", "stream"})
EXAMPLE = Path(__file__).parent / "definitions" / "example.toml"

ParamValue = str | int | float | bool | dt.date | dt.datetime | dt.time


class DefinitionError(ValueError):
    """A segment definition is invalid. The message names the segment (when it has one)."""

    def __init__(self, message: str, segment: str | None = None) -> None:
        self.segment = segment
        self.reason = message
        super().__init__(f"segment {segment!r}: {message}" if segment is not None else message)


@dataclass(frozen=True)
class Segment:
    """One segment, ready to run: `sql` and `description` have their parameters substituted."""

    name: str
    description: str
    sql: str
    template: str = field(repr=False)
    params: Mapping[str, ParamValue] = field(default_factory=dict, repr=False)
    #: written into the manifest: the publisher refuses to shrink the segment below it
    min_cardinality: int | None = None
    #: written into the manifest: replicas mark the segment stale when it is not
    #: republished within this many seconds (DESIGN.md "Freshness")
    max_age_seconds: int | None = None
    #: written into the manifest: members expire this many seconds after the publish that
    #: listed them, and a publish adds without removing (DESIGN.md "Freshness")
    ttl_seconds: int | None = None

    def options(self) -> dict[str, int]:
        """The manifest entry's options this definition sets (publisher/segment_set.py)."""
        return {k: v for k in OPTIONS if (v := getattr(self, k)) is not None}


def param_text(value: object) -> str:
    """How a parameter value appears in SQL."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, str | int | float | dt.date | dt.time):
        return str(value)
    raise TypeError(f"unsupported parameter type {type(value).__name__}")


def render(template: str, params: Mapping[str, ParamValue], segment: str | None = None) -> str:
    """Substitute `{name}` placeholders; an undefined one is a DefinitionError."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name not in params:
            known = ", ".join(sorted(params)) or "none"
            raise DefinitionError(
                f"undefined parameter {{{name}}} in sql (defined: {known})", segment
            )
        return param_text(params[name])

    return _PLACEHOLDER.sub(substitute, template)


def _check_params(raw: object, where: str, segment: str | None) -> dict[str, ParamValue]:
    if not isinstance(raw, dict):
        raise DefinitionError(f"{where} must be a table of name = value", segment)
    for key, value in raw.items():
        if not PARAM_RE.match(key):
            raise DefinitionError(f"{where}: invalid parameter name {key!r}", segment)
        if isinstance(value, dict | list):
            raise DefinitionError(
                f"{where}: parameter {key!r} must be a string, number, boolean or date", segment
            )
    return dict(raw)


def parse(
    text: str,
    source: str = "<definitions>",
    base_params: Mapping[str, ParamValue] | None = None,
    overrides: Mapping[str, ParamValue] | None = None,
) -> list[Segment]:
    """Parse and validate a definitions document; return the segments in file order."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DefinitionError(f"{source}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise DefinitionError(
            f"{source}: unknown top-level key(s) {', '.join(unknown)} "
            "(expected [params], [[segment]] and [[stream]])"
        )
    shared = _check_params(doc.get("params", {}), f"{source}: [params]", None)
    raw_segments = doc.get("segment")
    if not isinstance(raw_segments, list) or not raw_segments:
        raise DefinitionError(f"{source}: no [[segment]] tables")

    segments: list[Segment] = []
    first_seen: dict[str, int] = {}
    for index, raw in enumerate(raw_segments, start=1):
        name = table_name(raw, index, source, "segment")
        if name in first_seen:
            raise DefinitionError(
                f"defined twice in {source} (segments #{first_seen[name]} and #{index})", name
            )
        first_seen[name] = index
        unknown = sorted(set(raw) - _SEGMENT_KEYS)
        if unknown:
            raise DefinitionError(f"unknown key(s) {', '.join(unknown)}", name)
        sql = raw.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise DefinitionError("sql is missing or empty", name)
        description, options = described_options(raw, OPTIONS, name)
        own = _check_params(raw.get("params", {}), "[segment.params]", name)
        params = {**(base_params or {}), **shared, **own, **(overrides or {})}
        rendered = render(sql, params, name)
        text = render(description, params, name)
        segments.append(Segment(name, text, rendered, sql, params, **options))
    _check_single_owner(doc, first_seen)
    return segments


def described_options(
    raw: dict[str, Any], keys: Iterable[str], name: str
) -> tuple[str, dict[str, int]]:
    """A `[[segment]]` or `[[stream]]` table's description and its manifest options among
    `keys` (max_age_seconds, ttl_seconds, ...), each validated as the manifest validates it."""
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise DefinitionError("description must be a string", name)
    try:
        return description, {k: option_value(k, raw[k]) for k in keys if k in raw}
    except ValueError as exc:
        raise DefinitionError(str(exc), name) from None


def table_name(raw: object, index: int, source: str, kind: str) -> str:
    """The valid segment id named by the `index`-th `[[kind]]` table of `source`."""
    if not isinstance(raw, dict):
        raise DefinitionError(f"{source}: {kind} #{index} is not a table")
    name = raw.get("name")
    if not isinstance(name, str):
        raise DefinitionError(f"{source}: {kind} #{index} has no name (a string)")
    if not SEGMENT_RE.match(name):
        raise DefinitionError(
            "not a valid segment id (1-128 chars of [A-Za-z0-9_.:-], "
            "starting with a letter or digit)",
            name,
        )
    return name


def _check_single_owner(doc: Mapping[str, object], batch_names: Mapping[str, int]) -> None:
    """A segment is owned by the batch job or by the stream job, never both."""
    streams = doc.get("stream")
    for raw in streams if isinstance(streams, list) else []:
        if isinstance(raw, dict) and raw.get("name") in batch_names:
            raise DefinitionError(
                "is both a batch [[segment]] and a [[stream]] segment: a segment has one owner "
                "(the batch job or the stream job), rename one of them",
                str(raw["name"]),
            )


def load(
    path: Path | str,
    base_params: Mapping[str, ParamValue] | None = None,
    overrides: Mapping[str, ParamValue] | None = None,
) -> list[Segment]:
    """Read, parse and validate a definitions file (see `parse`)."""
    return parse(read_definitions(path), str(path), base_params, overrides)


def read_definitions(path: Path | str) -> str:
    """The text of a definitions file; DefinitionError when unreadable or not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise DefinitionError(f"cannot read definitions {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise DefinitionError(f"definitions {path} is not UTF-8") from None


def parse_assignment(text: str) -> tuple[str, str]:
    """Parse a `NAME=VALUE` parameter override (the value stays a string)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not PARAM_RE.match(name):
        raise ValueError(f"expected NAME=VALUE with NAME an identifier, got {text!r}")
    return name, value
