"""One way for a test module to hold a local Spark session (compute.spark.build_session),
and the module-scoped fixtures the Spark test modules share (a plugin: tests/conftest.py):

- `spark`: a session for the module, its app name the module's name;
- `small_lake`: a 5,000-user lake for the module, generated with the module's `LAKE_SEED`.

A module that needs its own conf defines its own `spark` (`yield from spark_session(...)`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest


def spark_session(app_name: str, conf: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Yield a session for a module-scoped fixture (`yield from spark_session(...)`); stopped
    after the module, so the next module's session can set its own conf."""
    from compute.spark import build_session

    session = build_session(app_name=app_name, conf=conf)
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture(scope="module")
def spark(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield from spark_session(request.module.__name__.rpartition(".")[2].replace("_", "-"))


@pytest.fixture(scope="module")
def small_lake(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compute import lake

    out = tmp_path_factory.mktemp("lake") / "lake"
    params = lake.LakeParams(users=5_000, seed=request.module.LAKE_SEED)
    lake.generate(out, params, progress=lambda line: None)
    return out
