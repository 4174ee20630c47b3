"""Retriable Kafka errors are retried within a bound (sidecar/transport/kafka.py `retrying`),
with real librdkafka error objects; the broker stall that produced UNKNOWN_LEADER_EPOCH in
the wild is replayed against a real broker in tests/test_faults_kafka.py."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from sidecar.transport.base import TransportError
from sidecar.transport.kafka import retriable, retrying


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
    ],
)
def test_leader_and_transport_errors_are_retriable(code: int) -> None:
    assert retriable(KafkaError(code))


@pytest.mark.parametrize(
    "error",
    [
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED),
        KafkaError(KafkaError.PRODUCER_FENCED),
        KafkaError(KafkaError.UNKNOWN_LEADER_EPOCH, fatal=True),
        None,
    ],
)
def test_fatal_fencing_and_other_errors_are_not(error: KafkaError | None) -> None:
    assert not retriable(error)


def test_retrying_returns_once_the_error_clears() -> None:
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_LEADER_EPOCH))
        return "offsets"

    assert retrying("reading offsets", flaky, timeout=10) == "offsets"
    assert len(calls) == 3


def test_retrying_gives_up_after_its_bound_with_one_line() -> None:
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        retrying(
            "cannot read offsets of t.deltas",
            lambda: (_ for _ in ()).throw(
                KafkaException(KafkaError(KafkaError.UNKNOWN_LEADER_EPOCH))
            ),
            timeout=0.5,
        )
    assert 0.2 < time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith("cannot read offsets of t.deltas: ") and "\n" not in message


def test_retrying_fails_at_once_on_a_non_retriable_error() -> None:
    calls = []

    def denied() -> None:
        calls.append(1)
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))

    with pytest.raises(TransportError, match="TOPIC_AUTHORIZATION_FAILED"):
        retrying("describe", denied, timeout=10)
    assert calls == [1]
