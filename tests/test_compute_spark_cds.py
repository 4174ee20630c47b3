"""compute/spark.py's options for the driver JVM: which class-data archive a session gets and
when it gets the lean JIT (no JVM starts here; every Spark test's session starts with the
archive when one is built, tests/test_compute_batch.py checks a running driver's options, and
perf/spark_batch.py measures both: perf/ANALYSIS.md, sixth and sixteenth sessions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compute import spark


@pytest.fixture
def cds_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(spark, "CDS_DIR", tmp_path)
    monkeypatch.delenv(spark.CDS_ENV, raising=False)
    monkeypatch.delenv(spark._CDS_DUMP_ENV, raising=False)
    return tmp_path


def test_a_session_uses_the_archive_of_its_jars_only_once_it_is_built(cds_dir: Path) -> None:
    assert spark._cds_option("a.jar") == ""  # not built: no option (build_session never builds)
    archive = spark.cds_archive("a.jar")
    assert archive.parent == cds_dir and archive != spark.cds_archive("a.jar,b.jar")
    archive.write_bytes(b"built")
    assert spark._cds_option("a.jar") == f"-XX:SharedArchiveFile={archive}"
    assert spark._cds_option("a.jar,b.jar") == ""  # another class path: another archive


def test_seg_spark_cds_0_turns_it_off_and_builds_nothing(
    cds_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spark.cds_archive("").write_bytes(b"built")
    monkeypatch.setenv(spark.CDS_ENV, "0")
    assert spark._cds_option("") == ""
    monkeypatch.setattr(spark, "_extra_jars_conf", lambda: {})
    spark.cds_archive("").unlink()
    assert spark.ensure_cds_archive() is None
    assert list(cds_dir.iterdir()) == []


def test_the_jvm_that_builds_it_dumps_instead_of_reading(
    cds_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spark.cds_archive("").write_bytes(b"built")
    monkeypatch.setenv(spark._CDS_DUMP_ENV, str(cds_dir / "x.tmp"))
    assert spark._cds_option("") == f"-XX:ArchiveClassesAtExit={cds_dir / 'x.tmp'}"


def test_a_local_driver_gets_the_lean_jit_and_a_submitted_one_only_the_log_config(
    cds_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(spark.LEAN_JIT_ENV, raising=False)
    archive = spark.cds_archive("a.jar")
    archive.write_bytes(b"built")
    local = spark.driver_java_options(submitted=False, local=True, jars="a.jar").split()
    assert local[0].startswith("-Dlog4j2.configurationFile=")
    assert local[1:3] == [f"-XX:SharedArchiveFile={archive}", spark._CDS_QUIET]
    assert local[3:] == spark.LEAN_JIT.split()
    # a cluster's driver: the tasks run elsewhere, the JIT keeps its settings
    remote = spark.driver_java_options(submitted=False, local=False, jars="a.jar").split()
    assert remote == local[:3]
    submitted = spark.driver_java_options(submitted=True, local=False, jars="a.jar").split()
    assert submitted == local[:1]  # spark-submit's JVM is not ours to configure
    monkeypatch.setenv(spark.LEAN_JIT_ENV, "0")
    off = spark.driver_java_options(submitted=False, local=True, jars="a.jar").split()
    assert off == local[:3]
