"""One way for a test module to hold a local Spark session (compute.spark.build_session)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def spark_session(app_name: str, conf: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Yield a session for a module-scoped fixture (`yield from spark_session(...)`); stopped
    after the module, so the next module's session can set its own conf."""
    from compute.spark import build_session

    session = build_session(app_name=app_name, conf=conf)
    try:
        yield session
    finally:
        session.stop()
