"""A soak: a `seg-sidecar` process serving mixed ops from several client processes while idle,
stalled and slow connections and oversize frames come and go. Reports wrong answers, errors,
p99 latency and the sidecar's RSS before and after; asserts no wrong answer, no error and RSS
flat within a bound. 5 s in the normal run, 60 s with `-m reliability`.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pyroaring import BitMap64

from sidecar.transport import LogDirTransport
from tests.logtools import free_port, publish_raw, wait_http_ok

ROOT = Path(__file__).resolve().parent.parent
SEGMENTS = {
    "dense": BitMap64(range(0, 200_000)),
    "sparse": BitMap64(range(0, 2**40, 2**40 // 50_000)),
    "small": BitMap64([3, 5, 7, 2**64 - 1]),
}

CLIENT = r"""
import json, random, sys, time
from pyroaring import BitMap64
from sidecar.client import SidecarClient
uds, seconds, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
truth = {k: BitMap64.deserialize(bytes.fromhex(v)) for k, v in json.loads(sys.stdin.read()).items()}
names = sorted(truth)
members = {k: list(v) for k, v in truth.items()}  # BitMap64 rank lookups are slow
rng = random.Random(seed)
wrong = errors = ops = 0
lat = []
def user():
    return rng.choice(members[rng.choice(names)]) if rng.random() < 0.5 else rng.randrange(2**64)
with SidecarClient(uds, timeout=10) as c:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind = rng.randrange(4)
        t0 = time.perf_counter()
        try:
            if kind == 0:
                u, s = user(), rng.choice(names)
                wrong += c.check(u, s) is not (u in truth[s])
            elif kind == 1:
                u = user()
                wrong += c.check_many(u, names) != [u in truth[s] for s in names]
            elif kind == 2:
                pairs = [(user(), rng.choice(names)) for _ in range(100)]
                wrong += c.batch(pairs) != [u in truth[s] for u, s in pairs]
            else:
                u = user()
                wrong += c.segments(u) != sorted(s for s in names if u in truth[s])
        except Exception:
            errors += 1
        lat.append(time.perf_counter() - t0)
        ops += 1
lat.sort()
print(json.dumps({"ops": ops, "wrong": wrong, "errors": errors,
                  "p99_us": lat[int(len(lat) * 0.99)] * 1e6 if lat else None}))
"""


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _nuisances(uds: str, http_port: int, rng: random.Random) -> list[socket.socket]:
    """Idle, stalled and slow connections, and an oversize frame, left open."""
    socks = []
    for _ in range(3):  # idle
        s = socket.socket(socket.AF_UNIX)
        s.connect(uds)
        socks.append(s)
    s = socket.socket(socket.AF_UNIX)  # stalled mid-frame
    s.connect(uds)
    s.sendall(struct.pack(">I", 100) + b"\x93")
    socks.append(s)
    s = socket.socket(socket.AF_UNIX)  # oversize frame: answered, then closed
    s.connect(uds)
    s.sendall(struct.pack(">I", 2 << 20) + b"x" * 64)
    socks.append(s)
    s = socket.create_connection(("127.0.0.1", http_port))  # slow HTTP headers
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    socks.append(s)
    rng.shuffle(socks)
    return socks


def _soak(seconds: float, clients: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sk", dir="/tmp"))
    publish_raw(LogDirTransport(work / "log"), SEGMENTS)
    port = free_port()
    uds = str(work / "s.sock")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "--log-dir", str(work / "log"), "--uds", uds,
         "--http", f"127.0.0.1:{port}", "--log-level", "WARNING", "--http-idle-timeout", "2"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", sidecar, 60)
        rss_before = _rss_kb(sidecar.pid)
        truth = json.dumps({k: v.serialize().hex() for k, v in SEGMENTS.items()})
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, uds, str(seconds), str(i)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(clients)
        ]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(truth)
            p.stdin.close()
        rng = random.Random(2)
        nuisances: list[socket.socket] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for s in nuisances[:3]:
                s.close()
            nuisances = nuisances[3:] + _nuisances(uds, port, rng)
            time.sleep(0.5)
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(json.loads(p.stdout.read().strip().splitlines()[-1]))
            p.wait(60)
        for s in nuisances:
            s.close()
        rss_after = _rss_kb(sidecar.pid)
        assert sidecar.poll() is None, "the sidecar died"
    finally:
        sidecar.terminate()
        sidecar.wait(30)
    return {
        "seconds": seconds,
        "clients": clients,
        "ops": sum(r["ops"] for r in results),
        "wrong": sum(r["wrong"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "p99_us": max(r["p99_us"] for r in results),
        "rss_kb_before": rss_before,
        "rss_kb_after": rss_after,
    }


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "seconds,clients",
    [pytest.param(5, 3, id="5s"), pytest.param(60, 4, id="60s", marks=pytest.mark.reliability)],
)
def test_soak_mixed_ops_with_nuisance_connections(seconds: float, clients: int) -> None:
    report = _soak(seconds, clients)
    print("soak:", json.dumps(report))
    out = os.environ.get("SEG_RELIABILITY_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"soak": report}) + "\n")
    assert report["ops"] > 0
    assert report["wrong"] == 0 and report["errors"] == 0, report
    assert report["rss_kb_after"] < report["rss_kb_before"] * 1.5 + 20_000, report
