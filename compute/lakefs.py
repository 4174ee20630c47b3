"""Where the lake lives: a local directory, or a Hadoop file system URI (`s3a://bucket/prefix`).

A local lake is listed and its `_lake.json` read with pathlib, before Spark starts. A URI lake
is listed and its `_lake.json` read through the Hadoop FileSystem of the running Spark session:
the same client, settings and credentials that read the Parquet files, so nothing but Spark has
to speak S3 (no boto3 in the compute install).

s3a needs hadoop-aws and the AWS SDK v2 on Spark's classpath: `compute.sparkjars` fetches them
with Maven (deploy/spark/pom.xml) and `s3a_conf` hands them to Spark as `spark.jars`, together
with the `fs.s3a.*` settings:

- `endpoint`: an S3-compatible server (MinIO, moto, Ceph, ...) or a regional AWS endpoint;
  `http://...` turns TLS off, `https://...` on.
- `path_style`: `http://host/bucket/key` instead of `http://bucket.host/key`; on by default
  when an endpoint is given (S3-compatible servers rarely have wildcard DNS), off for AWS.
- `region`: `fs.s3a.endpoint.region`; default `AWS_REGION` / `AWS_DEFAULT_REGION`, else
  us-east-1 with an endpoint (which S3-compatible servers accept), else Hadoop's own choice.
- credentials: Hadoop's default chain, which reads `AWS_ACCESS_KEY_ID` /
  `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) from the environment after any
  `fs.s3a.access.key` set in a Hadoop config, and only then asks the EC2 instance profile.
  Keys are never put in Spark settings, which end up on the JVM's command line.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: A table of the lake is a subdirectory with such a name (`_spark_metadata`, `_checkpoints`,
#: `dt=...` and dot files are not tables).
TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MAX_META_BYTES = 1 << 20


class LakeAccessError(RuntimeError):
    """Listing or reading the lake through Hadoop failed (message: the Java exception)."""


def scheme(lake: Path | str) -> str | None:
    """`s3a` for `s3a://bucket/prefix`; None for a local path."""
    match = _URI_RE.match(lake) if isinstance(lake, str) else None
    return match.group(1).lower() if match else None


def is_uri(lake: Path | str) -> bool:
    return scheme(lake) is not None


def lake_arg(text: str) -> Path | str:
    """The --lake value: a URI stays a string (Path would fold `//`), anything else is a Path."""
    return text if is_uri(text) else Path(text)


def join(lake: Path | str, name: str) -> str:
    if isinstance(lake, Path):
        return str(lake / name)
    return lake.rstrip("/") + "/" + name


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None
    path_style: bool | None = None  # None: on when an endpoint is given
    region: str | None = None


def s3a_settings_conf(s3: S3Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `spark.hadoop.fs.s3a.*` settings for `s3` (no credentials: see the module doc)."""
    environ = os.environ if environ is None else environ
    prefix = "spark.hadoop.fs.s3a."
    conf: dict[str, str] = {}
    endpoint = (s3.endpoint or "").strip()
    if endpoint:
        conf[prefix + "endpoint"] = endpoint
        if endpoint.lower().startswith("http://"):
            conf[prefix + "connection.ssl.enabled"] = "false"
        elif endpoint.lower().startswith("https://"):
            conf[prefix + "connection.ssl.enabled"] = "true"
    path_style = bool(endpoint) if s3.path_style is None else s3.path_style
    conf[prefix + "path.style.access"] = "true" if path_style else "false"
    region = (s3.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
              or ("us-east-1" if endpoint else None))  # fmt: skip
    if region:
        conf[prefix + "endpoint.region"] = region
    return conf


def check_endpoint(endpoint: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at the endpoint: s3a would retry a refused connection for
    about three minutes (fs.s3a.retry.limit x fs.s3a.attempts.maximum, with backoff)."""
    url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    try:
        host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    except ValueError as e:  # a port that is not a number
        raise LakeAccessError(f"--s3-endpoint {endpoint}: {e}") from None
    if not host:
        raise LakeAccessError(f"--s3-endpoint {endpoint}: no host")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise LakeAccessError(f"--s3-endpoint {endpoint}: cannot connect ({reason})") from None


def s3a_conf(s3: S3Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """SparkSession settings for an s3a:// lake: the jars (fetched with Maven when missing,
    raising compute.sparkjars.JarsError if they cannot be) and the fs.s3a settings."""
    from compute.sparkjars import spark_jars

    return {
        "spark.jars": ",".join(str(j) for j in spark_jars()),
        **s3a_settings_conf(s3, environ),
    }


def _java_reason(error: Exception) -> str:
    """The Java exception's own first line, not py4j's 'An error occurred while calling'."""
    java = getattr(error, "java_exception", None)
    text = str(java.toString()) if java is not None else str(error)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


class HadoopDir:
    """A directory of a Hadoop file system, through the JVM of a running Spark session."""

    def __init__(self, spark: SparkSession, uri: str) -> None:
        from py4j.protocol import Py4JError

        self.uri = uri.rstrip("/")
        self._errors = (Py4JError,)
        jvm = spark.sparkContext._jvm
        assert jvm is not None
        self._jvm = jvm
        try:
            self._path = jvm.org.apache.hadoop.fs.Path(self.uri)
            self._fs = self._path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
        except self._errors as e:
            raise LakeAccessError(f"{self.uri}: {_java_reason(e)}") from None

    def subdirectories(self) -> list[str]:
        """The names of the directories directly under this one, sorted."""
        try:
            statuses = self._fs.listStatus(self._path)
            return sorted(str(s.getPath().getName()) for s in statuses if s.isDirectory())
        except self._errors as e:
            raise LakeAccessError(f"{self.uri}: {_java_reason(e)}") from None

    def read(self, name: str, limit: int = MAX_META_BYTES) -> bytes | None:
        """A small file's bytes, or None when it does not exist."""
        path = self._jvm.org.apache.hadoop.fs.Path(f"{self.uri}/{name}")
        try:
            if not self._fs.exists(path):
                return None
            stream = self._fs.open(path)
            try:
                data = bytes(stream.readNBytes(limit + 1))
            finally:
                stream.close()
        except self._errors as e:
            raise LakeAccessError(f"{self.uri}/{name}: {_java_reason(e)}") from None
        if len(data) > limit:
            raise LakeAccessError(f"{self.uri}/{name}: larger than {limit} bytes")
        return data
