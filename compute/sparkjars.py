"""The jars pyspark lacks, resolved from Maven Central: Spark's Kafka source
(spark-sql-kafka-0-10) for `seg-compute stream`, and the s3a file system (hadoop-aws and the
AWS SDK v2 modules it needs, ~11 MB; not the SDK's 686 MB bundle) for an s3a:// lake.

Spark's own resolver (`spark.jars.packages`, Ivy) may not reach Maven Central where Maven
does (a proxy or mirror set up for `mvn`), so Maven fetches them once:

    mvn -B -q -f deploy/spark/pom.xml dependency:copy-dependencies \\
        -DoutputDirectory=.cache/spark-jars -DincludeScope=runtime

and Spark gets the files as `spark.jars`. `spark_jars()` does that on first use (under a file
lock, so parallel callers fetch once) and `python -m compute.sparkjars` does it from a shell
(`./run test` calls it). One pom and one cache for both: the driver JVM's classpath is fixed by
the first session of a process, so every session carries all of them (compute/spark.py).
A `.complete` marker holding the pom's sha256 says the cache matches the pom; editing the pom
refetches. `SEG_SPARK_JARS_DIR` moves the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POM = REPO / "deploy" / "spark" / "pom.xml"
DEFAULT_CACHE = REPO / ".cache" / "spark-jars"
CACHE_ENV = "SEG_SPARK_JARS_DIR"
MARKER = ".complete"
# One jar of each part must be there: the Kafka source and the s3a file system.
REQUIRED = ("spark-sql-kafka-0-10_", "hadoop-aws-")


class JarsError(RuntimeError):
    """The jars are not available and cannot be fetched."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _pom_hash(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def _missing(jars: list[Path]) -> list[str]:
    return [r for r in REQUIRED if not any(j.name.startswith(r) for j in jars)]


def _cached(cache: Path, digest: str) -> list[Path] | None:
    marker = cache / MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        jars = sorted(cache.glob("*.jar"))
        if not _missing(jars):
            return jars
    return None


def spark_jars(cache: Path | None = None, pom: Path = POM, *, fetch: bool = True) -> list[Path]:
    """The jar files to hand Spark as `spark.jars`; fetches them with Maven when missing."""
    cache = cache or cache_dir()
    if not pom.is_file():  # an installed package: use a cache prepared elsewhere
        jars = sorted(cache.glob("*.jar"))
        if not (missing := _missing(jars)):
            return jars
        raise JarsError(f"no {missing[0]}*.jar in {cache} and no {pom} to fetch it with (set "
                        f"{CACHE_ENV} to a directory holding the jars)")  # fmt: skip
    digest = _pom_hash(pom)
    if (jars := _cached(cache, digest)) is not None:
        return jars
    if not fetch:
        raise JarsError(f"Spark jars not in {cache}: run `python -m compute.sparkjars`")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f".{cache.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (jars := _cached(cache, digest)) is not None:
            return jars
        _fetch(cache, pom, digest)
    jars = _cached(cache, digest)
    assert jars is not None
    return jars


def _fetch(cache: Path, pom: Path, digest: str) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise JarsError("mvn not found: it is needed once to fetch Spark's jars from Maven")
    print(f"sparkjars: fetching the Kafka source and s3a jars into {cache} (once)",
          file=sys.stderr, flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        proc = subprocess.run(
            [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(pom),
             "dependency:copy-dependencies", f"-DoutputDirectory={tmp}",
             "-DincludeScope=runtime"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise JarsError("mvn dependency:copy-dependencies failed: " + " | ".join(tail))
        if missing := _missing(sorted(tmp.glob("*.jar"))):
            raise JarsError(f"Maven copied no {missing[0]}*.jar")
        (tmp / MARKER).write_text(digest + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        shutil.rmtree(cache, ignore_errors=True)
        os.rename(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


kafka_jars = spark_jars  # the name callers of the Kafka-only version use


def streaming_conf(cache: Path | None = None) -> dict[str, str]:
    """SparkSession settings that put the Kafka source (and s3a) on the classpath."""
    return {"spark.jars": ",".join(str(j) for j in spark_jars(cache))}


def main() -> int:
    try:
        jars = spark_jars()
    except JarsError as e:
        print(f"sparkjars: error: {e}", file=sys.stderr)
        return 1
    print(f"sparkjars: {len(jars)} jars in {jars[0].parent}", file=sys.stderr)
    for jar in jars:
        print(jar)
    return 0


if __name__ == "__main__":
    sys.exit(main())
