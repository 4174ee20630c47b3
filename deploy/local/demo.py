"""The demo (`./run demo`): the whole platform on this machine, end to end.

gen-data -> Spark batch -> seg-publish to a log directory -> seg-sidecar -> checks over the
Unix socket and HTTP -> a table of answers and latencies -> a change in MongoDB reaching the
sidecar (seg-compute cdc -> Kafka -> seg-compute sink -> lake -> batch -> publish) -> clean
stop.

MongoDB cannot be installed on these machines: the MongoDB step starts the project's
wire-level test server (tests/mongo_server) and a local Kafka broker (deploy/local/kafka).
`--no-mongo` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pyroaring import BitMap64

from sidecar.client import SidecarClient

ROOT = Path(__file__).resolve().parents[2]
# The MongoDB step runs the wire-level test server and reads topics with tests/ helpers
# (no MongoDB server can be installed here); tests/ is not part of the installed package.
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def run(*cmd: str) -> None:
    started = time.monotonic()
    subprocess.run([str(BIN / cmd[0]), *cmd[1:]], check=True)
    print(f"   ({time.monotonic() - started:.1f} s)", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_records(kafka: str, n: int, cdc: subprocess.Popen) -> bool:
    from tests.cdc_tools import read_topic

    deadline = time.monotonic() + 120
    while len(read_topic(kafka, "cdc.shop.orders")) < n:
        if time.monotonic() > deadline or cdc.poll() is not None:
            print("   cdc did not deliver the changes", file=sys.stderr)
            return False
        time.sleep(0.2)
    return True


def mongo_step(work: Path, log_dir: Path, sock: Path) -> bool:
    """A new order in MongoDB -> cdc -> Kafka -> sink -> lake -> batch -> publish -> sidecar."""
    import datetime as dt

    import pymongo

    kafka_data = work / "kafka"
    up = subprocess.run([str(ROOT / "deploy" / "local" / "kafka"), "up", "--data",
                         str(kafka_data), "--owner-pid", str(os.getpid())],
                        capture_output=True, text=True, check=True)  # fmt: skip
    kafka = up.stdout.strip().splitlines()[-1]
    mongod = subprocess.Popen([sys.executable, "-m", "tests.mongo_server"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    uri = (mongod.stdout.readline() if mongod.stdout else "").strip()
    print(f"   Kafka {kafka}; MongoDB test server {uri}")
    user, now = 424242, dt.datetime.now(dt.UTC)
    orders = pymongo.MongoClient(uri).shop.orders
    orders.insert_one({"_id": 1, "user_id": user, "amount": 300.0,
                       "ts": now - dt.timedelta(days=2), "category": "books"})  # fmt: skip
    cdc = subprocess.Popen([str(BIN / "seg-compute"), "cdc", "--mongo", uri, "--db", "shop",
                            "--collections", "orders", "--cdc-kafka", kafka,
                            "--progress-seconds", "60"])  # fmt: skip
    try:
        if not wait_records(kafka, 1, cdc):  # the copy of the first order
            return False
        with SidecarClient(str(sock)) as client:
            before = client.check(user, "mongo_big_spenders_30d")
        print(f"   user {user} in mongo_big_spenders_30d before: {before}")
        orders.insert_one({"_id": 2, "user_id": user, "amount": 250.0,
                           "ts": now - dt.timedelta(hours=3), "category": "toys"})  # fmt: skip
        print("   inserted a second order: 300 + 250 >= 500")
        if not wait_records(kafka, 2, cdc):  # the insert, streamed
            return False
        lake, out = work / "cdc-lake", work / "cdc-segments"
        run("seg-compute", "sink", "--sink-kafka", kafka, "--sink-topics", "cdc.shop.orders",
            "--lake", str(lake), "--sink-checkpoint", str(work / "cdc-checkpoint"),
            "--sink-once")  # fmt: skip
        run("seg-compute", "batch", "--lake", str(lake), "--definitions",
            str(ROOT / "deploy" / "local" / "cdc_segments.toml"), "--out", str(out))  # fmt: skip
        run("seg-publish", "--input", str(out), "--log-dir", str(log_dir), "--quiet")
        with SidecarClient(str(sock)) as client:
            deadline = time.monotonic() + 10
            while (after := client.check(user, "mongo_big_spenders_30d")) is not True:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        print(f"   user {user} in mongo_big_spenders_30d after: {after}")
        return after is True
    finally:
        cdc.send_signal(signal.SIGTERM)
        cdc.wait(30)
        mongod.terminate()
        mongod.wait(10)
        subprocess.run([str(ROOT / "deploy" / "local" / "kafka"), "down", "--data",
                        str(kafka_data)], capture_output=True, check=False)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=50_000, help="users in the synthetic lake")
    parser.add_argument("--workdir", help="keep everything here (default: a temp directory)")
    parser.add_argument("--no-mongo", action="store_true", help="skip the MongoDB step")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="seg-demo-"))
    lake, out, log_dir, state = work / "lake", work / "segments", work / "log", work / "state"
    sock = work / "run" / "sidecar.sock"
    port = free_port()
    definitions = ROOT / "compute" / "definitions" / "example.toml"

    step(f"1. synthetic lake: {args.users:,} users -> {lake}")
    run("seg-compute", "gen-data", "--out", str(lake), "--users", str(args.users))
    step("2. Spark batch: segment definitions -> segment set")
    run(
        "seg-compute",
        "batch",
        "--lake",
        str(lake),
        "--definitions",
        str(definitions),
        "--out",
        str(out),
    )
    step("3. publish the segment set to the log")
    run("seg-publish", "--input", str(out), "--log-dir", str(log_dir), "--quiet")
    step("4. start the sidecar")
    env = {**os.environ, "SEG_LOG_LEVEL": "warning"}
    sidecar = subprocess.Popen(
        [
            str(BIN / "seg-sidecar"),
            "--log-dir",
            str(log_dir),
            "--uds",
            str(sock),
            "--http",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
        ],
        env=env,
    )
    try:
        started = time.monotonic()
        while True:
            try:
                if http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if sidecar.poll() is not None or time.monotonic() - started > 60:
                print("sidecar did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(f"   ready in {time.monotonic() - started:.2f} s: uds {sock}, http 127.0.0.1:{port}")

        step("5. checks over the Unix socket and HTTP")
        manifest = json.loads((out / "manifest.json").read_text())
        segments = sorted(manifest["segments"])
        members = {
            s: BitMap64.deserialize((out / manifest["segments"][s]["file"]).read_bytes())
            for s in segments
        }
        users = sorted({m.min() for m in members.values() if m} | {1, 2**63 + 5})[:6]
        print(
            f"   {'user':>20}  {'segment':<22} {'uds':>6} {'http':>6} {'truth':>6} "
            f"{'uds us':>8} {'http us':>8}"
        )
        with SidecarClient(str(sock)) as client:
            for user in users:
                for segment in segments[:4] + ["never_published"]:
                    t0 = time.perf_counter()
                    via_uds = client.check(user, segment)
                    t1 = time.perf_counter()
                    _, body = http_get(
                        f"http://127.0.0.1:{port}/v1/check?user={user}&segment={segment}"
                    )
                    t2 = time.perf_counter()
                    truth = (user in members[segment]) if segment in members else None
                    print(
                        f"   {user:>20}  {segment:<22} {via_uds!s:>6} {body['member']!s:>6} "
                        f"{truth!s:>6} {(t1 - t0) * 1e6:>8.0f} {(t2 - t1) * 1e6:>8.0f}"
                    )
            n = 20_000
            t0 = time.perf_counter()
            for i in range(n):
                client.check(users[i % len(users)], segments[i % len(segments)])
            per = (time.perf_counter() - t0) / n * 1e6
            batch = [[users[i % len(users)], segments[i % len(segments)]] for i in range(1000)]
            t0 = time.perf_counter()
            client.batch(batch)
            batch_us = (time.perf_counter() - t0) * 1e6
            status = client.status()
        print(f"\n   {n:,} sequential socket checks: {per:.1f} us each (mean, round trip)")
        print(f"   one batch of 1,000 checks: {batch_us:.0f} us")
        print(
            f"   sidecar holds {status['segments']} segments, {status['memberships']:,} memberships"
        )
        mongo_ok = True
        if not args.no_mongo:
            step("6. a change in MongoDB -> cdc -> Kafka -> sink -> lake -> batch -> sidecar")
            mongo_ok = mongo_step(work, log_dir, sock)
    finally:
        step("7. stop the sidecar (SIGTERM: checkpoint, clean exit)")
        sidecar.send_signal(signal.SIGTERM)
        code = sidecar.wait(timeout=30)
        print(f"   exit code {code}; checkpoint: {sorted(p.name for p in state.glob('*'))}")
    print(f"\ndemo files in {work}")
    return 0 if code == 0 and mongo_ok else 1


if __name__ == "__main__":
    sys.exit(main())
