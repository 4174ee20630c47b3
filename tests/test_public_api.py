"""Each package's public names (`__all__`), pinned: a change to what callers may import is a
deliberate edit here, never a side effect of moving code around."""

from __future__ import annotations

import importlib

import pytest

# package -> its __all__, as one space-separated string each
PUBLIC = {
    "sidecar": "AsyncSidecarClient BadRequest KafkaTransport LogDirTransport Replica SidecarClient",
    "sidecar.client": (
        "DEFAULT_PATH AsyncSidecarClient BadRequestError Explain NotLocalError ServerError "
        "SharedReplica SidecarClient SidecarError SidecarTimeout SidecarUnavailable UnknownOpError"
    ),
    "sidecar.replica": (
        "Audience Count Counters Engine Health LogObserver NotLocal RecoveredLog Replica "
        "SegmentState segment_filter"
    ),
    "sidecar.server": "DEFAULT_UDS Queries Result ServerOptions Sidecar serve settle",
    "sidecar.transport": (
        "TOPICS FencedError KafkaTransport LogDirTransport LogReader LogRecord LogWriter "
        "Topic Transport TransportError"
    ),
    "sidecar.fallback": "Fallback NoFallback",
    "sidecar.expr": (
        "MAX_LENGTH MAX_REFERENCES Audience Count Expr ExprError compile_arg compile_expr "
        "id_chunks parse"
    ),
    "publisher": (
        "InputError PublishResult Publisher SegmentSet SnapshotPolicy publish read_segment_set"
    ),
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_are_pinned(package: str) -> None:
    module = importlib.import_module(package)
    names = list(module.__all__)
    assert len(set(names)) == len(names), "a name listed twice"
    assert sorted(names) == sorted(PUBLIC[package].split())
    for name in names:
        assert getattr(module, name) is not None, name  # each one really importable


def test_every_package_with_public_names_is_pinned() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    declared = {
        ".".join(init.parent.relative_to(root).parts)
        for top in ("sidecar", "publisher", "compute")
        for init in (root / top).rglob("__init__.py")
        if "__all__" in init.read_text()
    }
    assert declared == set(PUBLIC)


def test_seg_publish_imports_only_what_a_publish_needs() -> None:
    """A seg-publish process (a new one per publish) imports the publisher, the replica's
    recovery and the Kafka transport, not the sidecar's servers, clients, runner or the
    Aerospike client (sidecar/lazy.py): they cost start-up time on every publish."""
    import subprocess
    import sys

    code = (
        "import sys, publisher.cli, publisher.publish, sidecar.replica.recovered, "
        "sidecar.transport.kafka; print(' '.join(sorted(sys.modules)))"
    )
    loaded = set(subprocess.check_output([sys.executable, "-c", code], text=True).split())
    assert "sidecar.replica.recovered" in loaded  # the probe works
    unwanted = {
        "aerospike",
        "publisher.aerospike_sink",
        "sidecar.client",
        "sidecar.server",
        "sidecar.replica.runner",
        "sidecar.transport.logdir",
    }
    assert loaded & unwanted == set()
