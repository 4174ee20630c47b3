"""`seg-perf aerospike` (perf/aerospike.py) at a tiny size against the wire-level test server in
its own process, with the real client: both ways write every record, the server's CPU share
of each run ("server busy") and the per-round ratio's range are reported, and the report's
section shows them (and still renders results written before they existed)."""

from __future__ import annotations

from pathlib import Path

from perf.aerospike import SET, TestServerProcess, make_changes, measure, section
from publisher.aerospike_sink import AerospikeSink
from sidecar.aerospike_layout import AerospikeTarget


def test_measure_reports_server_busy_and_the_ratio_range(tmp_path: Path) -> None:
    server = TestServerProcess()
    try:
        sink = AerospikeSink.connect(AerospikeTarget([("127.0.0.1", server.port)], set_name=SET))
        try:
            res = measure(sink, make_changes(3, 300, 2_000, seed=5), rounds=2, server=server)
        finally:
            sink.close()
    finally:
        server.stop()
    assert res["memberships"] == 900 and res["records"] <= 900
    low, high = res["ratio_range"]
    assert low <= res["ratio_median"] <= high
    busy = res["server_busy"]
    assert sorted(busy) == ["client", "sink"]
    assert all(len(v) == 2 and all(x >= 0 for x in v) for v in busy.values())
    assert sum(busy["sink"]) + sum(busy["client"]) > 0  # the server did the writes
    doc = {"segments": 3, "per_segment": 300, "rounds": 2, "test server": res}
    row = next(line for line in section(doc, tmp_path, tmp_path) if line.startswith("| test"))
    assert f"| {low}-{high} |" in row
    assert "Server busy:" in "\n".join(section(doc, tmp_path, tmp_path))
    old = {k: v for k, v in res.items() if k not in ("ratio_range", "server_busy")}
    lines = section({**doc, "test server": old}, tmp_path, tmp_path)
    assert not any("Server busy:" in line for line in lines)
