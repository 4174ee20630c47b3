"""The C extension's one ABI check (`sidecar.shm.native`, sidecar/shm/build.py): a build
carries its source's hash (`SOURCE_HASH`); the loader refuses one built from another
`_native.c`, with one warning naming the rebuild command, and its callers then take their
Python paths."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import sidecar.shm as shm
from sidecar.replica import Replica
from sidecar.replica.forms import Forms, batch_lookup
from sidecar.server.queries import Queries
from sidecar.server.uds import UdsServer
from sidecar.shm import build
from sidecar.transport import LogDirTransport


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The loader as if nothing were loaded yet (restored afterwards)."""
    monkeypatch.setattr(shm, "_loaded", None)
    monkeypatch.setattr(shm, "_refused", None)
    monkeypatch.setattr(shm, "_warned", False)
    yield


def _install(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> None:
    """`module` as what `from . import _native` finds."""
    monkeypatch.setitem(sys.modules, "sidecar.shm._native", module)
    monkeypatch.setattr(shm, "_native", module, raising=False)


def test_this_build_carries_its_source_hash() -> None:
    assert build.source_hash() is not None  # a source checkout
    assert build.source_hash() == shm.native().SOURCE_HASH
    assert not build.stale()


def test_the_comparison() -> None:
    same = types.SimpleNamespace(SOURCE_HASH="abc")
    assert build.mismatch(same, "abc") is None
    assert build.mismatch(types.SimpleNamespace(), None) is None  # no source: installed
    why = build.mismatch(types.SimpleNamespace(SOURCE_HASH="old"), "abc")
    assert why is not None and "old" in why and "abc" in why and build.REBUILD in why
    older = build.mismatch(types.SimpleNamespace(), "abc")  # built before SOURCE_HASH existed
    assert older is not None and "unknown" in older


def test_a_source_edited_since_the_build_is_stale(tmp_path: Path) -> None:
    source = tmp_path / "_native.c"
    source.write_text("int x;\n")
    before = build.source_hash(source)
    source.write_text("int x; /* edited */\n")
    assert build.source_hash(source) != before
    assert build.source_hash(tmp_path / "absent.c") is None


def test_another_version_is_refused_with_one_warning(
    loader: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    real = shm.native()
    fake = types.ModuleType("sidecar.shm._native")
    fake.__dict__.update(real.__dict__)  # everything the real one has, but another version
    fake.SOURCE_HASH = "0123456789abcdef"  # type: ignore[attr-defined]
    monkeypatch.setattr(shm, "_loaded", None)
    _install(monkeypatch, fake)
    with caplog.at_level(logging.WARNING, logger="sidecar.shm"):
        assert shm.native_or_none() is None
        with pytest.raises(shm.ShmUnavailable, match="0123456789abcdef"):
            shm.native()  # the shared replica's writer and readers say why
        # its callers take their Python paths, without warning again
        replica = Replica(LogDirTransport(tmp_path / "log"), segments=["s*"])
        assert replica.native_local is None
        assert batch_lookup() is None
        assert Forms().native is None
        uds = UdsServer(Queries(replica), tmp_path / "s")
        assert uds.fast_check is None and uds.fast_batch is None
        assert shm.native_or_none() is None
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name == "sidecar.shm"
    ]
    assert len(warnings) == 1
    assert build.REBUILD in warnings[0].getMessage()
    assert "0123456789abcdef" in warnings[0].getMessage()


def test_the_matching_version_is_used(loader: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("sidecar.shm._native")
    fake.SOURCE_HASH = build.source_hash()  # type: ignore[attr-defined]
    _install(monkeypatch, fake)
    assert shm.native_or_none() is fake
