"""The Kafka client side of publishing: the producer's settings, topic set-up, how a delivery error is
classified, and closing a producer so that nothing it holds is left hanging. The publisher and the Kafka
child process both use it, so a producer behaves the same in either.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

from pipeline.config import KafkaConfig

log = logging.getLogger(__name__)

_FORCE_CLOSE_JOIN_S = 1.0

DeliveryErrorKind = Literal["transient", "rejected", "unexplained"]
_DELIVERY_ERROR_KINDS: tuple[DeliveryErrorKind, ...] = ("transient", "rejected", "unexplained")


def delivery_error_kind(error: BaseException) -> DeliveryErrorKind:
    """Whether sending the same message again can ever succeed.

    `rejected`: Kafka refuses this record or its topic (too large, invalid); every retry fails the same
    way. `transient`: the broker is away or slow, the producer itself is broken (closed, fenced, its
    producer id lost after a broker restart), or vap is not authorised yet (an ACL is the deployment's to
    fix, not the message's); time, a fix or a new producer cures that, so such a failure never costs the
    message while the spool has room. `unexplained`: the rest, non-retriable by kafka-python's own
    `retriable` flag, but not known to be the message's fault (a batch-mate of an invalid record fails so).
    An error reported by the Kafka child process carries the kind the child found.
    """
    from kafka import errors

    reported = getattr(error, "delivery_error_kind", None)
    for kind in _DELIVERY_ERROR_KINDS:
        if reported == kind:
            return kind
    rejected = (
        errors.MessageSizeTooLargeError, errors.RecordListTooLargeError, errors.InvalidRecordError,
        errors.InvalidTimestampError, errors.InvalidTopicError, errors.PolicyViolationError,
        errors.UnsupportedForMessageFormatError,
    )
    if isinstance(error, rejected):
        return "rejected"
    producer_faults = (
        errors.IllegalStateError, errors.UnknownProducerIdError, errors.OutOfOrderSequenceNumberError,
        errors.InvalidProducerEpochError, errors.ProducerFencedError, errors.InvalidProducerIdMappingError,
        errors.TransactionAbortedError,
    )
    waits = (OSError, errors.AuthorizationError, *producer_faults)
    if getattr(error, "retriable", False) or isinstance(error, waits):
        return "transient"
    return "unexplained"


class Producer(Protocol):
    """The part of `kafka.KafkaProducer` the publisher uses."""

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> Any: ...

    def close(self, timeout: float | None = None) -> None: ...


def kafka_client_settings(config: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings shared by producers, admin clients and consumers."""
    settings: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers.split(","),
        "client_id": config.client_id,
        "security_protocol": config.security_protocol,
        "request_timeout_ms": config.request_timeout_ms,
    }
    if config.sasl_mechanism is not None and config.sasl_password is not None:
        settings["sasl_mechanism"] = config.sasl_mechanism
        settings["sasl_plain_username"] = config.sasl_username
        settings["sasl_plain_password"] = config.sasl_password.get_secret_value()
    if config.security_protocol in ("SSL", "SASL_SSL"):
        settings["ssl_check_hostname"] = config.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(config, name)
            if value is not None:
                settings[name] = str(value)
    return settings


def delivery_timeout_ms(config: KafkaConfig) -> int:
    """How long kafka-python tries a message before failing it back (twice the request timeout)."""
    return config.request_timeout_ms * 2


def kafka_producer_settings(config: KafkaConfig) -> dict[str, Any]:
    """Per-stream order without duplicates on retry: acks=all, idempotence, at most 5 requests in flight."""
    acks: int | str = config.acks if config.acks == "all" else int(config.acks)
    return {
        **kafka_client_settings(config),
        "acks": acks,
        "enable_idempotence": acks in ("all", -1),
        "compression_type": None if config.compression == "none" else config.compression,
        "linger_ms": config.linger_ms,
        "delivery_timeout_ms": delivery_timeout_ms(config),
        "max_block_ms": 1000,
        "bootstrap_timeout_ms": 2000,
        "max_in_flight_requests_per_connection": 5,
    }


def make_kafka_producer(config: KafkaConfig) -> Producer:
    from kafka import KafkaProducer

    ensure_topic(config)
    producer: Producer = KafkaProducer(**kafka_producer_settings(config))
    return producer


def ensure_topic(config: KafkaConfig, topic: str | None = None) -> bool:
    """Create a topic vap writes to (the results topic unless another is named) when it is missing and
    allowed, with the configured partitions and replication; say clearly what to do when it is not.

    Returns whether the topic is there now. Raises when the cluster cannot be asked.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    name = config.topic if topic is None else topic
    admin = KafkaAdminClient(**kafka_client_settings(config), bootstrap_timeout_ms=2000)
    try:
        if name in admin.list_topics():
            return True
        if not config.create_topic:
            log.error("Kafka topic '%s' does not exist and kafka.create_topic is false: create it on the "
                      "cluster or allow vap to create it", name)
            return False
        try:
            admin.create_topics([NewTopic(name, config.partitions, config.replication)])
            log.info("created Kafka topic '%s' (%d partitions, replication %d)", name, config.partitions,
                     config.replication)
        except TopicAlreadyExistsError:
            pass
        return True
    finally:
        admin.close()


def close_kafka_producer(producer: Producer | None, timeout: float) -> None:
    """kafka-python's `close` flushes first and raises when the flush times out, before it force-closes
    the sender; the sender is then force-closed here, or its stuck batches would never fail back. A
    force-close only asks the sender thread to abort them: waiting for that thread (briefly) means that on
    return every pending message has failed back to its caller."""
    if producer is None:
        return
    try:
        producer.close(timeout=timeout)
    except Exception as error:
        log.debug("producer close: %r; forcing", error)
    sender = getattr(producer, "_sender", None)
    if sender is not None and sender.is_alive():
        sender.force_close()
        sender.join(_FORCE_CLOSE_JOIN_S)
