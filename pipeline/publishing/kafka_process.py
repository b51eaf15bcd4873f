"""The Kafka client in a child process, behind the publisher's `Producer` interface.

Why: kafka-python is pure Python. Its `send` (partitioning, record encoding) and its network thread
(CRC, compression, requests) hold the GIL for every message. On a GPU host that is what the inference
thread waits for: a GIL profile of 16 camera streams showed the Kafka client at 16% of the samples and
the publisher's sends at a large part of another 31%, while inference held it 4%. In a child process
the client competes for a core instead, and the pipeline process keeps only a pipe write per batch of
messages and a pipe read per batch of acknowledgements.

What stays in the pipeline process: the spool, the retry and rebuild policy, and every count (the
publisher sees this as one more `Producer`). A child that dies fails every message in flight back to the
publisher, which spools them and opens a new producer, in a new child. The child exits when the pipe
closes, so a pipeline killed outright leaves no orphan behind.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from kafka.future import Future

from pipeline.children import bootstrap_for, start_child
from pipeline.ops.health import Heartbeats
from pipeline.publishing.kafka_client import (
    DeliveryErrorKind,
    Producer,
    close_kafka_producer,
    delivery_error_kind,
    delivery_timeout_ms,
    make_kafka_producer,
)

if TYPE_CHECKING:
    from pipeline.config import KafkaConfig

log = logging.getLogger(__name__)

_OPEN_TIMEOUT_S = 30.0  # a fresh child imports kafka-python, then bootstraps (about 2 s when the broker is away)
_POLL_S = 0.5
_STARTS_BEFORE_GIVING_UP = 3
_SEND_BATCH = 512
_DEFAULT_ANSWER_WITHIN_S = 40.0
_CHILD_BOOTSTRAP = bootstrap_for("pipeline.publishing.kafka_process")
_FORWARDED_LOGGERS = ("", "kafka", "pipeline")


class KafkaChildUnusable(ConnectionError):
    """The child exited before answering on several starts in a row: this environment cannot run it (an
    interpreter or import problem, say), and the caller should run the Kafka client in its own process."""


class KafkaProcessError(ConnectionError):
    """A delivery or producer failure reported by the child, or the child's exit.

    `delivery_error_kind` is what the child found about the original error (see
    `pipeline.publishing.kafka_client.delivery_error_kind`): the publisher drops a message Kafka rejects and keeps
    one that failed for a transient reason, so that fact has to cross the pipe with the text.
    """

    def __init__(self, text: str, kind: DeliveryErrorKind = "transient") -> None:
        super().__init__(text)
        self.delivery_error_kind: DeliveryErrorKind = kind


class DeliveryFuture(Future):  # type: ignore[misc]
    """kafka-python's own future (thread-safe; callbacks run once, whether added before or after the
    outcome, and one that raises is logged), resolved here from the child's acknowledgement."""

    __slots__ = ()

    def resolve(self, error: Exception | None) -> None:
        if self.is_done:
            return
        if error is None:
            self.success(None)
        else:
            self.failure(error)


class KafkaProcess:
    """One child process running kafka-python producers, opened and closed on request.

    `open_producer` is the publisher's producer factory. The child starts with `start` or the first call, and
    again after it died; `close` ends it. Two threads move data over the pipe: `kafka-pipe-out` writes
    queued sends in batches, `kafka-pipe-in` reads acknowledgements and replies and runs callbacks.
    """

    def __init__(self, heartbeats: Heartbeats | None = None) -> None:
        self._heartbeats = heartbeats
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._generations = itertools.count(1)
        self._connection: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._outbox: list[tuple[Any, ...]] = []
        self._pending: dict[int, tuple[DeliveryFuture, float]] = {}
        self._answer_within_s = _DEFAULT_ANSWER_WITHIN_S
        self._replies: dict[tuple[str, int], str | None] = {}
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._last_heard = 0.0
        self._starts_unanswered = 0
        self._starts = 0
        self._local = False  # the child cannot run here: producers are this process's own

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._process is None else int(self._process.pid)

    @property
    def pids(self) -> list[int]:
        pid = self.pid
        return [] if pid is None else [pid]

    @property
    def replacements(self) -> int:
        """Children started after the first: each one replaced a child that died, was killed as stuck or could
        not open a producer."""
        return max(0, self._starts - 1)

    def start(self) -> None:
        """Starts the child now rather than at the first `open_producer`."""
        replaced: _Replaced | None = None
        with self._lock:
            if not self._closed and not self._child_running():
                replaced = self._start()
        if replaced is not None:
            replaced.fail_back()

    def open_producer_or_local(self, config: KafkaConfig) -> Producer:
        """The child's producer, or this process's own once the child has shown it cannot start here: results
        must reach Kafka either way."""
        if not self._local:
            try:
                return self.open_producer(config)
            except KafkaChildUnusable as error:
                log.error("%s; running the Kafka client in this process from now on", error)
                self._local = True
        return make_kafka_producer(config)

    def open_producer(self, config: KafkaConfig) -> RemoteProducer:
        """A producer in the child (started if needed); raises what the child's constructor raised."""
        generation = next(self._generations)
        replaced: _Replaced | None = None
        with self._lock:
            if self._closed:
                raise KafkaProcessError("the Kafka client process is closed")
            if not self._child_running() or not self._threads_alive():
                replaced = self._start()
        if replaced is not None:  # its messages go back now, not after the new child's open
            replaced.fail_back()
        with self._lock:
            if self._closed:
                raise KafkaProcessError("the Kafka client process is closed")
            return self._open(config, generation)

    def _open(self, config: KafkaConfig, generation: int) -> RemoteProducer:
        """Called holding the lock, with a child running."""
        # kafka-python fails a message itself after its delivery timeout; no answer for twice as long means
        # the child is stuck, and the watchdog in `_read` replaces it (before the publisher's own watchdog).
        self._answer_within_s = 2 * delivery_timeout_ms(config) / 1000
        levels = {name: logging.getLogger(name).getEffectiveLevel() for name in _FORWARDED_LOGGERS}
        self._outbox.append(("open", generation, config, levels))
        self._lock.notify_all()
        try:
            if not self._child_running():  # it may have gone while the lock was released after its start
                raise KafkaProcessError("the Kafka client process exited before it answered 'opened'")
            error = self._wait_reply("opened", generation, _OPEN_TIMEOUT_S)
        except KafkaProcessError as failure:
            self._outbox.append(("close", generation, 0.0))  # in case it opens after all
            if "exited before" in str(failure):
                self._starts_unanswered += 1
                if self._starts_unanswered >= _STARTS_BEFORE_GIVING_UP:
                    raise KafkaChildUnusable(
                        f"the Kafka client process exited before answering {self._starts_unanswered} times in a row"
                    ) from failure
            raise
        self._starts_unanswered = 0
        if error is not None:
            raise KafkaProcessError(error)
        return RemoteProducer(self, generation)

    def close(self, timeout: float = 5.0) -> None:
        """Ends the child: it closes its producers (pending messages fail back first), then exits."""
        with self._lock:
            self._closed = True
            if self._process is not None:
                self._outbox.append(("exit",))
                self._lock.notify_all()
            process, threads = self._process, list(self._threads)
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("Kafka client process did not exit in %.1f s; killing it", timeout)
                process.kill()
                process.wait(1.0)
        for thread in threads:
            thread.join(timeout)

    def send(self, generation: int, topic: str, value: bytes, key: bytes,
             headers: list[tuple[str, bytes]]) -> DeliveryFuture:
        future = DeliveryFuture()
        with self._lock:
            if self._process is None or self._closed:
                raise KafkaProcessError("the Kafka client process is not running")
            message_id = next(self._ids)
            self._pending[message_id] = (future, time.monotonic())
            self._outbox.append(("send", generation, message_id, topic, value, key, headers))
            self._lock.notify_all()
        return future

    def close_producer(self, generation: int, timeout: float) -> None:
        with self._lock:
            if not self._child_running():
                return
            self._outbox.append(("close", generation, timeout))
            self._lock.notify_all()
            self._wait_reply("closed", generation, timeout + 1.5)

    def _child_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _threads_alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def _start(self) -> _Replaced | None:
        """Called holding the lock. A child still on record (its reader has not yet seen it die, or its
        pipe threads died) is replaced here: its messages are returned to be failed back once the lock is
        released, or they would wait for the watchdog, which would then blame the new child."""
        replaced = None
        if self._connection is not None:
            replaced = _Replaced([future for future, _sent in self._pending.values()], self._process,
                                 self._connection)
            self._pending = {}
        process, connection = start_child(_CHILD_BOOTSTRAP)
        self._starts += 1
        self._connection, self._process = connection, process
        self._outbox.clear()
        self._threads = [
            threading.Thread(target=self._write, args=(connection,), name="kafka-pipe-out", daemon=True),
            threading.Thread(target=self._read, args=(connection,), name="kafka-pipe-in", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._last_heard = time.monotonic()
        log.info("Kafka client process started (pid %d)", process.pid)
        return replaced

    def _wait_reply(self, kind: str, generation: int, timeout: float) -> str | None:
        """Called holding the lock; a child that exits meanwhile fails the wait at once."""
        key = (kind, generation)
        connection, process = self._connection, self._process
        deadline = time.monotonic() + timeout

        def settled() -> bool:
            # The process itself too: its pipe reader may be slow to see it go (busy in a log handler).
            gone = self._connection is not connection or (process is not None and process.poll() is not None)
            return key in self._replies or gone

        while not settled() and (left := deadline - time.monotonic()) > 0:
            self._lock.wait(min(left, _POLL_S))
        if key in self._replies:
            return self._replies.pop(key)
        if settled():
            raise KafkaProcessError(f"the Kafka client process exited before it answered '{kind}'")
        raise KafkaProcessError(f"the Kafka client process did not answer '{kind}' within {timeout:.0f} s")

    def _write(self, connection: Connection) -> None:
        name = threading.current_thread().name
        try:
            while True:
                with self._lock:
                    self._lock.wait_for(lambda: bool(self._outbox) or self._connection is not connection, _POLL_S)
                    if self._connection is not connection:
                        return
                    batch, self._outbox = self._outbox[:_SEND_BATCH], self._outbox[_SEND_BATCH:]
                if self._heartbeats is not None:
                    self._heartbeats.beat(name)
                if batch:
                    connection.send(batch)
                if batch and batch[-1][0] == "exit":
                    return
        except (OSError, ValueError) as error:
            log.debug("Kafka client pipe closed while writing: %r", error)
        finally:
            if self._heartbeats is not None:
                self._heartbeats.forget(name)

    def _read(self, connection: Connection) -> None:
        name = threading.current_thread().name
        next_check = 0.0
        try:
            while True:
                if self._heartbeats is not None:
                    self._heartbeats.beat(name)
                if connection.poll(_POLL_S):
                    replies = connection.recv()
                    if any(reply[0] != "log" for reply in replies):  # a stuck sender loop still logs
                        self._last_heard = time.monotonic()
                    for reply in replies:
                        self._dispatch(reply)
                if time.monotonic() >= next_check:
                    self._replace_if_stuck(connection)
                    next_check = time.monotonic() + _POLL_S
        except (EOFError, OSError) as error:
            log.debug("Kafka client pipe closed: %r", error)
        finally:
            self._child_gone(connection)
            if self._heartbeats is not None:
                self._heartbeats.forget(name)

    def _replace_if_stuck(self, connection: Connection) -> None:
        """A child that holds a message far past kafka-python's own delivery timeout, and has sent nothing
        for as long, is stuck: it is killed, its messages fail back to the spool, and the publisher's next
        producer starts a new child. One that keeps answering is only slow (sends to a broker that is away
        block up to max_block_ms each) and is left alone."""
        with self._lock:
            if self._connection is not connection or not self._pending:
                return
            oldest_sent = next(iter(self._pending.values()))[1]
            waited = time.monotonic() - max(oldest_sent, self._last_heard)
            process = self._process
        if waited > self._answer_within_s and process is not None:
            log.error("Kafka client process (pid %d) has not answered for %.0f s; replacing it", process.pid, waited)
            process.kill()

    def _dispatch(self, reply: tuple[Any, ...]) -> None:
        if reply[0] == "log":
            _, name, level, text = reply
            logging.getLogger(name).log(level, "%s", text)
        elif reply[0] == "acks":
            with self._lock:
                outcomes = [(self._pending.pop(message_id, None), error) for message_id, error in reply[1]]
            for entry, error in outcomes:
                if entry is not None:
                    entry[0].resolve(None if error is None else _reported_error(*error))
        else:
            with self._lock:
                self._replies[(reply[0], reply[1])] = reply[2] if len(reply) > 2 else None
                self._lock.notify_all()

    def _child_gone(self, connection: Connection) -> None:
        """Every message the child held fails back to the publisher, which keeps them for the next child."""
        with self._lock:
            if self._connection is not connection:
                return
            process, self._process, self._connection = self._process, None, None
            orphans, self._pending = self._pending, {}
            self._outbox.clear()
            self._lock.notify_all()
        connection.close()
        if not self._closed:
            exit_code = None if process is None else process.poll()
            log.warning("Kafka client process exited (code %s); %d message(s) in flight go back to the spool",
                        exit_code, len(orphans))
        error = KafkaProcessError("the Kafka client process exited")
        for future, _sent in orphans.values():
            future.resolve(error)


def _reported_error(text: str, kind: str) -> KafkaProcessError:
    if kind == "rejected":
        return KafkaProcessError(text, "rejected")
    if kind == "unexplained":
        return KafkaProcessError(text, "unexplained")
    return KafkaProcessError(text)


@dataclass
class _Replaced:
    """A child taken off record by `_start` before its reader saw it go."""

    futures: list[DeliveryFuture]
    process: subprocess.Popen[bytes] | None
    connection: Connection

    def fail_back(self) -> None:
        if self.process is not None:
            self.process.kill()
        self.connection.close()
        if self.process is not None:
            try:
                self.process.wait(1.0)
            except subprocess.TimeoutExpired:
                log.warning("replaced Kafka client process (pid %d) did not exit", self.process.pid)
        if self.futures:
            log.warning("Kafka client process replaced; %d message(s) in flight go back to the spool",
                        len(self.futures))
        error = KafkaProcessError("the Kafka client process exited")
        for future in self.futures:
            future.resolve(error)


@dataclass
class RemoteProducer:
    """One producer in the child; what the publisher holds between rebuilds."""

    process: KafkaProcess
    generation: int

    def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> DeliveryFuture:
        return self.process.send(self.generation, topic, value, key, headers)

    def close(self, timeout: float | None = None) -> None:
        self.process.close_producer(self.generation, 5.0 if timeout is None else timeout)


def serve(connection: Connection) -> None:
    """The child: runs producers as the parent asks and sends acknowledgements back in batches.

    It ignores SIGINT and SIGTERM (`bootstrap_for`): the pipeline still has to flush through it. It exits
    when told, or when the pipe closes because the pipeline process is gone.
    """
    _ChildServer(connection).run()


class _ChildServer:
    """The child's side of the pipe: requests in on the main thread, acknowledgements and replies out on
    `kafka-acks`, batched so that one pipe write carries many."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._producers: dict[int, Any] = {}
        self._condition = threading.Condition()
        self._acks: list[tuple[int, tuple[str, str] | None]] = []
        self._replies: list[tuple[Any, ...]] = []
        self._running = True

    def run(self) -> None:
        logging.getLogger().handlers[:] = [_ForwardToParent(self._reply)]
        answering = threading.Thread(target=self._answer, name="kafka-acks", daemon=True)
        answering.start()
        try:
            while True:
                try:
                    requests = self._connection.recv()
                except (EOFError, OSError):
                    break
                if not all(self._handle(request) for request in requests):
                    return
        finally:
            for producer in self._producers.values():
                close_kafka_producer(producer, 2.0)
            with self._condition:
                self._running = False
                self._condition.notify()
            answering.join(5.0)
            self._connection.close()

    def _handle(self, request: tuple[Any, ...]) -> bool:
        """Serves one request; False for `exit`."""
        kind = request[0]
        if kind == "send":
            self._send(*request[1:])
        elif kind == "open":
            _, generation, config, levels = request
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            try:
                self._producers[generation] = make_kafka_producer(config)
            except Exception as error:
                self._reply("opened", generation, f"{type(error).__name__}: {error}")
            else:
                self._reply("opened", generation, None)
        elif kind == "close":
            _, generation, timeout = request
            close_kafka_producer(self._producers.pop(generation, None), timeout)
            self._reply("closed", generation)
        return bool(kind != "exit")

    def _send(self, generation: int, message_id: int, topic: str, value: bytes, key: bytes,
              headers: list[tuple[str, bytes]]) -> None:
        producer = self._producers.get(generation)
        if producer is None:
            self._fail(message_id, KafkaProcessError(f"producer {generation} is closed"))
            return
        try:
            future = producer.send(topic, value=value, key=key, headers=headers)
        except Exception as error:
            self._fail(message_id, error)
            return
        future.add_callback(self._acknowledge, message_id)
        future.add_errback(self._fail, message_id)

    def _acknowledge(self, message_id: int, _metadata: Any) -> None:
        with self._condition:
            self._acks.append((message_id, None))
            self._condition.notify()

    def _fail(self, message_id: int, error: Exception) -> None:
        report = (repr(error), delivery_error_kind(error))
        with self._condition:
            self._acks.append((message_id, report))
            self._condition.notify()

    def _reply(self, *message: Any) -> None:
        with self._condition:
            self._replies.append(message)
            self._condition.notify()

    def _answer(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: bool(self._acks or self._replies) or not self._running)
                if not (self._acks or self._replies):
                    return
                outgoing: list[tuple[Any, ...]] = [("acks", list(self._acks))] if self._acks else []
                outgoing += self._replies
                self._acks.clear()
                self._replies.clear()
            try:
                self._connection.send(outgoing)
            except OSError:
                return


class _ForwardToParent(logging.Handler):
    """The child's log records go out through the pipeline's own handlers and format."""

    def __init__(self, reply: Callable[..., None]) -> None:
        super().__init__()
        self._reply = reply

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self._reply("log", record.name, record.levelno, text)


def serve_descriptor(descriptor: int) -> None:
    """The child's entry point: `serve` on the socket the parent passed down."""
    serve(Connection(descriptor))
