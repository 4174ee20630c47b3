"""The one place that builds a SparkSession for compute jobs (local mode by default)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.cliutil import Parser, positive_int

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

REPO = Path(__file__).resolve().parents[1]
#: the driver JVM's class-data archives (AppCDS), one per JVM, pyspark and jars (`cds_archive`)
CDS_DIR = REPO / ".cache" / "spark-cds"
CDS_ENV = "SEG_SPARK_CDS"  # "0": build_session uses no archive and ensure_cds_archive builds none
_CDS_DUMP_ENV = "SEG_SPARK_CDS_DUMP"  # set by ensure_cds_archive for the JVM that writes it
_CDS_QUIET = "-Xlog:cds*=off"  # no warnings about signed jars or a stale archive
LEAN_JIT_ENV = "SEG_SPARK_LEAN_JIT"  # "0": a local driver JVM keeps the JIT's own settings
#: A local driver JVM runs the tasks, and on few cores C2 took half its CPU in a batch's first
#: round: inline less deep, compile only hotter methods (compute/BATCH.md "The driver JVM's JIT
#: in local mode" has why and the figures).
LEAN_JIT = (
    "-XX:MaxInlineLevel=6 -XX:MaxInlineSize=20 -XX:FreqInlineSize=100 -XX:InlineSmallCode=500 "
    "-XX:Tier4InvocationThreshold=15000 -XX:Tier4CompileThreshold=45000 "
    "-XX:Tier4BackEdgeThreshold=120000"
)

DEFAULT_MASTER = "local[2]"
DEFAULT_SHUFFLE_PARTITIONS = 4
DEFAULT_DRIVER_MEMORY = "2g"


def add_options(p: Parser) -> None:
    """The session options of every Spark subcommand (`batch`, `stream`, `sink`)."""
    group = p.add_argument_group("Spark")
    group.add_argument("--master", default=DEFAULT_MASTER, metavar="URL", help="Spark master")
    group.add_argument(
        "--shuffle-partitions",
        type=positive_int,
        default=DEFAULT_SHUFFLE_PARTITIONS,
        metavar="N",
        help="spark.sql.shuffle.partitions",
    )
    group.add_argument(
        "--driver-memory", default=DEFAULT_DRIVER_MEMORY, metavar="SIZE", help="spark.driver.memory"
    )


_LOG4J2 = """\
# Written by compute/spark.py: WARN and above to stderr, minus known startup noise.
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.hadoop_native.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop_native.level = error
"""


def _log4j2_file() -> Path:
    """A log4j2 configuration for the driver JVM (written once per content, then reused)."""
    digest = hashlib.sha256(_LOG4J2.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"seg-compute-log4j2-{digest}.properties"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_LOG4J2)
        os.replace(tmp, path)
    return path


def build_session(
    app_name: str = "seg-compute",
    master: str = DEFAULT_MASTER,
    shuffle_partitions: int = DEFAULT_SHUFFLE_PARTITIONS,
    conf: Mapping[str, str] | None = None,
) -> SparkSession:
    """Return a quiet SparkSession: no UI, UTC session time zone, few shuffle partitions; in
    local mode a driver JVM with the class-data archive (when built) and `LEAN_JIT`.

    The Python workers run the interpreter that runs this code, so the executors see the same
    packages (pyroaring, pyarrow) as the driver. `conf` entries override the defaults.
    """
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Started by spark-submit (deploy/spark/submit.sh): its --master, driver address and --jars
    # stand. Local mode (the default) keeps the driver on loopback.
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    local = master.startswith("local") and not submitted
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    settings: dict[str, str] = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.default.parallelism": str(shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # List dt=... partition directories on the driver instead of in a Spark job.
        "spark.sql.sources.parallelPartitionDiscovery.threshold": "4096",
    }
    if local:
        settings |= {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}
    if not submitted:
        settings.update(_extra_jars_conf())
    settings["spark.driver.extraJavaOptions"] = driver_java_options(
        submitted=submitted, local=local, jars=settings.get("spark.jars", "")
    )
    settings.update(conf or {})
    builder = SparkSession.builder.appName(app_name)
    if not submitted:
        builder = builder.master(master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def driver_java_options(*, submitted: bool, local: bool, jars: str) -> str:
    """The driver JVM's options: the log4j2 file (quiet from the JVM's first line, not only
    after setLogLevel); the class-data archive of `jars` unless spark-submit started the JVM;
    `LEAN_JIT` in local mode unless SEG_SPARK_LEAN_JIT=0."""
    options = [f"-Dlog4j2.configurationFile={_log4j2_file()}"]
    cds = "" if submitted else _cds_option(jars)
    if cds:
        options += [cds, _CDS_QUIET]
    if local and os.environ.get(LEAN_JIT_ENV) != "0":
        options.append(LEAN_JIT)
    return " ".join(options)


#: the driver's loggers of a failed task (its stack trace, "Lost task", "aborting job") and
#: pyspark's, which logs every SQL error it raises as a JSON record on stderr
_TASK_FAILURE_LOGGERS = (
    "org.apache.spark.executor.Executor",
    "org.apache.spark.scheduler.TaskSetManager",
)
_PYSPARK_ERROR_LOGGERS = ("SQLQueryContextLogger", "DataFrameQueryContextLogger")


@contextlib.contextmanager
def quiet_task_failures(spark: SparkSession) -> Iterator[None]:
    """While the block runs, a failing task or query logs nothing (the error is still raised):
    for a job whose failure the caller expects and handles, such as compute/batch.py's merged
    pass, so that a run that succeeds does not print a page of errors."""
    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    configurator = jvm.org.apache.logging.log4j.core.config.Configurator
    manager = jvm.org.apache.logging.log4j.LogManager
    levels = {name: manager.getLogger(name).getLevel() for name in _TASK_FAILURE_LOGGERS}
    from pyspark.logger import PySparkLogger

    # pyspark's own class: a plain Logger made first under these names breaks its calls
    loggers = [PySparkLogger.getLogger(name) for name in _PYSPARK_ERROR_LOGGERS]
    disabled = [logger.disabled for logger in loggers]
    for name in levels:
        configurator.setLevel(name, jvm.org.apache.logging.log4j.Level.OFF)
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for name, level in levels.items():
            configurator.setLevel(name, level)
        for logger, was in zip(loggers, disabled, strict=True):
            logger.disabled = was


def _extra_jars_conf() -> dict[str, str]:
    """spark.jars for the Kafka source and s3a when compute.sparkjars has them cached (never
    fetches).

    The driver JVM's classpath is fixed by the first session of a process, and a later one
    (the stream job's) cannot add a data source, so every session carries them when present.
    """
    from compute.sparkjars import JarsError, spark_jars

    try:
        return {"spark.jars": ",".join(str(j) for j in spark_jars(fetch=False))}
    except JarsError:
        return {}


def cds_archive(jars: str = "") -> Path:
    """Where the class-data archive of this JVM, pyspark and `jars` (spark.jars) lives: the
    JVM refuses an archive made with another class path, and a new key is a new file."""
    import pyspark

    key = "\n".join([os.path.realpath(_java()), pyspark.__version__, jars])
    return CDS_DIR / f"driver-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsa"


def _java() -> str:
    """The java that spark-submit runs (JAVA_HOME's, else the one on PATH)."""
    home = os.environ.get("JAVA_HOME")
    return os.path.join(home, "bin", "java") if home else (shutil.which("java") or "java")


def _cds_option(jars: str) -> str:
    dump = os.environ.get(_CDS_DUMP_ENV)
    if dump:
        return f"-XX:ArchiveClassesAtExit={dump}"
    if os.environ.get(CDS_ENV) == "0":
        return ""
    path = cds_archive(jars)
    return f"-XX:SharedArchiveFile={path}" if path.is_file() else ""


def ensure_cds_archive(log: Callable[[str], None] | None = None) -> Path | None:
    """The driver JVM's class-data archive (AppCDS: the classes Spark loads, parsed and
    verified once), built on first use: a child process runs the batch's queries over a tiny
    generated lake with `-XX:ArchiveClassesAtExit`, and its archive is moved in place when it
    exits 0 (one build at a time; ~185 MB, about a minute, once per JVM, pyspark and jars).
    Local mode only; None when SEG_SPARK_CDS=0 or the build failed (Spark starts without)."""
    if os.environ.get(CDS_ENV) == "0" or "PYSPARK_GATEWAY_PORT" in os.environ:
        return None
    path = cds_archive(_extra_jars_conf().get("spark.jars", ""))
    if path.is_file():
        return path
    try:
        CDS_DIR.mkdir(parents=True, exist_ok=True)
        lock = open(CDS_DIR / ".lock", "w")  # noqa: SIM115 (held by the with below)
    except OSError as e:  # a read-only checkout: Spark starts without one
        if log:
            log(f"no class-data archive: {e}")
        return None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():  # another process built it meanwhile
            return path
        if log:
            log(f"building the Spark driver's class-data archive {path} (once, ~1 minute)")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        env = dict(os.environ, **{_CDS_DUMP_ENV: str(tmp)})
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        try:
            done = subprocess.run(
                [sys.executable, "-c", "from compute.spark import _cds_training; _cds_training()"],
                env=env, capture_output=True, timeout=600, check=False,
            )  # fmt: skip
            # A truncated archive crashes the JVM that maps it (one from another class path
            # is only ignored): a JVM must start with it before it is moved in place.
            if done.returncode == 0 and tmp.is_file() and _cds_starts(tmp):
                os.replace(tmp, path)
                return path
            if log:
                log(f"no class-data archive: the build exited {done.returncode}")
            return None
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _cds_starts(archive: Path) -> bool:
    check = [_java(), f"-XX:SharedArchiveFile={archive}", _CDS_QUIET, "-XX:-CreateCoredumpOnCrash"]
    with tempfile.TemporaryDirectory(prefix="seg-cds-check-") as cwd:  # a crash's hs_err file
        done = subprocess.run([*check, "-version"], cwd=cwd, capture_output=True, timeout=60)
    return done.returncode == 0


def _cds_training() -> None:
    """What the archive's JVM runs (ensure_cds_archive's child): bench20's queries, merged,
    over a 2,000-user lake, so it loads what a batch loads (Parquet, aggregation, codegen,
    the Arrow UDF's runner)."""
    from compute import batch
    from compute.definitions import EXAMPLE
    from compute.lake import LakeParams, generate

    with tempfile.TemporaryDirectory(prefix="seg-cds-") as tmp:
        lake = Path(tmp) / "lake"
        generate(lake, LakeParams(users=2_000), progress=lambda line: None)
        spark = build_session(
            app_name="seg-cds", conf={"spark.driver.memory": DEFAULT_DRIVER_MEMORY}
        )
        proc = spark.sparkContext._gateway.proc  # type: ignore[attr-defined]
        try:
            batch.compute(spark, lake, batch.load_segments(lake, EXAMPLE.parent / "bench20.toml"))
        finally:
            spark.stop()
        proc.stdin.close()  # the JVM exits at EOF and writes the archive as it does: wait
        if proc.wait(timeout=300) != 0:
            sys.exit(f"the JVM exited {proc.returncode}")
