"""`ttl_seconds` from the definitions file into the publish (DESIGN.md "Freshness"): batch
`[[segment]]` tables into the manifest, `[[stream]]` rules into the stream job's publishes
(which renew TTL members before they lapse), validated with one-line errors. No Spark: the
stream job's publish and renewal are driven directly."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from pyroaring import BitMap64

from compute.definitions import DefinitionError, parse
from compute.rules import parse as parse_rules
from compute.segment_set import write_segment_set
from compute.stream import StreamJob
from publisher.publish import Publisher
from publisher.segment_set import InputError, read_segment_set
from sidecar.replica import RecoveredLog
from sidecar.transport import LogDirTransport

BATCH = '[[segment]]\nname = "a"\nsql = "SELECT 1 AS user_id"\nttl_seconds = 1800\n'
STREAM = (
    '[[stream]]\nname = "cart"\nevent = "add_to_cart"\nwithin_minutes = 30\n'
    "ttl_seconds = 90\n"
    '[[stream]]\nname = "views"\nevent = "view"\nwithin_minutes = 15\n'
)


def test_batch_definitions_carry_ttl_seconds_into_the_manifest(tmp_path: Path) -> None:
    (segment,) = parse(BATCH)
    assert segment.options() == {"ttl_seconds": 1800}
    manifest = write_segment_set(
        tmp_path / "s", {"a": BitMap64([1])}, dt.datetime.now(dt.UTC), {"a": segment.options()}
    )
    assert manifest["segments"]["a"]["ttl_seconds"] == 1800
    assert json.loads((tmp_path / "s" / "manifest.json").read_text()) == manifest
    assert read_segment_set(tmp_path / "s").ttl == {"a": 1800}


@pytest.mark.parametrize("bad", ["0", "-5", '"30"', "1.5", "true", str(2**31)])
def test_bad_ttl_seconds_is_a_one_line_error(bad: str, tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match=r"^segment 'a': ttl_seconds must be an integer"):
        parse(BATCH.replace("1800", bad))
    with pytest.raises(DefinitionError, match=r"^segment 'cart': ttl_seconds must be an integer"):
        parse_rules(STREAM.replace("90", bad))
    write_segment_set(tmp_path / "m", {"a": BitMap64([1])}, dt.datetime.now(dt.UTC))
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["segments"]["a"]["ttl_seconds"] = json.loads(bad)
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"^segment a: ttl_seconds must be an integer") as exc:
        read_segment_set(tmp_path / "m")
    assert "\n" not in str(exc.value)


def test_stream_rules_carry_ttl_seconds() -> None:
    rules = parse_rules(STREAM).rules
    assert [r.ttl_seconds for r in rules] == [90, None]
    assert [r.max_age_seconds for r in rules] == [None, None]


def test_the_stream_job_publishes_its_ttl_rules_additively_and_renews_them(
    tmp_path: Path,
) -> None:
    log = LogDirTransport(tmp_path / "log")
    job = StreamJob(parse_rules(STREAM), Publisher(log, writer_id="t"), tmp_path / "ckpt")
    assert job.ttl == {"cart": 90} and job.max_age == {}
    before = time.time() * 1000
    job._publish({"cart": BitMap64([1, 2]), "views": BitMap64([5])})
    job._publish({"cart": BitMap64([2]), "views": BitMap64([6])})
    with RecoveredLog(log) as state:
        # cart is additive: 1 was not removed (it lapses); views is a full state
        assert state.segments["cart"].bitmap == BitMap64([1, 2])
        assert state.segments["views"].bitmap == BitMap64([6])
        index = state.expiries_of("cart")
        assert index is not None and state.expiries_of("views") is None
        assert before + 90_000 <= index.expires_at(2) <= time.time() * 1000 + 91_000
        assert index.expires_at(1) <= index.expires_at(2)
    # a micro-batch that changed nothing still publishes once a third of the TTL has passed
    job._published_at = time.monotonic()
    assert not job._renewal_due()
    job._published_at = time.monotonic() - 31
    assert job._renewal_due()
    plain = StreamJob(parse_rules(STREAM.replace("ttl_seconds = 90\n", "")),
                      Publisher(log, writer_id="t"), tmp_path / "ckpt2")  # fmt: skip
    plain._published_at = time.monotonic() - 10**6
    assert plain.ttl == {} and not plain._renewal_due()
