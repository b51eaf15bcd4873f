"""What each delivery outcome means for the metrics and for the frame's ledger entry."""

from __future__ import annotations

import logging
import time
from collections import Counter

from pipeline.ledger import FrameLedger
from pipeline.ops.metrics import PipelineMetrics
from pipeline.ops.repeated_log import RepeatedErrorLog
from pipeline.publishing.delivery import Outcome

log = logging.getLogger("pipeline.publishing.publisher")


class DeliveryAccounting:
    """Counts outcomes (`vap_kafka_messages_total`), settles frames in the ledger (a frame's message sent:
    published; dropped: dropped with the outcome's reason) and logs losses, once per 10 s per reason.

    Called from the publisher's loop and from the Kafka client's callbacks, never holding the publisher's
    lock: the ledger has its own.
    """

    def __init__(self, ledger: FrameLedger, metrics: PipelineMetrics) -> None:
        self._ledger = ledger
        self._metrics = metrics
        self._publish_seconds = metrics.stage_seconds.labels(stage="publish")
        self._drop_logs: dict[str, RepeatedErrorLog] = {}

    def record(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        now = time.monotonic()
        counts = Counter(outcome.kind for outcome in outcomes)
        for kind, count in counts.items():
            self._metrics.kafka_outcomes[kind].inc(count)
        for outcome in outcomes:
            message = outcome.message
            if outcome.kind == "sent":
                self._metrics.kafka_send_latency.observe(outcome.waited_s)
                if message.ticket is not None:
                    self._ledger.published(message.ticket)
                    if message.built_monotonic:
                        self._publish_seconds.observe(now - message.built_monotonic)
            elif outcome.kind == "dropped":
                reason = outcome.reason or "publish_rejected"
                if message.ticket is not None:
                    self._ledger.dropped(message.ticket, reason)
                stream = message.key.decode(errors="replace")
                what = "a zone event" if message.event else f"a message of stream {stream}"
                self._drop_log(reason).error("%s (%d bytes) dropped: %s (%s)", what, message.size, reason,
                                             outcome.detail)

    def _drop_log(self, reason: str) -> RepeatedErrorLog:
        found = self._drop_logs.get(reason)
        if found is None:
            found = self._drop_logs.setdefault(reason, RepeatedErrorLog(log))
        return found
