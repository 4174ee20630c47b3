"""Streaming segment rules: the `[[stream]]` tables of a definitions file.

    [[stream]]
    name = "cart_abandoners_30m"      # the segment id (owned by `seg-compute stream`)
    description = "..."               # optional
    event = "add_to_cart"             # the event type that qualifies a user
    within_minutes = 30               # ... seen in the last 30 minutes (event time)
    min_count = 1                     # ... at least this many times (default 1)
    category = "electronics"          # optional: only events of this category count
    unless = "order"                  # optional: not when this event type happened at or
                                      # after the user's latest qualifying event
    max_age_seconds = 600             # optional: replicas mark it stale when not republished
    ttl_seconds = 1800                # optional: each publish re-affirms the members for this
                                      # long; members the job no longer lists lapse then

A user is a member as of time T when at least `min_count` qualifying events have ts in
(T - within_minutes, T], and (with `unless`) no `unless` event has ts >= the latest qualifying
event's ts. T is event time: the largest event ts the job has seen (see compute/stream.py).

`[[segment]]` tables in the same file are batch segments (compute/definitions.py). A segment
has exactly one owner: a name used by both kinds is an error, here and in the batch loader.

The per-user state a rule needs is a *track*: for each (event type, category filter) the
newest K timestamps per user, where K is the largest `min_count` over the rules reading it
(the K-th newest ts is inside the window exactly when at least K events are). An `unless` event
type is a track with K = 1 (the user's latest such event). A track keeps timestamps only as
far back as the longest window that reads it: anything older cannot change any membership.
`evaluate` is the plain-Python statement of these semantics; compute/stream.py computes the
same thing in Spark, and the tests hold one against the other.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from compute.definitions import (
    DefinitionError,
    described_options,
    read_definitions,
    table_name,
)
from compute.events import EVENT_TYPES, Event

MAX_WINDOW_MINUTES = 31 * 24 * 60
MAX_MIN_COUNT = 1000
_RULE_KEYS = frozenset({"name", "description", "event", "within_minutes", "min_count",
                        "category", "unless", "max_age_seconds", "ttl_seconds"})  # fmt: skip
#: the manifest entry options a rule may carry (publisher/segment_set.py checks each)
_RULE_OPTIONS = ("max_age_seconds", "ttl_seconds")


@dataclass(frozen=True)
class Track:
    """Per-user state: the newest timestamps of one event type (optionally one category)."""

    event: str
    category: str | None = None

    @property
    def id(self) -> str:
        return self.event if self.category is None else f"{self.event}/{self.category}"

    def matches(self, event: Event) -> bool:
        return event["type"] == self.event and (
            self.category is None or event["category"] == self.category
        )


@dataclass(frozen=True)
class StreamRule:
    name: str
    event: str
    within_minutes: float
    min_count: int = 1
    category: str | None = None
    unless: str | None = None
    description: str = ""
    #: replicas mark the segment stale when the job has not republished it within this long
    max_age_seconds: int | None = None
    #: membership TTL (DESIGN.md "Freshness"): each publish re-affirms the members for this
    #: long, and members no longer listed lapse instead of being removed
    ttl_seconds: int | None = None

    @property
    def window_ms(self) -> int:
        return math.ceil(self.within_minutes * 60_000)

    @property
    def track(self) -> Track:
        return Track(self.event, self.category)

    @property
    def unless_track(self) -> Track | None:
        return Track(self.unless) if self.unless is not None else None


@dataclass(frozen=True)
class TrackSpec:
    """What the state keeps for one track: `depth` newest timestamps, `horizon_ms` back."""

    track: Track
    depth: int
    horizon_ms: int


@dataclass(frozen=True)
class StreamDefinitions:
    rules: list[StreamRule]
    batch_names: frozenset[str] = field(default_factory=frozenset)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def tracks(self) -> list[TrackSpec]:
        """Every track the rules read, with its depth and horizon, in a stable order."""
        depth: dict[Track, int] = {}
        horizon: dict[Track, int] = {}
        for rule in self.rules:
            uses = [(rule.track, rule.min_count)]
            if rule.unless_track is not None:
                uses.append((rule.unless_track, 1))
            for track, k in uses:
                depth[track] = max(depth.get(track, 0), k)
                horizon[track] = max(horizon.get(track, 0), rule.window_ms)
        return [TrackSpec(t, depth[t], horizon[t]) for t in sorted(depth, key=lambda t: t.id)]


def _number(raw: Mapping[str, object], key: str, name: str, low: float, high: float) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise DefinitionError(f"{key} must be a number in {low:g}..{high:g}, got {value!r}", name)
    return value


def _event_type(raw: Mapping[str, object], key: str, name: str) -> str:
    value = raw.get(key)
    if value not in EVENT_TYPES:
        raise DefinitionError(f"{key} must be one of {', '.join(EVENT_TYPES)}, got {value!r}", name)
    return str(value)


def _rule(raw: object, index: int, source: str) -> StreamRule:
    name = table_name(raw, index, source, "stream")
    assert isinstance(raw, dict)
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise DefinitionError(
            f"unknown key(s) {', '.join(unknown)} in [[stream]] (known: "
            f"{', '.join(sorted(_RULE_KEYS))})",
            name,
        )
    event = _event_type(raw, "event", name)
    within = _number(raw, "within_minutes", name, 0, MAX_WINDOW_MINUTES)
    if within <= 0:
        raise DefinitionError("within_minutes must be > 0", name)
    min_count = raw.get("min_count", 1)
    if isinstance(min_count, bool) or not isinstance(min_count, int):
        raise DefinitionError(f"min_count must be an integer, got {min_count!r}", name)
    if not 1 <= min_count <= MAX_MIN_COUNT:
        raise DefinitionError(f"min_count must be in 1..{MAX_MIN_COUNT}, got {min_count}", name)
    category = raw.get("category")
    if category is not None and (not isinstance(category, str) or not category):
        raise DefinitionError(f"category must be a non-empty string, got {category!r}", name)
    unless = _event_type(raw, "unless", name) if "unless" in raw else None
    if unless == event:
        raise DefinitionError("unless must differ from event", name)
    description, options = described_options(raw, _RULE_OPTIONS, name)
    return StreamRule(name, event, within, min_count, category, unless, description, **options)


def parse(text: str, source: str = "<definitions>") -> StreamDefinitions:
    """The `[[stream]]` rules of a definitions document, validated; the `[[segment]]` names
    are read only to enforce single ownership."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DefinitionError(f"{source}: not valid TOML: {e}") from None
    raw_rules = doc.get("stream")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise DefinitionError(f"{source}: no [[stream]] tables")
    batch = doc.get("segment", [])
    batch_names = frozenset(
        s["name"] for s in batch if isinstance(s, dict) and isinstance(s.get("name"), str)
    ) if isinstance(batch, list) else frozenset()  # fmt: skip
    rules: list[StreamRule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules, start=1):
        rule = _rule(raw, index, source)
        if rule.name in seen:
            raise DefinitionError(f"defined twice in {source} ([[stream]])", rule.name)
        if rule.name in batch_names:
            raise DefinitionError(ownership_message(), rule.name)
        seen.add(rule.name)
        rules.append(rule)
    return StreamDefinitions(rules, batch_names)


def ownership_message() -> str:
    return (
        "is both a batch [[segment]] and a [[stream]] segment: a segment has one owner "
        "(the batch job or the stream job), rename one of them"
    )


def load(path: Path | str) -> StreamDefinitions:
    return parse(read_definitions(path), str(path))


def evaluate(rules: Iterable[StreamRule], events: Iterable[Event], as_of: int) -> dict[str, set]:
    """Reference semantics: each rule's members as of `as_of` (ms), from all `events`.
    Events after `as_of` are ignored. Quadratic and in memory: for tests only."""
    events = [e for e in events if e["ts"] <= as_of]
    out: dict[str, set[int]] = {}
    for rule in rules:
        stamps: dict[int, list[int]] = {}
        last_unless: dict[int, int] = {}
        for e in events:
            if rule.track.matches(e):
                stamps.setdefault(e["user_id"], []).append(e["ts"])
            if rule.unless is not None and e["type"] == rule.unless:
                last_unless[e["user_id"]] = max(last_unless.get(e["user_id"], -1), e["ts"])
        members = set()
        for user, ts in stamps.items():
            recent = [t for t in ts if t > as_of - rule.window_ms]
            if len(recent) < rule.min_count:
                continue
            if rule.unless is not None and last_unless.get(user, -1) >= max(recent):
                continue
            members.add(user)
        out[rule.name] = members
    return out
