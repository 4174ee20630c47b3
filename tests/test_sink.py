"""`seg-compute sink` and the whole input half: MongoDB (the test server, real pymongo) ->
`seg-compute cdc` -> Kafka -> `sink` -> lake -> `batch` -> publish -> a sidecar's answer.

Spark is heavy here: one session for the module (the sink and batch run in it), and one
`seg-compute sink` process, killed half-way and restarted in the module's session, writing
to S3 (moto).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest

from compute import batch, events, lake, sink
from compute import cli as compute_cli
from compute.definitions import load
from publisher import read_segment_set
from tests.cdc_tools import REPO, cdc_process, read_topic, stop, wait_for
from tests.kafka_fixture import SaslBroker
from tests.logtools import SidecarThread
from tests.mongo_server import MongoTestServer
from tests.s3_fixture import aws_env
from tests.spark_session import spark_session

pytestmark = [pytest.mark.spark, pytest.mark.kafka]

BUCKET = "seg-sink"
DEFINITIONS = """
[[segment]]
name = "big_spenders_30d"
sql = '''
SELECT user_id FROM orders WHERE dt >= date_sub(DATE '{as_of}', 30) AND dt < DATE '{as_of}'
GROUP BY user_id HAVING SUM(amount) >= 500
'''

[[segment]]
name = "viewers"
sql = "SELECT DISTINCT user_id FROM events WHERE type = 'view'"
"""


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    from compute.sparkjars import streaming_conf

    yield from spark_session("test-sink", streaming_conf())


def _publish_and_check(spark: object, lake_dir: Path | str, defs: Path, out: Path,
                       transport: object) -> None:  # fmt: skip
    from publisher import Publisher

    segments = load(defs, batch.base_params(lake_dir, spark=spark))
    batch.run_batch(spark, lake_dir, segments, out)
    Publisher(transport).publish(read_segment_set(out).segments)


def _poll(check: object, want: bool | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while check() != want:  # type: ignore[operator]
        assert time.monotonic() < deadline, f"sidecar did not answer {want}"
        time.sleep(0.1)


def test_a_change_in_mongodb_reaches_a_sidecar_answer(
    spark: object, mongo: MongoTestServer, kafka_bootstrap: str, topic_prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    from sidecar.client import SidecarClient
    from sidecar.replica import Replica
    from sidecar.transport.kafka import KafkaTransport

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ago = [now - dt.timedelta(days=d) for d in range(4)]
    orders = pymongo.MongoClient(mongo.uri).shop.orders
    orders.insert_many([
        {"_id": 1, "user_id": 11, "amount": 300.0, "ts": ago[3], "category": "books"},
        {"_id": 2, "user_id": 11, "amount": 150.0, "ts": ago[2], "category": "books"},
        {"_id": 3, "user_id": 12, "amount": 600.0, "ts": ago[2], "category": "toys"},
    ])  # fmt: skip
    log = tmp_path / "cdc.log"
    cdc = cdc_process(mongo.uri, kafka_bootstrap, topic_prefix, log=log)
    orders_topic = f"{topic_prefix}.shop.orders"
    wait_for("the copy", lambda: len(read_topic(kafka_bootstrap, orders_topic)) == 3, proc=cdc,
             log=log)  # fmt: skip
    orders.update_one({"_id": 2}, {"$set": {"amount": 250.0}})  # user 11 crosses 500
    orders.insert_one({"_id": 4, "user_id": 13, "amount": 50.0, "ts": ago[1]})
    events_topic = f"{topic_prefix}.events"
    events.ensure_topic(kafka_bootstrap, events_topic, 2)
    views = [events.make_event(21, "view"), events.make_event(22, "add_to_cart")]
    events.produce(kafka_bootstrap, events_topic, views)
    wait_for("the changes", lambda: len(read_topic(kafka_bootstrap, orders_topic)) == 5,
             proc=cdc, log=log)  # fmt: skip

    lake_dir, checkpoint = tmp_path / "lake", tmp_path / "checkpoint"
    opts = sink.SinkOptions(kafka_bootstrap, sink.routes([orders_topic, events_topic],
                            topic_prefix), lake_dir, checkpoint)  # fmt: skip
    sink.run_once(spark, opts)
    defs = tmp_path / "defs.toml"
    defs.write_text(DEFINITIONS)
    transport = KafkaTransport(kafka_bootstrap, f"{topic_prefix}seg")
    _publish_and_check(spark, lake_dir, defs, tmp_path / "set1", transport)
    replica = Replica(KafkaTransport(kafka_bootstrap, f"{topic_prefix}seg"),
                      poll_interval=0.01).start()  # fmt: skip
    assert replica.wait_ready(60)
    sock = Path(f"/tmp/sk-{topic_prefix}.sock")
    try:
        with (
            SidecarThread(replica, uds_path=sock, http_host=None) as server,
            SidecarClient(server.uds_path, timeout=5) as client,
        ):
            assert client.check(11, "big_spenders_30d") is True
            assert client.check(12, "big_spenders_30d") is True
            assert client.check(13, "big_spenders_30d") is False
            assert client.check(21, "viewers") is True
            assert client.check(22, "viewers") is False
            orders.delete_one({"_id": 1})  # user 11 falls to 250
            wait_for("the delete", lambda: len(read_topic(kafka_bootstrap, orders_topic)) == 6,
                     proc=cdc, log=log)  # fmt: skip
            sink.run_once(spark, opts)  # the same checkpoint: only what is new
            _publish_and_check(spark, lake_dir, defs, tmp_path / "set2", transport)
            _poll(lambda: client.check(11, "big_spenders_30d"), False)
            assert client.check(12, "big_spenders_30d") is True
    finally:
        replica.stop(save=False)
        sock.unlink(missing_ok=True)
        assert stop(cdc) == 0
    changes = spark.read.parquet(str(lake_dir / "orders"))  # through _spark_metadata
    assert changes.count() == 6, "every change once"
    assert sorted(r["_op"] for r in changes.collect()) == [
        "delete", "insert", "insert", "insert", "insert", "update"]  # fmt: skip


def test_the_events_table_has_gen_data_s_layout(spark: object, tmp_path: Path) -> None:
    generated = tmp_path / "gen"
    lake.generate(generated, lake.LakeParams(users=20, days=2), progress=lambda _: None)
    sunk = spark.read.parquet(str(generated / "events")).schema  # what batch reads
    from pyspark.sql.types import _parse_datatype_string

    want = _parse_datatype_string(lake.spark_ddl("events"))
    assert [(f.name, f.dataType) for f in sunk.fields] == [
        (f.name, f.dataType) for f in want.fields]  # fmt: skip
    assert all(p.name.startswith("dt=") for p in (generated / "events").iterdir())


def _s3a(spark: object, endpoint: str) -> None:
    """Point the session's s3a at moto with the test credentials (set at run time: this JVM
    may have started before the test's environment)."""
    from compute import lakefs

    conf = spark.sparkContext._jsc.hadoopConfiguration()  # type: ignore[attr-defined]
    for key, value in lakefs.s3a_settings_conf(lakefs.S3Settings(endpoint)).items():
        conf.set(key.removeprefix("spark.hadoop."), value)
    conf.set("fs.s3a.access.key", "testing")
    conf.set("fs.s3a.secret.key", "testing")


def test_sink_killed_and_restarted_writes_every_event_once(
    spark: object, s3_endpoint: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    import boto3

    env = aws_env(tmp_path)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing"
                 ).create_bucket(Bucket=BUCKET)  # fmt: skip
    topic, n = f"{topic_prefix}.events", 800
    events.ensure_topic(kafka_bootstrap, topic, 2)
    events.produce(kafka_bootstrap, topic, [events.make_event(1000 + i % 40, "view", product_id=i)
                                            for i in range(n)])  # fmt: skip
    lake_uri = f"s3a://{BUCKET}/lake"
    checkpoint = tmp_path / "checkpoint"
    cmd = [sys.executable, "-m", "compute.cli", "sink", "--sink-kafka", kafka_bootstrap,
           "--sink-topics", topic, "--lake", lake_uri, "--sink-checkpoint", str(checkpoint),
           "--sink-max-records-per-batch", "200", "--sink-trigger-seconds", "0.5",
           "--s3-endpoint", s3_endpoint]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SEG_", "AWS_"))}
    full_env.update(env, PYTHONPATH=str(REPO))
    log = tmp_path / "sink.log"
    commits = checkpoint / "events" / "commits"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    try:
        wait_for("a committed batch", lambda: len(list(commits.glob("[0-9]*"))) >= 1,
                 timeout=240, proc=proc, log=log)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = len(list(commits.glob("[0-9]*")))
    assert done_before * 200 < n, "killed half-way"
    # restarted in this process's warm session (one JVM start less), same checkpoint
    _s3a(spark, s3_endpoint)
    opts = sink.SinkOptions(kafka_bootstrap, sink.routes([topic], "cdc"), lake_uri, checkpoint)
    sink.run_once(spark, opts)
    table = spark.read.parquet(f"{lake_uri}/events")
    assert table.count() == n
    assert table.select("product_id").distinct().count() == n
    # and batch runs on this lake that only the sink wrote
    defs = tmp_path / "defs.toml"
    defs.write_text(DEFINITIONS.split("[[segment]]")[0] + "[[segment]]" +
                    DEFINITIONS.split("[[segment]]")[2])  # fmt: skip
    segments = load(defs, batch.base_params(lake_uri, spark=spark))
    got = batch.compute(spark, lake_uri, segments)
    assert set(got["viewers"]) == set(range(1000, 1040))


@pytest.mark.parametrize(
    ("topics", "message"),
    [
        (["clicks", "views"], "--sink-topics: more than one topic for table events"),
        (["clicks=bad-name"], "--sink-topics 'clicks=bad-name': the table name 'bad-name'"),
    ],
)
def test_a_bad_topic_list_names_the_option(topics: list[str], message: str) -> None:
    with pytest.raises(sink.SinkError) as err:
        sink.routes(topics, "cdc")
    assert str(err.value).startswith(message)
    assert sink.routes(["cdc.shop.orders", "clicks"], "cdc") == [
        sink.Route("cdc.shop.orders", "orders", "cdc"),
        sink.Route("clicks", "events", "events"),
    ]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("isolation.level=read_uncommitted", "isolation.level is set by the sink (read_committed"),
        ("kafka.auto.offset.reset=latest", "auto.offset.reset is set by the job's starting-"),
        ("bootstrap.servers=elsewhere:9092", "bootstrap.servers is set by the job's Kafka flag"),
    ],
)
def test_a_source_property_the_sink_sets_itself_is_refused_before_spark_starts(
    setting: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "checkpoint"
    code = compute_cli.main(["sink", "--sink-kafka", "127.0.0.1:1", "--sink-topics", "clicks",
                             "--lake", str(tmp_path / "lake"), "--sink-checkpoint",
                             str(checkpoint), "--sink-kafka-config", setting])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    key = setting.split("=")[0].removeprefix("kafka.")
    assert err.count("\n") == 1 and f"--sink-kafka-config {key}=...: {message}" in err
    assert "starting Spark" not in err
    assert not checkpoint.exists() and not (tmp_path / "lake").exists()


def test_the_sink_reads_a_sasl_broker_through_its_kafka_config(
    spark: object, sasl_kafka: SaslBroker, topic_prefix: str, tmp_path: Path
) -> None:
    from compute.stream import source_options

    topic = f"{topic_prefix}.configured"
    client = sasl_kafka.librdkafka()
    events.ensure_topic(sasl_kafka.address, topic, 1, client=client)
    sent = [events.make_event(7 + i, "view", product_id=i) for i in range(5)]
    events.produce(sasl_kafka.address, topic, sent, client=client)
    routes = sink.routes([topic], "cdc")
    wrong = source_options([("security.protocol", "BOGUS")], "--sink-kafka-config")
    opts = sink.SinkOptions(sasl_kafka.address, routes, tmp_path / "lake", tmp_path / "cp1",
                            kafka_options=wrong)  # fmt: skip
    with pytest.raises(Exception, match="security.protocol"):
        sink.run_once(spark, opts)  # the Java client refused the value: it was passed on
    java = [(f"kafka.{k}", v) for k, v in sasl_kafka.java().items()]  # the prefix is dropped
    opts = sink.SinkOptions(sasl_kafka.address, routes, tmp_path / "lake", tmp_path / "cp2",
                            kafka_options=source_options(java, "--sink-kafka-config"))  # fmt: skip
    sink.run_once(spark, opts)
    table = spark.read.parquet(str(tmp_path / "lake" / "events"))  # type: ignore[attr-defined]
    assert sorted(r.user_id for r in table.collect()) == [e["user_id"] for e in sent]
