"""The frame ledger: one outcome per frame read, per stream run, and the metrics that say so."""

from __future__ import annotations

import logging

import pytest

from pipeline.ledger import NO_RUN, FrameTicket
from tests.fakes import Stages


def test_every_frame_read_ends_once_as_published_or_dropped_with_a_reason() -> None:
    stages = Stages()
    run = stages.add_stream("cam")
    tickets = [FrameTicket("cam", run, frame_id) for frame_id in range(4)]
    for ticket in tickets:
        stages.ledger.read(ticket)
    stages.ledger.published(tickets[0])
    stages.ledger.dropped(tickets[1], "queue_full")
    totals = stages.ledger.totals("cam")
    assert totals is not None and (totals.read, totals.published, totals.dropped, totals.in_flight) == (4, 1, 1, 2)
    stages.ledger.published(tickets[2])
    stages.ledger.dropped(tickets[3], "spool_full")
    stages.assert_settled("cam")
    assert stages.dropped("cam", "spool_full") == 1 and stages.dropped("cam", "queue_full") == 1


def test_a_second_outcome_for_a_frame_is_refused_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    stages = Stages()
    ticket = FrameTicket("cam", stages.add_stream("cam"), 0)
    stages.ledger.read(ticket)
    stages.ledger.published(ticket)
    with caplog.at_level(logging.ERROR, logger="pipeline.ledger"):
        stages.ledger.dropped(ticket, "publish_queue_full")
    assert stages.ledger.double_outcomes == 1
    assert stages.value("vap_frames_processed_total", stream="cam") == 1
    assert stages.dropped("cam", "publish_queue_full") == 0
    assert "second outcome" in caplog.text


def test_frames_of_a_removed_run_settle_there_and_never_in_the_new_run_of_the_same_id() -> None:
    stages = Stages()
    old = stages.add_stream("cam")
    late = FrameTicket("cam", old, 7)
    stages.ledger.read(late)
    stages.ledger.remove_stream("cam")
    new = stages.add_stream("cam")
    assert new != old
    stages.ledger.published(late)
    totals = stages.ledger.totals("cam")
    assert totals is not None and totals.read == 0 and totals.published == 0
    assert stages.value("vap_frames_processed_total", stream="cam") == 0, "the old run's series are not exported"


def test_frames_of_no_stream_are_not_accounted() -> None:
    stages = Stages()
    ticket = FrameTicket("warmup", NO_RUN, 0)
    stages.ledger.read(ticket)
    stages.ledger.published(ticket)
    assert stages.ledger.totals("warmup") is None and stages.ledger.double_outcomes == 0
    assert stages.value("vap_frames_read_total", stream="warmup") == 0
