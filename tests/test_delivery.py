"""The publisher's delivery rules, driven one step at a time: no threads, no clock, no Kafka."""

from __future__ import annotations

from pipeline.ledger import FrameTicket
from pipeline.publishing.delivery import (
    FAILURES_BEFORE_REBUILD,
    MAX_UNEXPLAINED_FAILURES,
    OVERFLOW_MEMORY_S,
    SILENT_AFTER_S,
    DeliveryState,
    Outcome,
    Send,
)
from pipeline.publishing.spool import OutgoingMessage


def message(frame_id: int, size: int = 10, event: bool = False) -> OutgoingMessage:
    return OutgoingMessage(b"cam", b"x" * size, event=event, ticket=None if event else FrameTicket("cam", 1, frame_id))


def frame_ids(items: list[Send] | list[Outcome] | list[OutgoingMessage]) -> list[int]:
    ids = []
    for item in items:
        found = item if isinstance(item, OutgoingMessage) else item.message
        assert found.ticket is not None
        ids.append(found.ticket.frame_id)
    return ids


def send_all(state: DeliveryState, now: float = 0.0) -> list[Send]:
    sends = []
    while (send := state.next_send(now)) is not None:
        sends.append(send)
    return sends


def test_messages_go_out_in_the_order_they_came_and_each_is_sent_once() -> None:
    state = DeliveryState(max_messages=100, max_bytes=10_000, stuck_after_s=60)
    assert state.accept([message(index) for index in range(5)], now=0) == []
    sends = send_all(state)
    assert frame_ids(sends) == [0, 1, 2, 3, 4]
    outcomes = [outcome for send in sends for outcome in state.delivered(send.token, now=1)]
    assert [outcome.kind for outcome in outcomes] == ["sent"] * 5
    assert state.backlog() == 0 and state.connected(now=1)
    assert state.delivered(sends[0].token, now=2) == [], "a second outcome for a message changes nothing"


def test_after_a_failure_nothing_is_sent_until_what_is_in_flight_has_come_back_then_the_retry_goes_first() -> None:
    state = DeliveryState(max_messages=100, max_bytes=10_000, stuck_after_s=60)
    state.accept([message(index) for index in range(3)], now=0)
    first, second, third = send_all(state)
    outcomes = state.failed(first.token, "transient", now=1)
    assert [outcome.kind for outcome in outcomes] == ["failed"]
    state.accept([message(3)], now=1)
    assert state.next_send(now=1) is None, "the retry would be overtaken by the messages still in flight"
    state.failed(second.token, "transient", now=2)
    state.failed(third.token, "transient", now=2)
    assert frame_ids(send_all(state, now=3)) == [0, 1, 2, 3]
    assert not state.connected(now=3)


def test_the_spool_drops_its_oldest_when_full_and_says_why() -> None:
    state = DeliveryState(max_messages=3, max_bytes=10_000, stuck_after_s=60)
    outcomes = state.accept([message(index) for index in range(5)], now=0)
    assert [(outcome.kind, outcome.reason) for outcome in outcomes] == [("dropped", "spool_full")] * 2
    assert frame_ids(outcomes) == [0, 1]
    assert state.overflowing(now=1), "a drop keeps vap unready for a while"


def test_while_deliveries_fail_the_messages_in_flight_count_against_the_bound() -> None:
    state = DeliveryState(max_messages=4, max_bytes=10_000, stuck_after_s=60)
    state.accept([message(0), message(1)], now=0)
    first, _second = send_all(state)
    state.accept([message(2), message(3)], now=0)
    assert state.accept([message(4)], now=0) == [], "a healthy broker costs nothing: in flight is not spooled"
    outcomes = state.failed(first.token, "transient", now=1)
    dropped = [outcome for outcome in outcomes if outcome.kind == "dropped"]
    assert frame_ids(dropped) == [0], "one is still in flight, so only three may wait: the oldest goes"
    assert state.backlog() == 4


def test_a_message_kafka_rejects_is_dropped_at_once_and_one_failing_for_no_known_reason_after_a_bound() -> None:
    state = DeliveryState(max_messages=100, max_bytes=10_000, stuck_after_s=60)
    state.accept([message(0)], now=0)
    (send,) = send_all(state)
    rejected = state.failed(send.token, "rejected", now=1)
    assert [(outcome.kind, outcome.reason) for outcome in rejected] == [("failed", None),
                                                                        ("dropped", "publish_rejected")]
    state.accept([message(1)], now=1)
    kinds: list[str] = []
    for attempt in range(MAX_UNEXPLAINED_FAILURES):
        (send,) = send_all(state, now=2 + attempt)
        kinds += [outcome.kind for outcome in state.failed(send.token, "unexplained", now=2 + attempt)]
    assert kinds.count("failed") == MAX_UNEXPLAINED_FAILURES and kinds[-1] == "dropped"
    assert state.backlog() == 0


def test_a_producer_that_keeps_failing_is_replaced_and_its_late_failures_do_not_count_against_the_new_one() -> None:
    state = DeliveryState(max_messages=100, max_bytes=10_000, stuck_after_s=60)
    state.accept([message(index) for index in range(FAILURES_BEFORE_REBUILD)], now=0)
    for send in send_all(state, now=0):
        assert state.wants_new_producer(now=1, have_producer=True) is None
        state.failed(send.token, "transient", now=1)
    assert state.wants_new_producer(now=1, have_producer=True) == "failing"
    state.new_generation()
    assert state.wants_new_producer(now=5, have_producer=True) is None
    (old,) = send_all(state, now=5)[:1]
    state.new_generation()
    assert next(outcome.kind for outcome in state.take_back_stale(now=6)) == "failed"
    assert state.failed(old.token, "transient", now=7) == [], "already taken back: its late failure is ignored"
    assert frame_ids(send_all(state, now=8)) == [0, 1, 2]


def test_a_producer_that_goes_silent_with_messages_in_flight_is_stuck() -> None:
    state = DeliveryState(max_messages=100, max_bytes=10_000, stuck_after_s=30)
    state.accept([message(0)], now=0)
    (send,) = send_all(state, now=0)
    state.delivered(send.token, now=0.1)
    state.accept([message(1)], now=1)
    send_all(state, now=1)
    assert state.connected(now=1 + SILENT_AFTER_S / 2)
    assert not state.connected(now=1 + SILENT_AFTER_S + 1), "a silent broker is not connected"
    assert state.wants_new_producer(now=20, have_producer=True) is None
    assert state.wants_new_producer(now=32, have_producer=True) == "stuck"


def test_zone_events_wait_for_their_topic_while_results_go_on_and_are_dropped_when_it_is_missing() -> None:
    state = DeliveryState(max_messages=100, max_bytes=10_000, stuck_after_s=60)
    state.accept([message(0, event=True), message(1), message(2, event=True)], now=0)
    assert frame_ids(send_all(state, now=0)) == [1], "results pass the events held back"
    check, dropped = state.events_topic_check_due(now=0, flushing=False)
    assert check and dropped == []
    assert state.events_topic_check_due(now=0, flushing=False) == (False, []), "one lookup at a time"
    state.events_topic_checked(there=False, now=1)
    check, dropped = state.events_topic_check_due(now=2, flushing=False)
    assert not check and [(outcome.kind, outcome.reason) for outcome in dropped] == [
        ("dropped", "publish_rejected")] * 2
    state.accept([message(3, event=True)], now=40)
    check, _ = state.events_topic_check_due(now=40, flushing=False)
    assert check, "a missing topic is looked up again later"
    state.events_topic_checked(there=True, now=41)
    sends = send_all(state, now=41)
    assert [send.message.event for send in sends] == [True]


def test_a_stop_takes_everything_unsettled_oldest_first() -> None:
    state = DeliveryState(max_messages=100, max_bytes=10_000, stuck_after_s=60)
    state.accept([message(index) for index in range(4)], now=0)
    sends = send_all(state)
    state.failed(sends[2].token, "transient", now=1)
    assert frame_ids(state.undelivered()) == [0, 1, 2, 3]
    assert state.backlog() == 0


def test_the_inbox_is_bounded_in_bytes_and_drops_its_oldest_when_the_loop_falls_behind() -> None:
    state = DeliveryState(max_messages=100, max_bytes=10_000, stuck_after_s=60, inbox_max_bytes=250)
    assert state.offer([message(0, size=100)], now=0) == [] and not state.overflowing(now=0)
    dropped = state.offer([message(index, size=100) for index in range(1, 5)], now=1)
    assert [(outcome.reason, outcome.message.ticket.frame_id if outcome.message.ticket else None)
            for outcome in dropped] == [("publish_queue_full", 0), ("publish_queue_full", 1), ("publish_queue_full", 2)]
    assert state.overflowing(now=1), "results lost to the inbox's bound make vap unready, as the spool's do"
    assert not state.overflowing(now=1 + OVERFLOW_MEMORY_S)
    assert state.backlog() == 2 and state.spooled() == 0
    assert state.admit(now=0) == []
    assert state.spooled() == 2 and not state.has_arrivals()
    assert frame_ids(send_all(state)) == [3, 4]
