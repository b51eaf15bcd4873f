"""The publisher's delivery rules as a state machine: no threads, no locks, no clock and no Kafka inside.

The publisher's loop feeds it what happens (messages accepted, a send's outcome, a producer replaced, the
events topic looked up), always with the time, and asks it what to send next. Calls that settle messages
return `Outcome`s, which the loop turns into metrics and ledger entries. Every rule about order, retries,
bounds and what counts as lost lives here, where a test can drive it one step at a time.

Where a message is:

    offer ──> inbox ──admit──> spool ──next_send──> in flight ──delivered──> sent
                                 ^                      │
                                 └──── failed (kept) <──┘   rejected, or too many unexplained failures
                                                            ──> dropped

The inbox is what other threads hand over between two turns of the loop, bounded in bytes (messages differ a
hundredfold in size: an empty frame against 300 masks); when it is full its oldest message is dropped.

Bounds: the spool is bounded by count and bytes, and when full the oldest message goes first (a
dashboard is better served by the newest results than by a backlog it will never catch up on). While
deliveries fail, messages in flight count against the bounds too (a dead broker holds them until they fail
back); while deliveries succeed they do not, so a healthy broker never costs a message however small the
bounds. At most half of each bound is in flight at once.

Order: after a result's delivery fails, nothing more is sent until every message in flight has come back,
and failed messages go back to the spool in sequence order, so a retry is not overtaken by the newer
messages of its stream. Zone events have a lane of their own, held back while their topic is not known to
be there (`_EventsTopic`), so that a problem with the events topic never holds up frame results.

The spool's log (`kafka.spool.dir`): with `journal` on, the machine also lists what the log must record, for
the loop to write before it sends (`take_journal`): every message as it enters the spool, and every
message's settlement (sent, or dropped for good). A failed try settles nothing: the message stays logged.
At a start, `restore` takes the log's unsettled messages back with their own sequence numbers, and new
messages continue after them.

Producers: each producer is a generation. One that keeps failing, or that has gone silent with messages
in flight, is to be replaced (`wants_new_producer`); the failures a replaced producer reports afterwards (its
aborted batches) put the messages back without counting against the new one.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from pipeline.publishing.kafka_client import DeliveryErrorKind
from pipeline.publishing.spool import OutgoingMessage, Spool

MAX_IN_FLIGHT = 1000
FAILURES_BEFORE_REBUILD = 3
MAX_UNEXPLAINED_FAILURES = 5
SILENT_AFTER_S = 5.0  # no outcome for this long with messages in flight: the broker is not there
OVERFLOW_MEMORY_S = 5.0  # how long a spool overflow keeps vap unready
EVENTS_FIRST_BACKOFF_S = 1.0
EVENTS_MAX_BACKOFF_S = 30.0
MISSING_TOPIC_RECHECK_S = 30.0

OutcomeKind = Literal["sent", "failed", "dropped"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a message: `sent` (acknowledged), `failed` (one try failed; the message is kept for
    another unless a `dropped` outcome for it follows) or `dropped` for good, with the ledger's reason."""

    kind: OutcomeKind
    message: OutgoingMessage
    reason: str | None = None
    detail: str = ""
    waited_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Send:
    """A message to hand to the current producer; its outcome comes back with `token`."""

    token: int
    message: OutgoingMessage


@dataclass(frozen=True, slots=True)
class _InFlight:
    message: OutgoingMessage
    generation: int
    sent_at: float


@dataclass
class _EventsTopic:
    """Whether zone events may go out now.

    `unchecked` -> `checking` (the topic is looked up, and created like the results topic, by the loop) ->
    `ready`, or `missing` when it is not there and may not be created. A failed event sends it back to
    `unchecked` after a backoff, and the next try sends one event alone (`probing`): with the topic's
    metadata missing, each send blocks the Kafka client for max_block_ms.
    """

    state: Literal["unchecked", "checking", "ready", "missing"] = "unchecked"
    not_before: float = 0.0
    backoff_s: float = EVENTS_FIRST_BACKOFF_S
    probing: bool = True
    in_flight: int = 0

    def may_send(self, now: float, flushing: bool) -> bool:
        """While a stop flushes, the backoff no longer holds events back: it is their last chance."""
        due = flushing or now >= self.not_before
        return self.state == "ready" and due and not (self.probing and self.in_flight)

    def delivered(self) -> None:
        self.probing = False
        self.backoff_s = EVENTS_FIRST_BACKOFF_S

    def failed(self, now: float) -> None:
        """Events that were in flight together fail together: only the first failure of a round moves the
        backoff on, or one blip would leave the events waiting the longest backoff."""
        if self.state == "ready":
            self.state = "unchecked"
        self.probing = True
        if now >= self.not_before:
            self.not_before = now + self.backoff_s
            self.backoff_s = min(EVENTS_MAX_BACKOFF_S, self.backoff_s * 2)


class DeliveryState:
    """Every message between its acceptance and its outcome. Not thread-safe: the loop holds a lock."""

    def __init__(self, max_messages: int, max_bytes: int, stuck_after_s: float, now: float = 0.0,
                 inbox_max_bytes: int = 16 * 2**20, journal: bool = False) -> None:
        self._inbox: deque[OutgoingMessage] = deque()
        self._inbox_bytes = 0
        self._inbox_max_bytes = inbox_max_bytes
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._spool = Spool(max_messages, max_bytes)
        self._in_flight: dict[int, _InFlight] = {}
        self._in_flight_bytes = 0
        self._max_in_flight = max(1, min(MAX_IN_FLIGHT, max_messages // 2))
        self._max_in_flight_bytes = max_bytes // 2
        self._stuck_after_s = stuck_after_s
        self._tokens = itertools.count()
        self._sequence = itertools.count()
        self._generation = 0
        self._consecutive_failures = 0
        self._failing = False
        self._draining = False
        self._connected = False
        self._last_outcome_at = now
        self._overflowed_at: float | None = None
        self._events = _EventsTopic()
        self._journal = journal
        self._to_log: list[OutgoingMessage] = []
        self._to_settle: list[int] = []

    # What is there

    def backlog(self) -> int:
        """Messages not yet settled: in the inbox, spooled or in flight."""
        return len(self._inbox) + len(self._spool) + len(self._in_flight)

    def in_flight(self) -> int:
        return len(self._in_flight)

    def has_arrivals(self) -> bool:
        return bool(self._inbox)

    def spooled(self) -> int:
        return len(self._spool)

    def connected(self, now: float) -> bool:
        """Whether the broker acknowledges messages: the last delivery succeeded and the broker has not gone
        silent since. A broker that died answers nothing, and kafka-python fails the messages it holds only
        after its request timeout (about half a minute), so silence is the first sign."""
        return self._connected and self.silent_for(now) < SILENT_AFTER_S

    def overflowing(self, now: float) -> bool:
        """Whether messages are being lost to the spool's bounds: one was dropped lately, or the broker is
        away and the backlog has reached the bound (with the broker there, a backlog over the bound is only
        messages in flight, which do not count against it)."""
        if self._overflowed_at is not None and now - self._overflowed_at < OVERFLOW_MEMORY_S:
            return True
        return not self.connected(now) and self.backlog() >= self._max_messages

    def silent_for(self, now: float) -> float:
        """How long the oldest message in flight has waited with no outcome of any message since; 0 when
        nothing is in flight."""
        oldest = next(iter(self._in_flight.values()), None)
        return 0.0 if oldest is None else now - max(oldest.sent_at, self._last_outcome_at)

    def holds_through(self, sequence: int) -> bool:
        """Whether a message numbered up to `sequence` is still unsettled here (spooled or in flight)."""
        first = self._spool.first_sequence()
        return (first is not None and first <= sequence) or any(
            record.message.sequence <= sequence for record in self._in_flight.values())

    # Messages in

    def offer(self, messages: Iterable[OutgoingMessage], now: float) -> list[Outcome]:
        """Messages handed over by other threads, waiting for the loop's next turn. Messages lost to the inbox's
        bound count as an overflow too: results are being lost."""
        dropped: list[Outcome] = []
        for message in messages:
            self._inbox.append(message)
            self._inbox_bytes += message.size
        while self._inbox_bytes > self._inbox_max_bytes and len(self._inbox) > 1:
            oldest = self._inbox.popleft()
            self._inbox_bytes -= oldest.size
            dropped.append(Outcome("dropped", oldest, "publish_queue_full", "the publisher's inbox is full"))
        if dropped:
            self._overflowed_at = now
        return dropped

    def admit(self, now: float) -> list[Outcome]:
        """Everything the inbox holds into the spool."""
        arrived = list(self._inbox)
        self._inbox.clear()
        self._inbox_bytes = 0
        return self.accept(arrived, now)

    def accept(self, messages: Iterable[OutgoingMessage], now: float) -> list[Outcome]:
        """Spool new messages (stamped with their sequence) within the bounds."""
        dropped: list[Outcome] = []
        for message in messages:
            if message.size > self._max_bytes:
                dropped.append(Outcome("dropped", replace(message, sequence=next(self._sequence)), "publish_rejected",
                                       f"larger than kafka.spool.max_bytes ({self._max_bytes})"))
                continue
            stamped = replace(message, sequence=next(self._sequence), logged=self._journal)
            if self._journal:
                self._to_log.append(stamped)
            dropped += self._spool_dropped(self._spool.append(stamped), now)
        return self._settling(dropped + self._trim(now))

    def restore(self, messages: Iterable[OutgoingMessage], now: float, next_sequence: int = 0) -> list[Outcome]:
        """The previous run's undelivered messages (in sequence order), ahead of anything new; new messages are
        numbered from `next_sequence` on."""
        restored = list(messages)
        if restored:
            next_sequence = max(next_sequence, restored[-1].sequence + 1)
        self._sequence = itertools.count(max(next_sequence, next(self._sequence)))
        return self._settling(self._spool_dropped(self._spool.put_back(restored), now))

    def drop_spooled_through(self, sequence: int, now: float, detail: str) -> list[Outcome]:
        """Drop the spooled messages numbered up to `sequence` (the log on disk is at its bound)."""
        dropped = [Outcome("dropped", message, "spool_full", detail) for message in self._spool.drop_through(sequence)]
        if dropped:
            self._overflowed_at = now
        return self._settling(dropped)

    def take_journal(self) -> tuple[list[OutgoingMessage], list[int]]:
        """What the spool's log must record: messages to add, then sequence numbers settled since last time."""
        appended, settled = self._to_log, self._to_settle
        self._to_log, self._to_settle = [], []
        return appended, settled

    # Sending

    def next_send(self, now: float, flushing: bool = False) -> Send | None:
        """The next message for the current producer, or None while sends must wait (a failure's retry must
        not be overtaken, or enough is in flight)."""
        if self._draining and self._in_flight:
            return None
        self._draining = False
        if len(self._in_flight) >= self._max_in_flight or self._in_flight_bytes >= self._max_in_flight_bytes:
            return None
        message = self._spool.popleft(events=self._events.may_send(now, flushing))
        if message is None:
            return None
        token = next(self._tokens)
        self._in_flight[token] = _InFlight(message, self._generation, now)
        self._in_flight_bytes += message.size
        self._events.in_flight += message.event
        return Send(token, message)

    def delivered(self, token: int, now: float) -> list[Outcome]:
        record = self._take_in_flight(token, now)
        if record is None:
            return []  # already taken back by a producer's replacement, or settled at a stop
        if record.message.event:
            self._events.delivered()
        else:
            self._consecutive_failures = 0
            self._failing = False
            self._connected = True
        return self._settling([Outcome("sent", record.message, waited_s=now - record.sent_at)])

    def failed(self, token: int, kind: DeliveryErrorKind, now: float, detail: str = "") -> list[Outcome]:
        """Keep the message for another try unless it can never succeed.

        A message Kafka rejects is dropped at once: retried, it would fail forever and hold up the messages
        behind it. The safety net for failures of no known kind: a message is dropped after
        `MAX_UNEXPLAINED_FAILURES` of them. It cannot cost a message during a broker outage: outages and
        broken producers fail with transient errors, which never count towards it; five gives a rebuilt
        producer (after three failures) two more tries. Failures of a producer already replaced (its aborted
        batches) do not count against the new one.
        """
        record = self._take_in_flight(token, now)
        if record is None:
            return []
        message = record.message
        if kind == "unexplained":
            message = replace(message, unexplained_failures=message.unexplained_failures + 1)
        outcomes = [Outcome("failed", message, detail=detail)]
        if kind == "rejected" or message.unexplained_failures >= MAX_UNEXPLAINED_FAILURES:
            why = "Kafka will not take it" if kind == "rejected" else \
                f"{message.unexplained_failures} tries failed for no known reason"
            outcomes.append(Outcome("dropped", message, "publish_rejected", f"{why}: {detail}"))
            return self._settling(outcomes)
        current = record.generation == self._generation
        if message.event:
            if current:
                self._events.failed(now)
        else:
            if current:
                self._consecutive_failures += 1
                self._draining = True
            self._failing = True
            self._connected = False
        return self._settling(outcomes + self._spool_dropped(self._spool.put_back([message]), now) + self._trim(now))

    # Producers

    def wants_new_producer(self, now: float, have_producer: bool) -> Literal["failing", "stuck"] | None:
        """Why the current producer should be replaced, if it should."""
        if not have_producer:
            return None
        if self._consecutive_failures >= FAILURES_BEFORE_REBUILD:
            return "failing"
        if self.silent_for(now) > self._stuck_after_s:
            return "stuck"
        return None

    def new_generation(self) -> None:
        """A producer is being replaced: what the old one reports from now on is its aborted work."""
        self._generation += 1
        self._consecutive_failures = 0
        self._draining = False

    def take_back_stale(self, now: float) -> list[Outcome]:
        """What a replaced producer still holds after its close (it never answered) goes back to the spool,
        so the new producer starts with nothing older in flight; an outcome arriving later is ignored."""
        stale = [token for token, record in self._in_flight.items() if record.generation < self._generation]
        outcomes: list[Outcome] = []
        for token in stale:
            record = self._take_in_flight(token, now)
            if record is not None:
                outcomes.append(Outcome("failed", record.message, detail="never came back from a replaced producer"))
        if outcomes:
            self._failing = True
            returned = [outcome.message for outcome in outcomes]
            outcomes += self._spool_dropped(self._spool.put_back(returned), now) + self._trim(now)
        return self._settling(outcomes)

    def producer_unavailable(self) -> bool:
        """No producer could be opened; True when that fails messages waiting for it (counted once per try)."""
        self._failing = True
        self._connected = False
        return len(self._spool) > 0

    # The events topic

    def events_topic_check_due(self, now: float, flushing: bool) -> tuple[bool, list[Outcome]]:
        """Whether the loop should look the events topic up now. While it is known to be missing (and may not
        be created), the events waiting for it are dropped rather than kept for ever."""
        events = self._events
        dropped: list[Outcome] = []
        if events.state == "missing":
            if now < events.not_before:
                dropped = [Outcome("dropped", message, "publish_rejected", "the events topic does not exist")
                           for message in self._spool.take_events()]
            else:
                events.state = "unchecked"
        due = now >= events.not_before or flushing
        check = events.state == "unchecked" and due and self._spool.has_events
        if check:
            events.state = "checking"
        return check, self._settling(dropped)

    def events_topic_checked(self, there: bool, now: float) -> None:
        self._events.state = "ready" if there else "missing"
        if not there:
            self._events.not_before = now + MISSING_TOPIC_RECHECK_S

    def events_topic_check_failed(self, now: float) -> None:
        self._events.state = "unchecked"
        self._events.failed(now)

    # The end

    def undelivered(self) -> list[OutgoingMessage]:
        """Everything not yet settled, oldest first (as a next start resends them), out of the machine."""
        messages = sorted([*(record.message for record in self._in_flight.values()), *self._spool.drain()],
                          key=lambda message: message.sequence)
        messages += self._inbox
        self._inbox.clear()
        self._inbox_bytes = 0
        self._in_flight.clear()
        self._in_flight_bytes = self._events.in_flight = 0
        return messages

    def _settling(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Note the settlements the log must record among `outcomes` (a failed try settles nothing)."""
        if self._journal:
            self._to_settle += [outcome.message.sequence for outcome in outcomes
                                if outcome.kind != "failed" and outcome.message.logged]
        return outcomes

    def _take_in_flight(self, token: int, now: float) -> _InFlight | None:
        record = self._in_flight.pop(token, None)
        if record is not None:
            self._in_flight_bytes -= record.message.size
            self._events.in_flight -= record.message.event
            self._last_outcome_at = now
        return record

    def _trim(self, now: float) -> list[Outcome]:
        held, held_bytes = (len(self._in_flight), self._in_flight_bytes) if self._failing else (0, 0)
        return self._spool_dropped(self._spool.trim_to(self._max_messages - held, self._max_bytes - held_bytes), now)

    def _spool_dropped(self, messages: list[OutgoingMessage], now: float) -> list[Outcome]:
        if messages:
            self._overflowed_at = now
        return [Outcome("dropped", message, "spool_full") for message in messages]
