"""The batch's one pass against its job-per-segment form: the same bitmaps for the example and
the benchmark definitions, the first bad segment in definition order named, and the views
uncached afterwards. (tests/test_compute_batch.py checks the one pass against ground truth.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from compute import batch, definitions, lake, pruning
from compute.definitions import EXAMPLE, DefinitionError
from tests.test_compute_batch import segment

BENCH20 = EXAMPLE.parent / "bench20.toml"
#: the seed of this module's `small_lake` (tests/spark_session.py)
LAKE_SEED = 11


@pytest.mark.spark
@pytest.mark.parametrize("defs", [EXAMPLE, BENCH20], ids=["example", "bench20"])
def test_one_pass_equals_a_job_per_segment(spark, small_lake: Path, defs: Path) -> None:
    segments = batch.load_segments(small_lake, defs)
    seen: list[batch.SegmentResult] = []
    one = batch.compute(spark, small_lake, segments, seen.append)
    each = batch.compute(spark, small_lake, segments, one_pass=False)
    assert list(one) == list(each) == [s.name for s in segments]
    assert one == each
    assert [r.name for r in seen] == list(one)
    assert [r.cardinality for r in seen] == [len(b) for b in one.values()]
    assert len({r.seconds for r in seen}) == 1, "one pass: the pass's seconds for every segment"
    assert sum(map(len, one.values())) > 0
    assert not any(spark.catalog.isCached(t) for t in ("users", "orders", "events"))


@pytest.mark.spark
def test_one_pass_names_the_first_bad_segment(spark, small_lake: Path) -> None:
    segments = definitions.parse(
        segment("ok", "SELECT user_id FROM users")
        + segment("neg", "SELECT -1 AS user_id")
        + segment("null", "SELECT CAST(NULL AS BIGINT) AS user_id")
    )
    with pytest.raises(DefinitionError, match="segment 'neg'"):
        batch.compute(spark, small_lake, segments)
    assert not spark.catalog.isCached("users")


@pytest.mark.spark
def test_columns_read_follows_joins_and_subqueries(spark, small_lake: Path) -> None:
    views = batch.register_views(spark, small_lake)
    segments = definitions.parse(
        segment("tiers", "SELECT user_id FROM users WHERE tier = 'vip'")
        + segment(
            "books",
            "SELECT u.user_id FROM users u WHERE u.country = 'DE' AND u.user_id IN "
            "(SELECT o.user_id FROM orders o WHERE o.category = 'books')",
        )
        + segment("rows", "SELECT 1 AS user_id FROM events")
    )
    frames = [batch.analyze(spark, s) for s in segments]
    assert pruning.columns_read(frames[:1], views) == {"users": {"user_id", "tier"}}
    assert pruning.columns_read(frames, views) == {
        "users": {"user_id", "tier", "country"},
        "orders": {"user_id", "category"},
        "events": set(),  # read (its row count), no column: left whole and uncached
    }


@pytest.mark.spark
def test_one_pass_caches_only_the_columns_read_then_restores_the_views(
    spark, small_lake: Path
) -> None:
    segments = definitions.parse(
        segment("vip", "SELECT user_id FROM users WHERE tier = 'vip'")
        + segment("books", "SELECT user_id FROM orders WHERE category = 'books'")
    )
    with batch.prepared(spark, small_lake, segments, cache=True) as frames:
        assert spark.table("users").columns == ["user_id", "tier"]
        assert spark.table("orders").columns == ["user_id", "category"]
        assert spark.catalog.isCached("users") and spark.catalog.isCached("orders")
        assert not spark.catalog.isCached("events")
        assert len(frames) == 2
    assert spark.table("users").columns == lake.SCHEMAS["users"].names
    assert not any(spark.catalog.isCached(t) for t in ("users", "orders", "events"))
    pruned = batch.compute(spark, small_lake, segments, cache=True)
    whole = batch.compute(spark, small_lake, segments, cache=True, prune_columns=False)
    assert pruned == whole and all(pruned.values())
