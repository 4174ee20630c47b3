pytest_plugins = [
    "tests.kafka_fixture",
    "tests.aerospike_fixture",
    "tests.sidecar_fixtures",
    "tests.mongo_fixture",
    "tests.s3_fixture",
    "tests.broker_faults",
]
