"""What the HTTP API reports about a running pipeline: its streams, its status, liveness and readiness."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.children import replacements_by_role
from pipeline.ops.http import Probe

if TYPE_CHECKING:
    from pipeline.app import Pipeline

STUCK_AFTER_S = 30.0


def list_streams(pipeline: Pipeline) -> list[dict[str, Any]]:
    now = time.monotonic()
    readers = pipeline.running_readers()
    streams = []
    for reader in readers:
        totals = pipeline.ledger.totals(reader.config.id)
        streams.append({
            "id": reader.config.id,
            "url": reader.config.redacted_url,
            "kind": reader.config.kind,
            "state": reader.state.value,
            "last_frame_age_s": None if reader.last_frame_monotonic is None
            else round(now - reader.last_frame_monotonic, 3),
            "frames_read": None if totals is None else totals.read,
            "frames_processed": None if totals is None else totals.published,
            "frames_dropped": None if totals is None else totals.dropped,
            "frames_in_flight": None if totals is None else totals.in_flight,
        })
    return streams


def status(pipeline: Pipeline) -> dict[str, Any]:
    """`frames_processed`: frames published by the streams running now, as `/metrics` and the stream list
    count them. `helper_processes`: how many of each kind run now (a worker replaced after it died is missing
    until its replacement starts); `helper_replacements`: how many of each kind were replaced since the start."""
    publisher = pipeline.publisher
    stream_ids = [reader.config.id for reader in pipeline.running_readers()]
    published = sum(totals.published for stream_id in stream_ids
                    if (totals := pipeline.ledger.totals(stream_id)) is not None)
    return {
        "version": __version__,
        "uptime_s": round(time.monotonic() - pipeline.started_monotonic, 1),
        "ready": pipeline.ready,
        "model": None if pipeline.detector is None else {
            "name": pipeline.detector.name, "task": pipeline.detector.task,
            "device": ", ".join(worker.device for worker in pipeline.workers) or pipeline.detector.device,
            "runtime": pipeline.detector.runtime,
        },
        "streams": len(stream_ids),
        "frames_processed": published,
        "kafka": None if publisher is None else {
            "topic": pipeline.config.kafka.topic, "connected": publisher.connected, "backlog": publisher.backlog()
        },
        "helper_processes": {role: len(pids) for role, pids in pipeline.helper_pids.items() if pids},
        "helper_replacements": replacements_by_role(pipeline.helpers),
    }


def health(pipeline: Pipeline) -> Probe:
    stuck = pipeline.heartbeats.stuck(STUCK_AFTER_S)
    dead = pipeline.heartbeats.dead()
    stopping = pipeline.stopping
    if not stopping:
        if not all(worker.is_alive() for worker in pipeline.workers):
            dead.append("inference")
        if pipeline.analytics is not None and not pipeline.analytics.is_alive():
            dead.append("analytics")
        if pipeline.publisher is not None and not pipeline.publisher.is_alive():
            dead.append("publisher")
    ok = not stuck and not dead
    return Probe(ok, {"status": "ok" if ok else "failing", "stuck": stuck, "dead": sorted(set(dead))})


def readiness(pipeline: Pipeline) -> Probe:
    streams = {
        entry["id"]: {"state": entry["state"], "last_frame_age_s": entry["last_frame_age_s"]}
        for entry in pipeline.list_streams()
    }
    publisher = pipeline.publisher
    spool_limit = pipeline.config.kafka.spool.max_messages
    overflowing = publisher is not None and publisher.overflowing()
    kafka_ok = publisher is not None and not overflowing
    ready = pipeline.ready and kafka_ok
    body = {
        "ready": ready,
        "model_warm": pipeline.ready,
        "kafka": None if publisher is None else {
            "connected": publisher.connected, "backlog": publisher.backlog(), "spool_limit": spool_limit,
            "dropping": overflowing,
        },
        "streams": streams,
    }
    return Probe(ready, body)
