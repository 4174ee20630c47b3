"""Publish guards (DESIGN.md "Publish guards and history"): refuse, before anything is
written, a publish that would empty a segment by mistake (a broken batch job, an empty input).

A change is refused when it would remove more than `max_remove_fraction` of the members the
log holds for a segment, or shrink it below the manifest's `min_cardinality`. Segments dropped
by `--prune` count as removing every member; a segment named with `--drop` is the operator's
explicit intent and is not guarded. `force=True` turns both checks off.

A TTL segment (DESIGN.md "Freshness") loses members by expiry, never by a publish: the
fraction does not apply, and `min_cardinality` judges its count after the publish against
its count before this publish's expiries (an input that stopped listing members fails the
floor even when the publish writes nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.cliutil import arg_type
from sidecar.replica import RecoveredLog

from .plan import Plan

#: `seg-publish` and the batch job: a batch recomputes every segment whole, so losing more
#: than half of one in a single run is far more often a broken input than a real change.
DEFAULT_MAX_REMOVE_FRACTION = 0.5
#: The stream job: windowed segments empty legitimately (a window slides past a quiet hour, a
#: 3-member segment loses all 3), and a refusal would wedge an unattended job on a batch that
#: it recomputes identically on restart. So no fraction limit unless asked for;
#: `min_cardinality` still applies.
STREAM_MAX_REMOVE_FRACTION = 1.0


class GuardError(ValueError):
    """The publish was refused; nothing was written. The message names every segment."""

    def __init__(self, violations: list[str]) -> None:
        self.violations = violations
        super().__init__(
            "publish refused, nothing written: "
            + "; ".join(violations)
            + " (check the input; --force publishes it anyway)"
        )


def remove_fraction(text: str | float) -> float:
    """A fraction in (0, 1]; 1 turns the check off. Raises ValueError with the reason."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1] (1 turns the check off), got {text!r}")
    return value


#: the option type of --max-remove-fraction (seg-publish, seg-compute stream)
fraction = arg_type("a fraction in (0, 1] (1: no limit)")(remove_fraction)


@dataclass(frozen=True, slots=True)
class Guard:
    max_remove_fraction: float = DEFAULT_MAX_REMOVE_FRACTION
    force: bool = False

    def __post_init__(self) -> None:
        remove_fraction(self.max_remove_fraction)

    def check(
        self,
        log: RecoveredLog,
        plan: Plan,
        *,
        min_cardinality: Mapping[str, int] | None = None,
        explicit_drops: frozenset[str] | set[str] = frozenset(),
        lapsing: Mapping[str, int] | None = None,
    ) -> None:
        """Raise GuardError when any change of `plan` (against the log's state) breaks a rule.
        `lapsing`: the publish's TTL segments -> their counts before its expiries."""
        if self.force:
            return
        floors = min_cardinality or {}
        violations: list[str] = []
        counts = {c.segment: c.cardinality for c in plan.changes}
        for segment, before in sorted((lapsing or {}).items()):
            current = log.segments.get(segment)
            floor = floors.get(segment)
            if current is None or not current.fresh or floor is None:
                continue
            after = counts.get(segment, current.cardinality)
            if after < min(floor, before):
                violations.append(
                    f"segment {segment}: would shrink from {before:,} to {after:,} members "
                    f"(its unlisted members lapse), below its min_cardinality {floor:,}"
                )
        for change in plan.changes:
            if change.segment in (lapsing or {}):
                continue
            if change.drop and change.segment in explicit_drops:
                continue
            current = log.segments.get(change.segment)
            if current is None or not current.fresh:
                continue  # nothing trustworthy to lose (new, or restated whole)
            before = len(current.bitmap)
            removed = len(change.remove)
            if before and removed / before > self.max_remove_fraction:
                what = "dropping it (--prune) removes" if change.drop else "would remove"
                violations.append(
                    f"segment {change.segment}: {what} {removed:,} of {before:,} members "
                    f"({removed / before:.0%}), over --max-remove-fraction "
                    f"{self.max_remove_fraction:g}"
                )
            floor = floors.get(change.segment)
            if floor is not None and change.cardinality < min(floor, before):
                violations.append(
                    f"segment {change.segment}: would shrink from {before:,} to "
                    f"{change.cardinality:,} members, below its min_cardinality {floor:,}"
                )
        if violations:
            raise GuardError(violations)
