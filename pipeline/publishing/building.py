"""From a frame's result (and its zone events) to encoded Kafka messages.

This runs on the analytics stage's threads, not the publisher's: the publisher's inbox then holds bytes,
never pixels, and the frame's image is released as soon as its message and snapshot exist. Encoding
for many streams also spreads over those threads instead of queueing on one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from pipeline.analytics.zones import ZoneEvent
from pipeline.config import SnapshotConfig
from pipeline.frames import Frame, FrameResult
from pipeline.ledger import FrameTicket
from pipeline.ops.metrics import PipelineMetrics, StreamMetrics
from pipeline.ops.repeated_log import RepeatedErrorLog
from pipeline.publishing.messages import build_event, build_message, detections_by_label, encode
from pipeline.publishing.snapshot_topic import Picture, PictureEncoder
from pipeline.publishing.snapshots import SnapshotWriter
from pipeline.publishing.spool import OutgoingMessage

log = logging.getLogger(__name__)


class MessageBuilder:
    """Builds the `vap.frame.v1` and `vap.event.v1` messages; safe to call from several threads at once
    as long as each stream is built by one thread at a time (its snapshots are kept per stream)."""

    def __init__(self, model_name: str, snapshots: SnapshotConfig,
                 pictures: Callable[[Picture], None] | None = None, metrics: PipelineMetrics | None = None) -> None:
        self._model_name = model_name
        self._snapshots = SnapshotWriter(snapshots) if snapshots.dir is not None else None
        self._snapshot_errors = RepeatedErrorLog(log)
        self._pictures = pictures
        self._snapshot_failures = None if metrics is None else metrics.snapshot_write_failures
        self._encoder = PictureEncoder(snapshots) if pictures is not None else None

    def frame_message(self, result: FrameResult, series: StreamMetrics | None) -> OutgoingMessage:
        """Raises when the result cannot be encoded (the caller drops the frame as a build error)."""
        frame = result.frame
        total_s = time.monotonic() - frame.captured_monotonic
        message = build_message(result, self._model_name, datetime.now(timezone.utc), total_s * 1000)
        snapshot_uri = self._write_snapshot(result)
        self._offer_picture(result)
        if snapshot_uri is not None:
            message["snapshot"] = {"uri": snapshot_uri}
        return self.encoded(frame, encode(message), total_s, detections_by_label(message), series)

    @staticmethod
    def encoded(frame: Frame, value: bytes, total_s: float, labels: Iterable[tuple[str, int]],
                series: StreamMetrics | None) -> OutgoingMessage:
        """A frame's message, built here or by a message worker (`pipeline.publishing.message_pool`), and its
        stream's latency and detection counts."""
        outgoing = OutgoingMessage(key=frame.stream_id.encode(), value=value,
                                   ticket=FrameTicket(frame.stream_id, frame.run, frame.frame_id),
                                   built_monotonic=time.monotonic())
        if series is not None:
            series.end_to_end_latency.observe(total_s)
            for label, found in labels:
                series.detections(label).inc(found)
        return outgoing

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def needs_images(self) -> bool:
        """Whether messages need their frame's pixels (snapshots), which a message worker does not get."""
        return self._snapshots is not None or self._encoder is not None

    def event_message(self, event: ZoneEvent, series: StreamMetrics | None) -> OutgoingMessage:
        return self.encoded_event(event, encode(build_event(event, datetime.now(timezone.utc))), series)

    @staticmethod
    def encoded_event(event: ZoneEvent, value: bytes, series: StreamMetrics | None) -> OutgoingMessage:
        """An event's message, built here or by an analytics worker (`pipeline.analytics.processes`), and its
        stream's event count."""
        if series is not None:
            series.zone_events(event.zone_id, event.event, event.label).inc()
        return OutgoingMessage(event.stream_id.encode(), value, event=True, built_monotonic=time.monotonic())

    def _write_snapshot(self, result: FrameResult) -> str | None:
        """A thumbnail that cannot be written (a full disk, say) costs the picture, not the frame's message."""
        if self._snapshots is None:
            return None
        try:
            return self._snapshots.write(result)
        except Exception:
            if self._snapshot_failures is not None:
                self._snapshot_failures.inc()
            self._snapshot_errors.error("stream %s: cannot write the snapshot of frame %d; publishing without it",
                                        result.frame.stream_id, result.frame.frame_id, exc_info=True)
            return None

    def _offer_picture(self, result: FrameResult) -> None:
        """A picture for the snapshots topic; one that cannot be made costs the picture, not the message."""
        if self._encoder is None or self._pictures is None:
            return
        try:
            picture = self._encoder.picture(result)
        except Exception:
            self._snapshot_errors.error("stream %s: cannot encode the picture of frame %d for the snapshots topic",
                                        result.frame.stream_id, result.frame.frame_id, exc_info=True)
            return
        if picture is not None:
            self._pictures(picture)
