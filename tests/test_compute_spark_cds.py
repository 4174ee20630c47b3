"""compute/spark.py's class-data archive for the driver JVM: which option a session gets (no
JVM starts here; every Spark test's session starts with the archive when one is built, and
perf/spark_batch.py measures it: perf/ANALYSIS.md, sixth session)."""

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
