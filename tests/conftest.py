import subprocess
import warnings

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
