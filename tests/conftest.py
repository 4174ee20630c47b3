import subprocess
import warnings

import pytest
from schemathesis.pytest.plugin import SchemathesisFunction

from sidecar.shm.build import build_if_stale

# Before any test imports the C extension: a build older than sidecar/shm/_native.c would
# send the code down its Python paths (and the tests of the C ones would fail). A machine
# that cannot build it still runs the rest (those tests then fail, saying so).
try:
    build_if_stale()
except (subprocess.CalledProcessError, OSError) as exc:
    warnings.warn(f"the C extension could not be built: {exc}", stacklevel=1)

pytest_plugins = [
    "tests.kafka_fixture",
    "tests.aerospike_fixture",
    "tests.sidecar_fixtures",
    "tests.mongo_fixture",
    "tests.s3_fixture",
    "tests.broker_faults",
    "tests.spark_session",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`./run test` runs two xdist workers, a test file whole on one, files in this order."""
    for item in items:
        # schemathesis's items (one per API operation) share their test's node id under
        # pytest 9 (the operation is in the name only); xdist schedules by node id, so it would
        # run one of them
        if isinstance(item, SchemathesisFunction) and item.id.params is None:
            assert item.parent is not None and item.operation_label
            item._id = item.parent.id.child(item.originalname).with_params(item.operation_label)
    # files of minutes first (the `long` marker): started last, one would run alone at the end
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
