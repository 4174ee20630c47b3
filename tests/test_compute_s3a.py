"""`seg-compute batch` over an s3a:// lake, against a local S3-compatible server.

moto runs in server mode (`python -m moto.server`) on a free loopback port as a subprocess; a
gen-data lake of 5k users is uploaded to it with boto3, and `seg-compute batch --lake
s3a://BUCKET/lake` (a subprocess: a fresh JVM whose classpath gets hadoop-aws and the AWS SDK
modules from compute.sparkjars) computes the example segments, compared exactly with
tests/truth.py on the local copy. The lake's as_of is not the default one, so the segments only
match if `_lake.json` was read from S3.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pyroaring import BitMap64

from compute import definitions, lake
from tests.s3_fixture import aws_env
from tests.truth import truth_from_lake

pytestmark = pytest.mark.spark

USERS = 5_000
SEED = 5
AS_OF = dt.date(2026, 9, 30)
BUCKET = "seg-lake"
EXAMPLE = definitions.EXAMPLE
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lake") / "lake"
    params = lake.LakeParams(users=USERS, seed=SEED, as_of=AS_OF)
    lake.generate(out, params, progress=lambda line: None)
    return out


@pytest.fixture(scope="module")
def s3_lake(s3_endpoint: str, local_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The local lake uploaded to s3a://BUCKET/lake."""
    import boto3

    env = aws_env(tmp_path_factory.mktemp("aws"))
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    s3.create_bucket(Bucket=BUCKET)
    files = [f for f in sorted(local_lake.rglob("*")) if f.is_file()]
    for f in files:
        s3.upload_file(str(f), BUCKET, "lake/" + f.relative_to(local_lake).as_posix())
    listed = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="lake/")
    assert sum(page.get("KeyCount", 0) for page in listed) == len(files)
    return f"s3a://{BUCKET}/lake"


def _cli(tmp: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SEG_", "AWS_"))}  # fmt: skip
    full_env.update(aws_env(tmp))
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "compute.cli", *args],
        capture_output=True, text=True, env=full_env, timeout=600, cwd=REPO,
    )  # fmt: skip


def test_batch_over_s3a_matches_the_truth(
    s3_endpoint: str, s3_lake: str, local_lake: Path, tmp_path: Path
) -> None:
    out = tmp_path / "set"
    done = _cli(tmp_path, "batch", "--lake", s3_lake, "--definitions", str(EXAMPLE),
                "--out", str(out), env={"SEG_S3_ENDPOINT": s3_endpoint})  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"as_of {AS_OF} (from {s3_lake}/_lake.json)" in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    truth = truth_from_lake(local_lake, EXAMPLE)
    assert list(manifest["segments"]) == list(truth)
    for name, entry in manifest["segments"].items():
        bitmap = BitMap64.deserialize((out / entry["file"]).read_bytes())
        assert entry["cardinality"] == len(bitmap)
        assert 0 < len(bitmap) < USERS, f"{name} is trivial"
        assert set(bitmap) == truth[name], name
    assert done.stdout.strip().splitlines()[-1].startswith("8 segments, ")


def test_batch_names_a_missing_s3a_lake(s3_endpoint: str, s3_lake: str, tmp_path: Path) -> None:
    missing = f"s3a://{BUCKET}/no-such-lake"
    done = _cli(tmp_path, "batch", "--lake", missing, "--definitions", str(EXAMPLE),
                "--out", str(tmp_path / "set"), "--s3-endpoint", s3_endpoint,
                env={})  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"seg-compute batch: error: lake {missing}"), done.stderr[-4000:]
    assert "FileNotFoundException" in last
    assert f"no as_of in {missing}/_lake.json" in done.stderr
    assert not (tmp_path / "set").exists()


BATCH = ["batch", "--definitions", str(EXAMPLE), "--out", "{out}"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["gen-data", "--out", "s3a://b/lake", "--users", "5"], "a local path, not a URI"),
        ([*BATCH, "--lake", "s3://b/lake"], "s3a://, not s3://"),
        ([*BATCH, "--lake", "s3a://b/l", "--s3-path-style", "maybe"], "--s3-path-style"),
    ],
)
def test_s3_usage_errors_fail_before_spark(args: list[str], needle: str, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    done = _cli(tmp_path, *(out if a == "{out}" else a for a in args), env={})
    assert done.returncode == 2
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()


def test_batch_fails_fast_on_an_unreachable_endpoint(tmp_path: Path) -> None:
    """Nothing listens: one line, before Spark (s3a itself would retry for minutes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: a port nothing listens on
    done = _cli(tmp_path, *BATCH[:-1], str(tmp_path / "out"), "--lake", "s3a://b/lake",
                "--s3-endpoint", f"http://127.0.0.1:{port}", env={})  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"seg-compute batch: error: --s3-endpoint http://127.0.0.1:{port}: cannot connect "
        "(Connection refused)"
    )
