"""The one place that builds a SparkSession for compute jobs (local mode by default)."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.cliutil import Parser, positive_int

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

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
    """Return a quiet SparkSession: no UI, UTC session time zone, few shuffle partitions.

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
        # Quiet the JVM from its first line, not only after setLogLevel below.
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={_log4j2_file()}",
    }
    if local:
        settings |= {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}
    if not submitted:
        settings.update(_extra_jars_conf())
    settings.update(conf or {})
    builder = SparkSession.builder.appName(app_name)
    if not submitted:
        builder = builder.master(master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


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
