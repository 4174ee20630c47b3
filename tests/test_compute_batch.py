"""compute: gen-data, segment definitions, batch segments with Spark, the segment-set writer.

The Spark tests share one SparkSession (start-up costs ~10 s) and one 20k-user lake; every
example segment is compared exactly with tests/truth.py, which computes it without Spark.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroaring import BitMap64

from compute import batch, cli, definitions, lake
from compute.bitmaps import MASK_BITS, Source, is_local, segment_bitmap, source_results
from compute.definitions import DefinitionError
from compute.fsutil import OutputError
from compute.segment_set import write_segment_set
from tests.spark_session import spark_session
from tests.truth import truth_from_lake

USERS = 20_000
SEED = 7
EXAMPLE = definitions.EXAMPLE


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lake20k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lake") / "lake"
    lake.generate(out, lake.LakeParams(users=USERS, seed=SEED), progress=lambda line: None)
    return out


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    yield from spark_session("seg-compute-tests")


@pytest.fixture(scope="module")
def batch_out(spark, lake20k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("segments") / "set"
    segments = batch.load_segments(lake20k, EXAMPLE)
    batch.run_batch(spark, lake20k, segments, out)
    return out


def read_set(path: Path) -> tuple[dict, dict[str, BitMap64]]:
    manifest = json.loads((path / "manifest.json").read_text())
    bitmaps = {
        name: BitMap64.deserialize((path / entry["file"]).read_bytes())
        for name, entry in manifest["segments"].items()
    }
    return manifest, bitmaps


def write_defs(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "defs.toml"
    path.write_text(text)
    return path


def segment(name: str, sql: str) -> str:
    return f'[[segment]]\nname = "{name}"\nsql = """{sql}"""\n'


def test_the_local_driver_jvm_runs_with_the_lean_jit(spark) -> None:
    from compute.spark import LEAN_JIT

    jvm = spark.sparkContext._jvm
    diagnostic = jvm.java.lang.management.ManagementFactory.getPlatformMXBean(
        jvm.java.lang.Class.forName("com.sun.management.HotSpotDiagnosticMXBean")
    )
    for option in LEAN_JIT.split():
        name, value = option.removeprefix("-XX:").split("=")
        assert diagnostic.getVMOption(name).getValue() == value, option


# ---------------------------------------------------------------- gen-data


def test_lake_tables_and_ids(lake20k: Path) -> None:
    meta = json.loads((lake20k / "_lake.json").read_text())
    assert meta["seed"] == SEED and meta["users"] == USERS and meta["as_of"] == "2026-11-01"
    users = ds.dataset(lake20k / "users").to_table()
    ids = users["user_id"].to_numpy()
    assert len(ids) == USERS == len(set(ids.tolist()))
    assert ids.min() >= 0 and ids.max() < 2**63
    assert set(ids.tolist()) != set(range(USERS))
    assert 50 < (ids > 2**40).sum() < 0.02 * USERS, "a few 64-bit ids"
    assert (ids > 2**62).sum() >= 2
    counts = pc.value_counts(users["tier"]).to_pylist()
    tiers = {c["values"]: c["counts"] for c in counts}
    assert tiers["basic"] > tiers["silver"] > tiers["gold"] > tiers["vip"] > 0
    as_of = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    for table in ("orders", "events"):
        data = ds.dataset(lake20k / table, partitioning="hive").to_table()
        assert data.num_rows > USERS
        assert set(data["user_id"].to_numpy().tolist()) <= set(ids.tolist())
        ts = data["ts"].to_pylist()
        assert min(ts) >= as_of - dt.timedelta(days=meta["days"]) and max(ts) < as_of
        day = pc.strftime(data["ts"], format="%Y-%m-%d")
        assert pc.all(pc.equal(day, data["dt"].cast(pa.string()))).as_py(), "dt matches ts"
    orders = ds.dataset(lake20k / "orders", partitioning="hive").to_table()
    assert len(set(orders["order_id"].to_pylist())) == orders.num_rows
    assert orders.schema.field("amount").type == pa.decimal128(12, 2)


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_gen_data_is_deterministic(tmp_path: Path) -> None:
    params = lake.LakeParams(users=3000, seed=11, days=20)
    quiet = lambda line: None  # noqa: E731
    lake.generate(tmp_path / "a", params, quiet)
    lake.generate(tmp_path / "b", params, quiet)
    lake.generate(tmp_path / "c", lake.LakeParams(users=3000, seed=12, days=20), quiet)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    # Replacing an existing lake leaves exactly the new one (no stale partitions).
    lake.generate(tmp_path / "a", lake.LakeParams(users=3000, seed=11, days=5), quiet)
    assert len(list((tmp_path / "a" / "orders").iterdir())) == 5


def test_gen_data_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="refusing"):
        lake.generate(tmp_path, lake.LakeParams(users=10), progress=lambda line: None)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "compute.cli", *args],
        capture_output=True, text=True, env=full_env, timeout=120,
    )  # fmt: skip


def test_cli_gen_data_with_env_options(tmp_path: Path) -> None:
    done = _cli("gen-data", "--days", "3", env={"SEG_OUT": str(tmp_path / "l"), "SEG_USERS": "50"})
    assert done.returncode == 0, done.stderr
    assert "100%" in done.stderr
    meta = json.loads((tmp_path / "l" / "_lake.json").read_text())
    assert meta["users"] == 50 and meta["days"] == 3


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["gen-data", "--out", "x", "--users", "0"], {}, "--users"),
        (["gen-data", "--out", "x"], {"SEG_USERS": "many"}, "SEG_USERS"),
        (["gen-data", "--users", "5"], {}, "--out"),
    ],
)
def test_cli_usage_errors_are_one_line(args: list[str], env: dict, needle: str) -> None:
    done = _cli(*args, env=env)
    assert done.returncode == 2
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_cli_batch_definition_error_fails_before_spark(tmp_path: Path, lake20k: Path) -> None:
    defs = write_defs(tmp_path, segment("a", "SELECT 1 AS user_id") * 2)
    done = _cli("batch", "--lake", str(lake20k), "--definitions", str(defs),
                "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"seg-compute batch: error: segment 'a': defined twice in {defs} (segments #1 and #2)"
    )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- definitions (no Spark)


@pytest.mark.parametrize(
    ("text", "name", "needle"),
    [
        (segment("dup", "SELECT 1 AS user_id") * 2, "dup", "defined twice"),
        (segment("bad id!", "SELECT 1 AS user_id"), "bad id!", "not a valid segment id"),
        (segment("_x", "SELECT 1 AS user_id"), "_x", "not a valid segment id"),
        (segment("x" * 129, "SELECT 1 AS user_id"), "x" * 129, "not a valid segment id"),
        (segment("p", "SELECT {nope} AS user_id"), "p", "undefined parameter {nope}"),
        (segment("empty", "  "), "empty", "sql is missing or empty"),
        ('[[segment]]\nname = "nosql"\n', "nosql", "sql is missing"),
        (segment("typo", "SELECT 1 AS user_id") + "sq1 = 'x'\n", "typo", "unknown key(s) sq1"),
    ],
)
def test_definition_errors_name_the_segment(text: str, name: str, needle: str) -> None:
    with pytest.raises(DefinitionError) as info:
        definitions.parse(text, base_params={"as_of": dt.date(2026, 11, 1)})
    assert info.value.segment == name
    assert repr(name) in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("this is = = not toml", "not valid TOML"),
        ("[params]\nx = 1\n", "no [[segment]]"),
        ("[[segment]]\nsql = 'SELECT 1 AS user_id'\n", "segment #1 has no name"),
        ("[param]\n" + segment("a", "SELECT 1 AS user_id"), "unknown top-level key(s) param"),
    ],
)
def test_file_level_definition_errors(text: str, needle: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(needle)):
        definitions.parse(text)


def test_params_precedence_and_escapes() -> None:
    text = (
        "[params]\na = 'file'\nb = 'file'\nc = 'file'\n"
        + segment("s", "SELECT {a},{b},{c},{d},{flag},{day},{{literal}} AS user_id")
        + "[segment.params]\nb = 'segment'\nc = 'segment'\nflag = true\nday = 2026-01-02\n"
    )
    (seg,) = definitions.parse(
        text, base_params={"a": "base", "d": "base"}, overrides={"c": "override"}
    )
    assert seg.sql == "SELECT file,segment,override,base,true,2026-01-02,{literal} AS user_id"


@given(st.text())
def test_render_escaped_braces_round_trip(text: str) -> None:
    escaped = text.replace("{", "{{").replace("}", "}}")
    assert definitions.render(escaped, {}) == text
    assert definitions.render("{x}" + escaped + "{x}", {"x": 1.5}) == f"1.5{text}1.5"


def test_example_definitions_load() -> None:
    segments = definitions.load(EXAMPLE, base_params={"as_of": dt.date(2026, 11, 1)})
    assert len(segments) >= 6
    assert "DATE '2026-11-01'" in segments[0].sql and "{" not in segments[0].sql


# ---------------------------------------------------------------- segment-set writer


def test_write_segment_set_layout_and_replace(tmp_path: Path) -> None:
    out = tmp_path / "set"
    when = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
    bitmaps = {"VIP": BitMap64([1, 2**64 - 1]), "vip": BitMap64(), "geo:de": BitMap64([5])}
    manifest = write_segment_set(out, bitmaps, when)
    assert manifest["format"] == 1 and manifest["computed_at"] == "2026-11-01T12:00:00.000Z"
    on_disk, read = read_set(out)
    assert on_disk == manifest and read == bitmaps
    files = [e["file"] for e in manifest["segments"].values()]
    assert len({f.lower() for f in files}) == 3 and all(":" not in f for f in files)
    assert {n: e["cardinality"] for n, e in manifest["segments"].items()} == {
        "VIP": 2, "vip": 0, "geo:de": 1,
    }  # fmt: skip
    write_segment_set(out, {"only": BitMap64([9])}, when)
    assert read_set(out)[1] == {"only": BitMap64([9])}
    assert sorted(p.name for p in out.iterdir()) == ["0000-only.roaring", "manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["set"], "no temp dirs left behind"


def test_write_segment_set_refuses_bad_input(tmp_path: Path) -> None:
    when = dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError, match="invalid segment id"):
        write_segment_set(tmp_path / "s", {"bad id": BitMap64()}, when)
    with pytest.raises(ValueError, match="timezone"):
        write_segment_set(tmp_path / "s", {"a": BitMap64()}, dt.datetime(2026, 1, 1))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="refusing"):
        write_segment_set(tmp_path / "home", {"a": BitMap64()}, when)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- batch (Spark)


@pytest.mark.spark
def test_batch_matches_ground_truth(batch_out: Path, lake20k: Path) -> None:
    manifest, bitmaps = read_set(batch_out)
    truth = truth_from_lake(lake20k, EXAMPLE)
    assert manifest["format"] == 1
    assert dt.datetime.fromisoformat(manifest["computed_at"]).tzinfo is not None
    assert list(bitmaps) == [s.name for s in batch.load_segments(lake20k, EXAMPLE)]
    for name, bitmap in bitmaps.items():
        assert manifest["segments"][name]["cardinality"] == len(bitmap)
        assert 0 < len(bitmap) < USERS, f"{name} is trivial"
        assert set(bitmap) == truth[name], name
    assert any(bitmap.max() > 2**62 for bitmap in bitmaps.values()), "64-bit ids survive"


@pytest.mark.spark
def test_batch_is_deterministic_and_the_cli_runs_it(
    spark, lake20k: Path, batch_out: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Same seed, same lake bytes; same lake, same segment-set bytes. The second batch goes
    through `seg-compute batch` in-process (it reuses, and leaves running, our session)."""
    again = tmp_path / "lake"
    lake.generate(again, lake.LakeParams(users=USERS, seed=SEED), progress=lambda line: None)
    assert _files(again) == _files(lake20k)
    out = tmp_path / "set"
    monkeypatch.setenv("SEG_LAKE", str(again))
    monkeypatch.setenv("SEG_PARAM", "lookback_days=90")
    try:
        code = cli.main(["batch", "--definitions", str(EXAMPLE), "--out", str(out),
                         "--as-of", "2026-11-01", "--param", "unused=1"])  # fmt: skip
    finally:
        batch.register_views(spark, lake20k)  # later tests query the module's lake
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    first, second = read_set(batch_out), read_set(out)
    assert first[1] == second[1]
    assert first[0]["segments"] == second[0]["segments"]
    assert _files(batch_out).keys() == _files(out).keys()
    for name in _files(out):
        if name != "manifest.json":
            assert (batch_out / name).read_bytes() == (out / name).read_bytes()
    assert printed[0].split()[:2] == ["vip_buyers", f"{len(second[1]['vip_buyers']):,}"]
    assert printed[-1].startswith("8 segments, ") and str(out) in printed[-1]
    assert spark.sql("SELECT 1").collect(), "the caller's session is still running"


@pytest.fixture(scope="module")
def views(spark, lake20k: Path):
    """The session with the lake's views registered once for the tests below."""
    batch.register_views(spark, lake20k)
    return spark


@pytest.mark.spark
def test_a_merged_pass_that_fails_and_falls_back_prints_no_errors(
    lake20k: Path, tmp_path: Path
) -> None:
    """The merged query divides by zero on rows the segment's own dt filter prunes (so the
    queries as written decide, compute/batch.py): the run succeeds, and stderr holds none of
    the failed pass's task errors, stack traces or pyspark's JSON error records."""
    defs = write_defs(tmp_path, segment("pruned", "SELECT user_id FROM orders WHERE "
                                        "1 / (amount - amount) > 0 AND dt = DATE '1999-01-01' "
                                        "GROUP BY user_id")
                      + segment("books", "SELECT user_id FROM orders WHERE category = 'books' "
                                "GROUP BY user_id"))  # fmt: skip
    done = _cli("batch", "--lake", str(lake20k), "--definitions", str(defs),
                "--out", str(tmp_path / "set"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    for noise in ("ERROR", "Lost task", "Exception in task", "DIVIDE_BY_ZERO", '"level"'):
        assert noise not in done.stderr, done.stderr
    assert read_set(tmp_path / "set")[1]["books"]


def test_cli_batch_refuses_foreign_out_before_spark(lake20k: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    done = _cli("batch", "--lake", str(lake20k), "--definitions", str(EXAMPLE),
                "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"seg-compute batch: error: refusing to replace {tmp_path}: it is not empty and not a "
        "segment set (no manifest.json)"
    )


def _analyze(spark, sql: str, name: str = "bad"):
    (seg,) = definitions.parse(segment(name, sql))
    return batch.analyze(spark, seg)


def _members(spark, sql: str, name: str = "s", *, on_driver: bool | None = None) -> BitMap64:
    return segment_bitmap(_analyze(spark, sql, name), name, on_driver=on_driver)


#: where compute/bitmaps.py builds the bitmaps: on the driver (local mode's default) or in the
#: executors' Python workers (a cluster's); both hold every rule below
PLACES = [pytest.param(True, id="driver"), pytest.param(False, id="executors")]


@pytest.mark.spark
@pytest.mark.parametrize(
    ("sql", "needle"),
    [
        ("SELEC user_id FROM users", "invalid SQL: [PARSE_SYNTAX_ERROR]"),
        ("SELECT user_id FROM no_such_table", "invalid SQL: [TABLE_OR_VIEW_NOT_FOUND]"),
        ("SELECT nope AS user_id FROM users", "invalid SQL: [UNRESOLVED_COLUMN"),
        ("SELECT country FROM users", "exactly one column named user_id, got: country"),
        ("SELECT user_id, tier FROM users", "exactly one column named user_id, got: user_id, tier"),
        ("SELECT CAST(user_id AS STRING) AS user_id FROM users", "integer type, got string"),
        ("SELECT user_id * 1.5 AS user_id FROM users", "integer type, got decimal(23,1)"),
        ("SELECT CAST(user_id AS DOUBLE) AS user_id FROM users", "integer type, got double"),
        ("CREATE TABLE t (user_id BIGINT)", "invalid SQL"),
        ("SELECT 1 AS user_id; DROP VIEW users", "invalid SQL"),
    ],
)
def test_spark_definition_errors_name_the_segment(views, sql: str, needle: str) -> None:
    with pytest.raises(DefinitionError) as info:
        _analyze(views, sql)
    assert info.value.segment == "bad"
    assert str(info.value).startswith("segment 'bad': ") and needle in str(info.value)
    assert "\n" not in str(info.value)
    assert views.catalog.tableExists("users"), "no statement ran"


@pytest.mark.spark
def test_every_segment_is_analyzed_before_any_runs(spark, lake20k: Path) -> None:
    segments = definitions.parse(
        segment("ok", "SELECT user_id FROM users") + segment("bad", "SELECT tier FROM users")
    )
    ran: list[str] = []
    with pytest.raises(DefinitionError, match="segment 'bad'"):
        batch.compute(spark, lake20k, segments, lambda result: ran.append(result.name))
    assert ran == []


@pytest.mark.spark
@pytest.mark.parametrize(
    ("sql", "needle"),
    [
        ("SELECT user_id - 10000100 AS user_id FROM users", "user_id must be >= 0, got -"),
        ("SELECT CAST(NULL AS BIGINT) AS user_id FROM users LIMIT 3", "null in 3 row(s)"),
        ("SELECT CAST('99999999999999999999' AS DECIMAL(20,0)) AS user_id", "< 2**64"),
    ],
)
@pytest.mark.parametrize("on_driver", PLACES)
def test_bad_ids_fail_the_segment(views, sql: str, needle: str, on_driver: bool) -> None:
    with pytest.raises(DefinitionError) as info:
        _members(views, sql, "ids", on_driver=on_driver)
    assert info.value.segment == "ids" and needle in str(info.value)


@pytest.mark.spark
def test_failed_batch_keeps_previous_set(spark, lake20k: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    good = definitions.parse(segment("a", "SELECT user_id FROM users WHERE tier = 'vip'"))
    batch.run_batch(spark, lake20k, good, out)
    before = _files(out)
    bad = definitions.parse(
        segment("a", "SELECT user_id FROM users") + segment("b", "SELECT -1 AS user_id")
    )
    with pytest.raises(DefinitionError, match="segment 'b'"):
        batch.run_batch(spark, lake20k, bad, out)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


@pytest.mark.spark
@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT CAST(7 AS TINYINT) AS user_id UNION ALL SELECT 7", BitMap64([7])),
        ("SELECT CAST(id AS INT) AS user_id FROM range(0, 100000, 1, 3)", BitMap64(range(100000))),
        ("SELECT CAST('18446744073709551615' AS DECIMAL(20,0)) AS user_id", BitMap64([2**64 - 1])),
        ("SELECT user_id FROM users WHERE 1 = 0", BitMap64()),
    ],
)
@pytest.mark.parametrize("on_driver", PLACES)
def test_integer_types_and_full_uint64_range(
    views, sql: str, expected: BitMap64, on_driver: bool
) -> None:
    assert _members(views, sql, on_driver=on_driver) == expected


@pytest.mark.spark
def test_both_places_build_the_same_bitmaps_for_many_sources(views) -> None:
    """Sources of one pass side by side: a merged query's flags past one mask column's
    MASK_BITS, a decimal(20,0) id beside BIGINT ones (the union widens them), a frame of one
    segment, one with no row, a bad id in one segment only, and a flag that is NULL."""
    flags = MASK_BITS + 7
    columns = ", ".join(f"user_id % {k + 2} = 0 AS f{k}" for k in range(flags))
    many = views.sql(f"SELECT user_id, {columns}, CAST(NULL AS BOOLEAN) AS f_null FROM users")
    sources = [
        Source(many, tuple(f"m{k}" for k in range(flags + 1)),
               tuple(f"f{k}" for k in range(flags)) + ("f_null",)),
        Source(views.sql("SELECT CAST('18446744073709551615' AS DECIMAL(20,0)) AS user_id"),
               ("top",)),
        Source(views.sql("SELECT user_id FROM users WHERE tier = 'vip'"), ("vip",)),
        Source(views.sql("SELECT user_id FROM users WHERE 1 = 0"), ("none",)),
        Source(views.sql("SELECT user_id - 10 AS user_id, user_id < 5 AS neg, user_id >= 10 AS ok "
                         "FROM range(0, 20) AS t(user_id)"), ("neg", "ok"), ("neg", "ok")),
    ]  # fmt: skip
    assert is_local(many), "the session of these tests runs in local mode"
    on_driver, in_executors = (source_results(sources, on_driver=p) for p in (True, False))
    assert list(on_driver) == list(in_executors)
    errors = {n: str(e) for n, e in on_driver.items() if isinstance(e, DefinitionError)}
    assert errors == {"neg": "segment 'neg': user_id must be >= 0, got -10"}
    assert str(in_executors["neg"]) == errors["neg"]
    users = BitMap64(r[0] for r in views.sql("SELECT user_id FROM users").collect())
    for k in range(flags):
        assert (
            on_driver[f"m{k}"]
            == in_executors[f"m{k}"]
            == BitMap64(u for u in users if u % (k + 2) == 0)
        ), k
    assert on_driver[f"m{flags}"] == BitMap64()  # a NULL flag: no member
    assert on_driver["top"] == in_executors["top"] == BitMap64([2**64 - 1])
    assert on_driver["vip"] == in_executors["vip"] and len(on_driver["vip"]) > 0
    assert on_driver["none"] == in_executors["none"] == BitMap64()
    assert on_driver["ok"] == in_executors["ok"] == BitMap64(range(0, 10))


@pytest.mark.spark
def test_missing_lake_is_a_lake_error(spark, tmp_path: Path) -> None:
    with pytest.raises(batch.LakeError, match="not a directory"):
        batch.register_views(spark, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(batch.LakeError, match="no tables"):
        batch.register_views(spark, tmp_path / "empty")


@pytest.mark.spark
def test_batch_publishes_to_the_log(spark, lake20k: Path, tmp_path: Path, capsys) -> None:
    """`batch --publish-log-dir`: the segments reach the log through the publisher, and a
    replica of that log answers exactly the ground truth."""
    from sidecar.replica import Replica
    from sidecar.transport.logdir import LogDirTransport

    log_dir = tmp_path / "log"
    try:
        code = cli.main(["batch", "--lake", str(lake20k), "--definitions", str(EXAMPLE),
                         "--publish-log-dir", str(log_dir)])  # fmt: skip
    finally:
        batch.register_views(spark, lake20k)
    assert code == 0
    assert "published to log directory" in capsys.readouterr().out
    truth = truth_from_lake(lake20k, EXAMPLE)
    replica = Replica(LogDirTransport(log_dir)).start()
    try:
        assert replica.wait_ready(30)
        got = {s: set(st.bitmap) for s, st in replica.engine.segments.items()}
        assert got == truth
    finally:
        replica.stop(save=False)
