from sidecar.shm.build import build_if_stale

# Before any test imports the C extension: a build older than sidecar/shm/_native.c would
# send the code down its Python paths (and the tests of the C ones would fail).
build_if_stale()

pytest_plugins = [
    "tests.kafka_fixture",
    "tests.aerospike_fixture",
    "tests.sidecar_fixtures",
    "tests.mongo_fixture",
    "tests.s3_fixture",
    "tests.broker_faults",
]
