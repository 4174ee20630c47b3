"""`seg-perf reliability`: the long fault runs (docs/RELIABILITY.md).

Runs the fault suite with its long variants (`-m reliability`: 10 s broker stalls, 15 s broker
outages, a 60 s soak) plus the fast variants and the fuzzers with 2,000 examples each, then
prints the soak figures. The fast variants alone are part of `./run test`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = [
    "tests/test_faults_kafka.py",
    "tests/test_faults_kill.py",
    "tests/test_faults_local.py",
    "tests/test_logdir_damage.py",
    "tests/test_poison.py",
    "tests/test_http_slow_clients.py",
    "tests/test_atomic_apply.py",
    "tests/test_faults_aerospike.py",
    "tests/test_soak.py",
    "tests/test_fuzz.py",
]


def run(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    report = out / "reliability.jsonl"
    report.unlink(missing_ok=True)
    env = {
        **os.environ,
        "SEG_RELIABILITY": "1",
        "SEG_FUZZ_EXAMPLES": os.environ.get("SEG_FUZZ_EXAMPLES", "2000"),
        "SEG_RELIABILITY_REPORT": str(report),
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES]
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if report.exists():
        print(report.read_text(), end="")
    return code
