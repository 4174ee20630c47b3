"""compute/merge.py: which segment queries are merged per view, and merged bitmaps equal to a
job per segment (as written) on a small lake, edge cases included."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from compute import batch, definitions, merge
from compute.definitions import EXAMPLE, DefinitionError
from tests.test_compute_batch import segment

pytestmark = pytest.mark.long  # minutes of Spark: scheduled first (tests/conftest.py)

BENCH20 = EXAMPLE.parent / "bench20.toml"
#: the seed of this module's `small_lake` (tests/spark_session.py)
LAKE_SEED = 13


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT user_id FROM users",
        "select `user_id` from users where tier = 'vip';",
        "SELECT DISTINCT user_id FROM orders WHERE category = 'books'",
        "SELECT user_id FROM orders GROUP BY user_id",
        "SELECT user_id FROM orders WHERE dt < DATE '2026-11-01' -- a comment: LIMIT 1\n"
        "GROUP BY user_id HAVING SUM(amount) > 10 AND abs(MAX(amount)) < 5",
        "SELECT user_id FROM users WHERE country = 'a JOIN b' OR tier = 'x(y'",
        "SELECT user_id FROM orders GROUP BY user_id HAVING count(distinct category) > 2",
    ],
)
def test_simple_shapes_are_merged(sql: str) -> None:
    assert merge.parse(sql) is not None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT u.user_id FROM users u",  # an alias
        "SELECT user_id FROM users u WHERE tier = 'vip'",
        "SELECT user_id FROM users JOIN orders USING (user_id)",
        "SELECT user_id FROM users, orders",
        "SELECT user_id FROM users WHERE user_id IN (SELECT user_id FROM orders)",
        "SELECT user_id FROM users LIMIT 10",
        "SELECT user_id FROM users ORDER BY user_id",
        "SELECT user_id FROM users UNION SELECT user_id FROM orders",
        "SELECT user_id FROM users WHERE rand() < 0.5",
        "SELECT user_id FROM orders GROUP BY user_id HAVING COUNT(DISTINCT category, dt) > 2",
        "SELECT user_id FROM orders GROUP BY user_id HAVING COUNT(DISTINCT lower(category)) > 2",
        "SELECT user_id FROM orders GROUP BY user_id HAVING SUM(DISTINCT amount) > 2",
        "SELECT user_id FROM orders WHERE COUNT(DISTINCT category) > 2 GROUP BY user_id",
        "SELECT user_id FROM orders GROUP BY user_id HAVING percentile(amount, 0.5) > 2",
        "SELECT user_id FROM orders GROUP BY user_id HAVING COUNT(*) FILTER (WHERE 1=1) > 2",
        "SELECT user_id FROM orders GROUP BY user_id, category",
        "SELECT user_id FROM orders HAVING COUNT(*) > 1",
        "SELECT DISTINCT user_id FROM orders GROUP BY user_id",
        "SELECT user_id AS user_id FROM users",
        "SELECT user_id FROM users WHERE (tier = 'vip'",
        "WITH x AS (SELECT user_id FROM users) SELECT user_id FROM x",
        "SELECT user_id FROM `users`",
    ],
)
def test_other_queries_run_as_written(sql: str) -> None:
    assert merge.parse(sql) is None


JOIN = "SELECT u.user_id FROM users u LEFT {} JOIN orders o ON o.user_id = u.user_id"


@pytest.mark.parametrize(
    "sql",
    [
        JOIN.format("SEMI"),
        JOIN.format("ANTI") + " AND o.category = 'books' WHERE u.tier = 'vip'",
        "select user_id from users left anti join orders on users.user_id = orders.user_id "
        "and (orders.amount > 5 or orders.category = 'x');",
        "SELECT u.user_id FROM users AS u LEFT SEMI JOIN events AS e "
        "ON u.user_id = e.user_id AND e.dt >= DATE '2026-10-01' WHERE u.country IN ('DE')",
    ],
)
def test_semi_and_anti_joins_are_merged(sql: str) -> None:
    assert merge.parse_join(sql) is not None


@pytest.mark.parametrize(
    "sql",
    [
        JOIN.format("SEMI") + " AND o.ts >= u.signup_date",  # both sides in ON
        JOIN.format("SEMI") + " AND o.amount > 5 OR o.category = 'x'",  # a top-level OR
        JOIN.format("SEMI") + " AND o.amount > (SELECT 1)",
        JOIN.format("SEMI") + " WHERE u.tier IN (SELECT tier FROM users)",
        JOIN.format("SEMI") + " WHERE o.amount > 5",
        JOIN.format("SEMI") + " GROUP BY u.user_id",
        JOIN.format("SEMI") + " LEFT SEMI JOIN events e ON e.user_id = u.user_id",
        JOIN.format("SEMI") + " LIMIT 5",
        JOIN.format("SEMI") + " AND o.order_id = u.user_id",
        JOIN.format("OUTER"),
        "SELECT u.user_id FROM users u JOIN orders o ON o.user_id = u.user_id",
        "SELECT u.user_id FROM users u LEFT SEMI JOIN orders o ON o.order_id = u.user_id",
        "SELECT o.user_id FROM users u LEFT SEMI JOIN orders o ON o.user_id = u.user_id",
        "SELECT u.user_id FROM users u LEFT SEMI JOIN orders u ON u.user_id = u.user_id",
        "SELECT u.user_id FROM users u LEFT SEMI JOIN orders o ON o.user_id = u.user_id "
        "AND rand() < 0.5",
    ],
)
def test_other_joins_run_as_written(sql: str) -> None:
    assert merge.parse_join(sql) is None


VIP = "SELECT user_id FROM users WHERE tier = 'vip'"
BOOKS = "SELECT user_id FROM orders WHERE category = 'books' GROUP BY user_id"
VIEWERS = "SELECT user_id FROM events WHERE type = 'view' GROUP BY user_id HAVING COUNT(*) > 2"


@pytest.mark.parametrize(
    ("sql", "shape"),
    [
        (f"{BOOKS} EXCEPT {VIP}", "(o - u)"),
        (f"{BOOKS}\nMINUS DISTINCT\n{VIP};", "(o - u)"),
        (f"{VIP} UNION ALL {BOOKS} union {VIEWERS}", "((u | o) | e)"),
        (f"{VIP} UNION {BOOKS} EXCEPT {VIEWERS}", "((u | o) - e)"),
        (f"{VIP} INTERSECT ALL {BOOKS} INTERSECT {VIEWERS}", "((u & o) & e)"),
        (f"({VIP}) EXCEPT ({BOOKS} UNION ({VIEWERS}))", "(u - (o | (e)))"),
        (f"{VIP} EXCEPT (({BOOKS} INTERSECT {VIEWERS}))", "(u - (o & e))"),
        (f"(({VIP}) UNION {BOOKS})", "(u | o)"),
        (
            "SELECT DISTINCT user_id FROM users -- UNION ALL\nEXCEPT SELECT user_id FROM orders "
            "GROUP BY user_id HAVING COUNT(DISTINCT category) > 1",
            "(u - o)",
        ),
    ],
)
def test_set_operations_are_merged(sql: str, shape: str) -> None:
    def drawn(node: merge.SetOp | merge.Simple) -> str:
        if isinstance(node, merge.Simple):
            return node.view[0]
        return f"({drawn(node.left)} {node.op} {drawn(node.right)})"

    op = merge.parse_set(sql)
    assert op is not None
    assert drawn(op) == shape.replace("(e)", "e")
    assert all(isinstance(leaf, merge.Simple) for leaf in op.leaves())


@pytest.mark.parametrize(
    "sql",
    [
        VIP,  # no set operation
        f"{BOOKS} EXCEPT ALL {VIP}",  # a multiset difference
        f"{BOOKS} MINUS ALL {VIP}",
        f"{VIP} UNION {BOOKS} INTERSECT {VIEWERS}",  # INTERSECT binds tighter
        f"{VIP} UNION {BOOKS} ORDER BY user_id",
        f"{VIP} UNION {BOOKS} LIMIT 10",
        f"{VIP} UNION",
        f"UNION {VIP}",
        f"{VIP} UNION UNION {BOOKS}",
        f"{VIP} UNION ALL",
        f"{VIP} UNION {JOIN.format('SEMI')}",  # an operand that is no shape
        f"{VIP} UNION SELECT user_id, tier FROM users",
        f"{VIP} UNION (SELECT user_id FROM users) LIMIT 3",
        f"({VIP}) LIMIT 3 UNION {BOOKS}",
        f"({VIP})",
        f"({VIP}) UNION {BOOKS})",
        f"WITH v AS ({VIP}) SELECT user_id FROM v UNION {BOOKS}",
        f"SELECT user_id FROM users WHERE `union` = 1 AND tier = 'x' OR {BOOKS[7:]}",
        f"{VIP} UNION SELECT user_id FROM users WHERE tier IN ({VIP})",
    ],
)
def test_other_set_operations_run_as_written(sql: str) -> None:
    assert merge.parse_set(sql) is None


_LEAVES = (VIP, BOOKS, VIEWERS, "SELECT DISTINCT user_id FROM orders WHERE amount > 5")
_WRITTEN = {"|": ("UNION", "union all", "UNION DISTINCT"), "-": ("EXCEPT", "minus",
            "EXCEPT DISTINCT"), "&": ("INTERSECT", "intersect all")}  # fmt: skip


def _trees() -> st.SearchStrategy:
    leaves = st.sampled_from(range(len(_LEAVES)))
    return st.recursive(
        leaves, lambda kids: st.tuples(st.sampled_from("|-&"), kids, kids), max_leaves=6
    )


def _written(tree, draw_bool) -> str:  # noqa: ANN001
    """SQL of the tree: parentheses where precedence needs them (a right operand that is a set
    operation, an operand whose operator binds differently), and at random elsewhere."""
    if isinstance(tree, int):
        return f"({_LEAVES[tree]})" if draw_bool() else _LEAVES[tree]
    op, left, right = tree

    def side(node, needs: bool) -> str:  # noqa: ANN001
        text = _written(node, draw_bool)
        return f"({text})" if needs or (not isinstance(node, int) and draw_bool()) else text

    def binds(node) -> bool:  # noqa: ANN001
        return not isinstance(node, int) and (node[0] == "&") != (op == "&")

    words = _WRITTEN[op][draw_bool() + draw_bool() * (len(_WRITTEN[op]) > 2)]
    return f"{side(left, binds(left))}\n{words} {side(right, not isinstance(right, int))}"


@given(tree=_trees(), data=st.data())
@settings(max_examples=200, deadline=None)
def test_set_operations_parse_as_written(tree, data) -> None:  # noqa: ANN001
    """Random trees of UNION/EXCEPT/INTERSECT over segment shapes, written with the operators'
    spellings and optional parentheses, parse back to the same tree."""
    sql = _written(tree, lambda: data.draw(st.booleans()))

    def expected(node):  # noqa: ANN001, ANN202
        if isinstance(node, int):
            return merge.parse(_LEAVES[node])
        return merge.SetOp(node[0], expected(node[1]), expected(node[2]))

    if isinstance(tree, int):
        assert merge.parse_set(sql) is None
    else:
        assert merge.parse_set(sql) == expected(tree), sql


EDGES = (
    segment("nobody", "SELECT user_id FROM users WHERE tier = 'no such tier'")
    + segment("vip", "SELECT user_id FROM users WHERE tier = 'vip'")
    + segment("everyone", "SELECT user_id FROM users")
    + segment("null_where", "SELECT user_id FROM users WHERE CAST(NULL AS BOOLEAN)")
    + segment("few_orders", "SELECT user_id FROM orders GROUP BY user_id HAVING COUNT(*) < 3")
    + segment(
        "few_books",  # HAVING true for a group with no book row: the guard keeps it out
        "SELECT user_id FROM orders WHERE category = 'books' GROUP BY user_id HAVING COUNT(*) < 2",
    )
    + segment(
        "no_big_order",
        "SELECT user_id FROM orders GROUP BY user_id HAVING MAX(amount) > 1e12",
    )
    + segment(
        "three_categories",
        "SELECT user_id FROM orders WHERE category <> 'books' GROUP BY user_id "
        "HAVING COUNT(DISTINCT category) >= 3 AND COUNT(*) < 8",
    )
    + segment("electronics", "SELECT DISTINCT user_id FROM orders WHERE category = 'electronics'")
    + segment(
        "ordered_vip",  # two tables joined: runs as written
        "SELECT u.user_id FROM users u JOIN orders o ON o.user_id = u.user_id WHERE u.tier = 'vip'",
    )
    + segment("viewers", "SELECT user_id FROM events WHERE type = 'view' GROUP BY user_id")
    + segment("vip_books", JOIN.format("SEMI") + " AND o.category = 'books' WHERE u.tier = 'vip'")
    + segment("no_books", JOIN.format("ANTI") + " AND o.category = 'books'")
    + segment(
        "no_events",
        "SELECT u.user_id FROM users u LEFT ANTI JOIN events e ON e.user_id = u.user_id",
    )  # fmt: skip
    + segment("null_on_semi", JOIN.format("SEMI") + " AND CAST(NULL AS BOOLEAN)")
    + segment("null_on_anti", JOIN.format("ANTI") + " AND CAST(NULL AS BOOLEAN)")
    + segment("null_where_anti", JOIN.format("ANTI") + " WHERE CAST(NULL AS BOOLEAN)")
    + segment(
        "big_order",  # no aliases, the key equality the other way round
        "SELECT user_id FROM users LEFT SEMI JOIN orders "
        "ON users.user_id = orders.user_id AND orders.amount > 500",
    )
    + segment(
        "ordered_after_signup",  # both sides in ON: as written
        JOIN.format("SEMI") + " AND o.ts >= CAST(u.signup_date AS TIMESTAMP)",
    )
    + segment("books_not_vip", f"{BOOKS} EXCEPT {VIP}")
    + segment("vip_or_viewers", f"{VIP} UNION ALL {VIEWERS}")
    + segment("vip_viewers", f"{VIEWERS} INTERSECT {VIP}")
    + segment("nested", f"({VIP} UNION {BOOKS}) EXCEPT ({VIEWERS} INTERSECT {BOOKS})")
    + segment(  # two rows of a user on the left and one on the right: a member, as written
        "except_all",
        "SELECT user_id FROM orders WHERE category = 'books' EXCEPT ALL "
        "SELECT DISTINCT user_id FROM orders WHERE category = 'books'",
    )
    + segment("empty_minus", f"{VIP} MINUS SELECT user_id FROM users")
)


@pytest.mark.spark
@pytest.mark.parametrize("defs", [EXAMPLE, BENCH20, None], ids=["example", "bench20", "edges"])
def test_merged_equals_a_job_per_segment(spark, small_lake: Path, defs: Path | None) -> None:
    segments = definitions.parse(EDGES) if defs is None else batch.load_segments(small_lake, defs)
    merged = batch.compute(spark, small_lake, segments, cache=False, merged=True)
    each = batch.compute(spark, small_lake, segments, one_pass=False)
    assert list(merged) == list(each) == [s.name for s in segments]
    assert merged == each
    assert merged == batch.compute(spark, small_lake, segments, merged=True)  # over the cache
    if defs is None:
        assert len(merged["nobody"]) == len(merged["null_where"]) == 0
        assert len(merged["no_big_order"]) == 0
        assert 0 < len(merged["few_books"]) < len(merged["everyone"])
        assert all(len(merged[n]) for n in ("vip", "few_orders", "ordered_vip", "viewers"))
        assert len(merged["null_on_semi"]) == len(merged["null_where_anti"]) == 0
        assert merged["null_on_anti"] == merged["everyone"]
        assert 0 < len(merged["no_books"]) < len(merged["everyone"])
        assert 0 < len(merged["three_categories"]) < len(merged["few_orders"])
        assert all(len(merged[n]) for n in ("vip_books", "no_events", "big_order"))
        assert 0 < len(merged["books_not_vip"]) < len(merged["everyone"])
        assert merged["vip"] < merged["vip_or_viewers"] and merged["vip_viewers"] < merged["vip"]
        assert merged["vip_viewers"]
        assert merged["nested"] and merged["except_all"] and not merged["empty_minus"]


@pytest.mark.spark
def test_merged_sources_cover_every_segment_once(spark, small_lake: Path) -> None:
    segments = definitions.parse(EDGES)
    batch.register_views(spark, small_lake)
    frames = [batch.analyze(spark, s) for s in segments]
    plan = merge.plan(segments, frames)
    names = {s.name for s in segments}
    assert [tuple(n for n in s.segments if n in names) for s in plan.sources] == [
        ("nobody", "vip", "everyone", "null_where"),  # + the joins' WHERE columns
        ("few_orders", "few_books", "no_big_order", "three_categories", "electronics"),
        ("ordered_vip",),
        ("viewers",),  # + no_events's ON column (alone on its view, it would run as written)
        ("ordered_after_signup",),
        ("except_all",),  # + the set operations' operands in the merged queries above
    ]
    joins = ["vip_books", "no_books", "no_events", "null_on_semi", "null_on_anti"]
    set_ops = ["books_not_vip", "vip_or_viewers", "vip_viewers", "nested", "empty_minus"]
    assert list(plan.derived) == [*joins, "null_where_anti", "big_order", *set_ops]
    assert len({plan.derived[n].left for n in joins[1:]}) == 1, "one WHERE bitmap per condition"
    vip = plan.derived["books_not_vip"].right
    assert vip == plan.derived["vip_or_viewers"].left == plan.derived["vip_viewers"].right
    assert plan.derived["nested"].op == "-" and plan.derived["empty_minus"].left == vip


@pytest.mark.spark
def test_a_bad_id_in_a_merged_query_names_its_segment(spark, small_lake: Path) -> None:
    spark.sql("CREATE OR REPLACE TEMP VIEW signed AS SELECT -user_id AS user_id, tier FROM users")
    segments = definitions.parse(
        segment("fine", "SELECT user_id FROM signed WHERE tier = 'no such tier'")
        + segment("neg", "SELECT user_id FROM signed WHERE tier = 'vip'")
    )
    with pytest.raises(DefinitionError, match="segment 'neg': user_id must be >= 0"):
        batch.compute(spark, small_lake, segments, cache=False)


@pytest.mark.spark
def test_a_merged_query_that_fails_where_the_queries_would_not_falls_back(
    spark, small_lake: Path
) -> None:
    segments = definitions.parse(
        # as written, its dt filter prunes every partition: the division never runs
        segment(
            "pruned",
            "SELECT user_id FROM orders WHERE 1 / (amount - amount) > 0 "
            "AND dt = DATE '1999-01-01' GROUP BY user_id",
        )
        + segment("books", "SELECT user_id FROM orders WHERE category = 'books' GROUP BY user_id")
    )
    batch.register_views(spark, small_lake)
    frames = [batch.analyze(spark, s) for s in segments]
    assert len(merge.sources(segments, frames)) == 1
    levels = _failure_log_levels(spark)
    found = batch.compute(spark, small_lake, segments)
    assert found == batch.compute(spark, small_lake, segments, one_pass=False)
    assert not found["pruned"] and found["books"]
    assert _failure_log_levels(spark) == levels, "the failed pass's loggers log again"
    (bad,) = definitions.parse(segment("bad", "SELECT nope AS user_id FROM users"))
    with pytest.raises(DefinitionError, match="UNRESOLVED_COLUMN"):
        batch.analyze(spark, bad)  # pyspark's error loggers still take its calls


@pytest.mark.spark
def test_quieting_the_error_loggers_first_leaves_pyspark_s_own_logger_class(spark) -> None:
    """pyspark calls its error loggers with its own keywords: a plain Logger made first under
    their names would raise TypeError at the next SQL error."""
    import logging

    from pyspark.logger import PySparkLogger

    from compute.spark import _PYSPARK_ERROR_LOGGERS, quiet_task_failures

    existing = logging.Logger.manager.loggerDict
    saved = {n: existing.pop(n) for n in _PYSPARK_ERROR_LOGGERS if n in existing}
    try:
        with quiet_task_failures(spark):
            pass
        assert all(isinstance(existing[n], PySparkLogger) for n in _PYSPARK_ERROR_LOGGERS)
        (bad,) = definitions.parse(segment("bad", "SELECT nope AS user_id FROM users"))
        with pytest.raises(DefinitionError, match="UNRESOLVED_COLUMN"):
            batch.analyze(spark, bad)
    finally:
        existing.update(saved)


def _failure_log_levels(spark) -> list[object]:
    """What compute.spark.quiet_task_failures turns off while the merged pass runs."""
    from pyspark.logger import PySparkLogger

    from compute.spark import _PYSPARK_ERROR_LOGGERS, _TASK_FAILURE_LOGGERS

    manager = spark.sparkContext._jvm.org.apache.logging.log4j.LogManager
    return [manager.getLogger(n).getLevel().toString() for n in _TASK_FAILURE_LOGGERS] + [
        PySparkLogger.getLogger(n).disabled for n in _PYSPARK_ERROR_LOGGERS
    ]


@pytest.mark.spark
def test_a_join_on_null_ids_equals_the_join_as_written(spark, small_lake: Path) -> None:
    batch.register_views(spark, small_lake)
    spark.sql(
        "CREATE OR REPLACE TEMP VIEW holes AS SELECT CASE WHEN amount > 50 THEN NULL "
        "ELSE user_id END AS user_id, category FROM orders"
    )
    segments = definitions.parse(
        segment(
            "some",
            "SELECT u.user_id FROM users u LEFT SEMI JOIN holes h "
            "ON h.user_id = u.user_id AND h.category = 'books'",
        )  # fmt: skip
        + segment(
            "none",
            "SELECT u.user_id FROM users u LEFT ANTI JOIN holes h "
            "ON h.user_id = u.user_id WHERE u.tier = 'vip'",
        )  # fmt: skip
    )
    frames = [batch.analyze(spark, s) for s in segments]
    plan = merge.plan(segments, frames)
    assert list(plan.derived) == ["some", "none"]
    assert not {"some", "none"} & {n for s in plan.sources for n in s.segments}
    # from the bitmaps alone: no join runs as written (`written` is what it would run)
    merged = merge.bitmaps(dataclasses.replace(plan, written={}), ["some", "none"])
    assert merged == batch.evaluate(segments, frames, one_pass=False)
    assert merged["some"] and merged["none"]


def _outcome(segments, frames, **options) -> dict | str:  # noqa: ANN001
    try:
        return batch.evaluate(segments, frames, **options)
    except DefinitionError as e:
        return str(e)


@pytest.mark.spark
def test_joins_over_null_and_negative_ids_answer_as_the_sql_does(spark, small_lake: Path) -> None:
    """W & J and W - J give the joins' answers, errors included, with NULL and negative ids
    on either side: from the bitmaps when the left ids are valid, else the join as written."""
    batch.register_views(spark, small_lake)
    spark.sql(  # NULL and negative ids on the right; no valid left id is negative
        "CREATE OR REPLACE TEMP VIEW righty AS SELECT CASE WHEN amount > 60 THEN NULL "
        "WHEN amount > 40 THEN -(user_id % 1000) - 1 ELSE user_id END AS user_id, category "
        "FROM orders"
    )
    spark.sql(  # NULL ids, negative ones absent from righty, and negative ones it has
        "CREATE OR REPLACE TEMP VIEW lefty AS SELECT CASE WHEN user_id % 11 = 0 THEN NULL "
        "WHEN user_id % 13 = 0 THEN -user_id WHEN user_id % 17 = 0 THEN -(user_id % 1000) - 1 "
        "ELSE user_id END AS user_id, tier FROM users"
    )
    on = " r ON r.user_id = l.user_id"
    valid_left = definitions.parse(
        segment("semi", f"SELECT l.user_id FROM users l LEFT SEMI JOIN righty{on}")
        + segment("anti", f"SELECT l.user_id FROM users l LEFT ANTI JOIN righty{on}")
        + segment(
            "anti_books",
            f"SELECT l.user_id FROM users l LEFT ANTI JOIN righty{on} AND r.category = 'books' "
            "WHERE l.tier <> 'basic'",
        )
    )
    frames = [batch.analyze(spark, s) for s in valid_left]
    plan = merge.plan(valid_left, frames)
    assert list(plan.derived) == ["semi", "anti", "anti_books"]
    found = merge.bitmaps(dataclasses.replace(plan, written={}), list(plan.derived))
    assert found == batch.evaluate(valid_left, frames, one_pass=False)
    assert all(found.values())
    kept = " WHERE l.user_id IS NULL OR l.user_id > 0"
    cases = [  # (segment, what the SQL gives)
        # NULL left ids match nothing, nor do the negative ones righty lacks
        (f"SELECT l.user_id FROM lefty l LEFT SEMI JOIN righty{on}{kept} OR l.user_id < -1e7",
         dict),
        (f"SELECT l.user_id FROM lefty l LEFT SEMI JOIN righty{on}", "must be >= 0"),
        (f"SELECT l.user_id FROM lefty l LEFT ANTI JOIN righty{on} WHERE l.user_id > 0", dict),
        (f"SELECT l.user_id FROM lefty l LEFT ANTI JOIN righty{on}{kept}", "is null"),
        (f"SELECT l.user_id FROM lefty l LEFT ANTI JOIN righty{on} AND r.user_id > 0 "
         "WHERE l.user_id < -1e7", "must be >= 0"),
    ]  # fmt: skip
    for sql, expected in cases:
        segments = definitions.parse(
            segment("first", "SELECT user_id FROM users WHERE tier = 'vip'") + segment("join", sql)
        )
        frames = [batch.analyze(spark, s) for s in segments]
        assert list(merge.plan(segments, frames).derived) == ["join"]
        merged = _outcome(segments, frames)
        assert merged == _outcome(segments, frames, one_pass=False), sql
        if expected is dict:
            assert isinstance(merged, dict) and merged["join"], sql
        else:
            assert isinstance(merged, str) and "segment 'join'" in merged, sql
            assert expected in merged, sql


@pytest.mark.spark
def test_set_operations_over_null_and_negative_ids_answer_as_the_sql_does(
    spark, small_lake: Path
) -> None:
    """A set operation from its operands' bitmaps when every operand holds valid ids, else as
    written, which decides (a set operation takes NULLs as equal)."""
    batch.register_views(spark, small_lake)
    spark.sql(  # NULL and negative ids
        "CREATE OR REPLACE TEMP VIEW odd AS SELECT CASE WHEN user_id % 11 = 0 THEN NULL "
        "WHEN user_id % 13 = 0 THEN -user_id ELSE user_id END AS user_id, tier FROM users"
    )
    nulls = "SELECT user_id FROM odd WHERE user_id IS NULL"
    negative = "SELECT user_id FROM odd WHERE user_id < 0"
    cases = [  # (segment, what the SQL gives)
        (f"{VIP} EXCEPT SELECT user_id FROM odd", dict),  # the odd ids remove nothing valid
        (f"SELECT user_id FROM odd INTERSECT {VIP}", dict),
        (f"{nulls} EXCEPT {nulls}", dict),  # NULL equals NULL: nobody
        (f"{VIP} UNION {nulls} EXCEPT {nulls}", dict),
        (f"{VIP} UNION SELECT user_id FROM odd", "is null"),
        (f"{VIP} UNION ALL {negative}", "must be >= 0"),
        (f"{nulls} EXCEPT {VIP}", "is null"),
    ]
    for sql, expected in cases:
        segments = definitions.parse(
            segment("first", "SELECT user_id FROM users WHERE tier = 'basic'")
            + segment("set_op", sql)
        )
        frames = [batch.analyze(spark, s) for s in segments]
        assert list(merge.plan(segments, frames).derived) == ["set_op"], sql
        merged = _outcome(segments, frames)
        assert merged == _outcome(segments, frames, one_pass=False), sql
        if expected is dict:
            assert isinstance(merged, dict), sql
        else:
            assert isinstance(merged, str) and "segment 'set_op'" in merged, sql
            assert expected in merged, sql
    # valid operands: from the bitmaps alone (`written` is what would run otherwise)
    segments = definitions.parse(
        segment("a", f"{VIP} EXCEPT {BOOKS}") + segment("b", f"{BOOKS} INTERSECT {VIEWERS}")
    )
    frames = [batch.analyze(spark, s) for s in segments]
    plan = merge.plan(segments, frames)
    found = merge.bitmaps(dataclasses.replace(plan, written={}), ["a", "b"])
    assert found == batch.evaluate(segments, frames, one_pass=False)
    assert found["a"] and found["b"]


@pytest.mark.spark
def test_a_join_query_that_does_not_analyze_runs_its_joins_as_written(
    spark, small_lake: Path
) -> None:
    batch.register_views(spark, small_lake)
    segments = definitions.parse(  # an unqualified column of users in ON: as written
        segment("odd", JOIN.format("SEMI") + " AND tier = 'vip'")
        + segment("books", "SELECT user_id FROM orders WHERE category = 'books' GROUP BY user_id")
        + segment("few", "SELECT user_id FROM orders GROUP BY user_id HAVING COUNT(*) < 3")
    )
    frames = [batch.analyze(spark, s) for s in segments]
    sources = merge.sources(segments, frames)
    assert [s.segments for s in sources] == [("odd",), ("books", "few")]
    assert batch.evaluate(segments, frames) == batch.evaluate(segments, frames, one_pass=False)


@pytest.mark.spark
def test_count_distinct_of_a_double_runs_as_written(spark, small_lake: Path) -> None:
    batch.register_views(spark, small_lake)
    spark.sql(
        "CREATE OR REPLACE TEMP VIEW floats AS SELECT user_id, "
        "CASE WHEN amount > 50 THEN 0.0D ELSE -0.0D END AS x FROM orders"
    )
    segments = definitions.parse(
        segment("one_x", "SELECT user_id FROM floats GROUP BY user_id HAVING COUNT(DISTINCT x) = 1")
        + segment("any", "SELECT user_id FROM floats GROUP BY user_id")
        + segment("also", "SELECT user_id FROM floats WHERE x < 0 GROUP BY user_id")
    )
    frames = [batch.analyze(spark, s) for s in segments]
    sources = merge.sources(segments, frames)
    assert [s.segments for s in sources] == [("one_x",), ("any", "also")]
    found = batch.evaluate(segments, frames)
    assert found == batch.evaluate(segments, frames, one_pass=False)
    assert found["one_x"] == found["any"]  # -0.0 and 0.0 counted as one value


@pytest.mark.spark
def test_count_distinct_as_a_bitmask_answers_as_the_sql_does(spark, small_lake: Path) -> None:
    """COUNT(DISTINCT c) of a string or integer column with at most 63 distinct values is a
    bitmask (`merge.bitmasked`), of one with more size(collect_set(c)); both give the SQL's
    answer with NULLs, groups whose values are all NULL, FILTERs and values at the boundary."""
    batch.register_views(spark, small_lake)
    spark.sql(
        "CREATE OR REPLACE TEMP VIEW mixed AS SELECT user_id, amount, "
        "CASE WHEN user_id % 7 = 0 OR amount > 80 THEN NULL "
        "WHEN amount > 60 THEN concat(category, ' ''é\\\\') ELSE category END AS cat, "
        "CASE WHEN user_id % 5 = 0 THEN NULL "
        "ELSE CAST(CAST(amount * 100 AS BIGINT) % 63 - 31 AS INT) END AS n63, "
        "CAST(amount * 100 AS BIGINT) % 64 AS n64, "
        "CASE WHEN amount > 90 THEN NULL ELSE CAST(amount * 100 AS BIGINT) END AS many "
        "FROM orders"
    )
    grouped = "SELECT user_id FROM mixed {} GROUP BY user_id HAVING {}"
    cases = {  # name: (WHERE, HAVING)
        "no_cat": ("", "COUNT(DISTINCT cat) = 0"),  # every value NULL (user_id % 7 = 0)
        "two_cats": ("WHERE amount > 20", "COUNT(DISTINCT cat) >= 2"),
        "cat_nobody": ("WHERE amount < 0", "COUNT(DISTINCT cat) = 0"),  # no row: no group
        "three_n63": ("", "COUNT(DISTINCT n63) = 3 OR COUNT(DISTINCT n63) = 0"),
        "three_n64": ("", "COUNT(DISTINCT n64) = 3"),
        "mixed": ("WHERE amount > 10", "COUNT(DISTINCT many) > 2 AND COUNT(DISTINCT cat) < 2"),
        "plain": ("", "COUNT(*) > 2"),
    }
    segments = definitions.parse(
        "".join(segment(n, grouped.format(w, h)) for n, (w, h) in cases.items())
    )
    counted = {s.name: merge._rewritten(spark, merge.parse(s.sql)) for s in segments}
    having = {n: "".join(s.having or ()) for n, s in counted.items()}
    for name in ("no_cat", "two_cats", "cat_nobody", "three_n63"):
        assert "bit_or" in having[name] and "collect_set" not in having[name], name
    assert "collect_set(n64)" in having["three_n64"]  # 64 values
    assert len(merge._listed(spark, merge.parse(segments[3].sql), "n63") or ()) == 63
    assert "collect_set(many)" in having["mixed"] and "bit_or" in having["mixed"]
    frames = [batch.analyze(spark, s) for s in segments]
    assert [s.segments for s in merge.sources(segments, frames)] == [tuple(cases)]
    found = batch.evaluate(segments, frames)
    assert found == batch.evaluate(segments, frames, one_pass=False)
    assert all(found[n] for n in cases if n != "cat_nobody") and not found["cat_nobody"]


@pytest.mark.spark
def test_decimal_sums_and_averages_as_bigints_answer_as_the_sql_does(
    spark, small_lake: Path
) -> None:
    """SUM of a decimal(p, s) with 8 < p and p + s + 2 <= 18, and AVG with 11 < p, come from a
    BIGINT sum of unscaled values (`merge.exact_sums`), with the type and value of the SUM or
    AVG: thresholds met exactly, an average rounded to its scale, division by a count, CASE
    and FILTER, NULL sums and averages, negative values, scales 0 and 4, an AVG beside a
    COUNT(DISTINCT) bitmask and a SUM; wider and narrower decimals as written; a BIGINT sum
    that overflows where the decimal one does not falls back to the queries as written; a
    session without ANSI keeps SUM as written."""
    batch.register_views(spark, small_lake)
    spark.sql(  # one user with every order of the lake, each near the decimal(16,0) limit
        "CREATE OR REPLACE TEMP VIEW huge AS SELECT 7L AS user_id, "
        "CAST(9999999999999999 AS DECIMAL(16, 0)) AS big FROM orders"
    )
    assert spark.table("huge").count() * 9999999999999999 > 2**63, "enough rows to overflow"
    # a sum some user has exactly: `>=` at the boundary
    (exact,) = spark.sql(
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY s) FROM "
        "(SELECT SUM(amount) AS s FROM orders GROUP BY user_id)"
    ).first()
    (median_avg,) = spark.sql(
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY a) FROM "
        "(SELECT AVG(amount) AS a FROM orders GROUP BY user_id)"
    ).first()
    (rounded,) = spark.sql(  # an average rounded to its 6 decimals
        "SELECT AVG(amount) FROM orders GROUP BY user_id "
        "HAVING COUNT(*) = 3 AND CAST(SUM(amount) * 100 AS BIGINT) % 3 <> 0 LIMIT 1"
    ).first()
    grouped = "SELECT user_id FROM orders GROUP BY user_id HAVING {}"
    cases = {  # name: (HAVING, summed as BIGINTs)
        "exact": (f"SUM(amount) >= {exact}", True),
        "ratio": ("SUM(amount) / COUNT(*) > 37.5", True),
        "case": (
            "SUM(CASE WHEN category = 'books' THEN amount ELSE 0 END) >= 20 "
            "AND SUM(CASE WHEN category <> 'books' THEN amount ELSE 0 END) < 150",
            True,
        ),
        "nulls": ("SUM(CASE WHEN amount > 50 THEN amount END) IS NULL", True),
        "negative": ("sum ( amount - 50 ) < -20", True),
        "scale0": ("SUM(CAST(amount AS DECIMAL(12, 0))) > 100", True),
        "scale4": ("SUM(CAST(amount / 3 AS DECIMAL(12, 4))) > 60", True),
        "wide": ("SUM(CAST(amount AS DECIMAL(20, 2))) > 100", False),
        "narrow": ("SUM(CAST(amount AS DECIMAL(8, 2))) > 100", False),
        "double": ("SUM(CAST(amount AS DOUBLE)) > 100", False),
        "buyers": ("COUNT(*) > 0", False),
        "avg": (f"AVG(amount) >= {median_avg}", True),
        "avg_rounded": (f"AVG(amount) = {rounded}", True),
        "avg_null": ("avg(CASE WHEN amount > 50 THEN amount END) IS NULL", True),
        "avg_spark_own": ("AVG(CAST(amount AS DECIMAL(11, 2))) > 40", False),
        "mean_and_more": (
            "mean(amount) > 20 AND COUNT(DISTINCT category) >= 2 AND SUM(amount) < 150",
            True,
        ),
    }
    text = "".join(segment(n, grouped.format(h)) for n, (h, _) in cases.items())
    segments = definitions.parse(text)
    summed = {s.name: merge._rewritten(spark, merge.parse(s.sql)) for s in segments}
    for name, (_, rewritten) in cases.items():
        assert ("AS BIGINT" in "".join(summed[name].having or ())) is rewritten, name
    mixed = "".join(summed["mean_and_more"].having or ())
    assert mixed.count("AS BIGINT") == 2 and "bit_or" in mixed and "try_divide" in mixed
    frames = [batch.analyze(spark, s) for s in segments]
    assert [s.segments for s in merge.sources(segments, frames)] == [tuple(cases)]
    found = batch.evaluate(segments, frames)
    assert found == batch.evaluate(segments, frames, one_pass=False)
    assert all(0 < len(found[n]) < len(found["buyers"]) for n in cases if n != "buyers"), found

    overflow = definitions.parse(
        segment("big", "SELECT user_id FROM huge GROUP BY user_id HAVING SUM(big) > 0")
        + segment("many", "SELECT user_id FROM huge GROUP BY user_id HAVING COUNT(*) > 1")
    )
    assert "AS BIGINT" in "".join(merge._rewritten(spark, merge.parse(overflow[0].sql)).having)
    frames = [batch.analyze(spark, s) for s in overflow]
    assert len(merge.sources(overflow, frames)) == 1
    assert batch.evaluate(overflow, frames) == {"big": BitMap64([7]), "many": BitMap64([7])}

    spark.conf.set("spark.sql.ansi.enabled", "false")
    try:
        plain = merge._rewritten(spark, merge.parse(segments[0].sql))
    finally:
        spark.conf.set("spark.sql.ansi.enabled", "true")
    assert "BIGINT" not in "".join(plain.having or ())
