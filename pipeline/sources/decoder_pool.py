"""Decoding in worker processes (`decoding.processes`): the frames come back through shared memory.

Why: with every stage in one interpreter, decoding competes for its lock with inference, post-processing,
message building and the publisher. Here each stream's decoder runs in a worker process and the stream's
reader, which stays in the pipeline process with all its rules (reconnects, pacing, rate cap, ledger), waits
on a pipe, holding no lock, for the next frame.

`ProcessSource` is a `VideoSource` like any other, so the reader does not know where decoding happens. In
the worker, one thread per stream opens the real source (OpenCV or PyAV, chosen as in-process) and decodes
one frame ahead into the stream's shared memory: two slots, one being copied out by the reader, one being
filled. The reader copies each frame out at once and hands the slot back, so a frame never depends on a
worker that may die. A worker that dies fails its streams' reads like a lost camera: the readers reconnect,
on a new worker. Streams decoded on a GPU (`decoder: cuda`) stay in-process.

Protocol, on one pipe per worker (`key` names a stream's session in that worker):
    pipeline -> worker: ("open", key, stream config as JSON, decoder threads), ("ack", key, slot), ("close", key)
    worker -> pipeline: ("opened", key, ok, frame rate), ("frame", key, slot, shape, pts_ms, shm name),
                        ("invalid", key, detail), ("end", key)
"""

from __future__ import annotations

import itertools
import logging
import queue
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.children import start_child
from pipeline.config import StreamConfig
from pipeline.ops.health import Heartbeats
from pipeline.sources.source import InvalidFrame, VideoSource
from pipeline.threads import StageThread

log = logging.getLogger(__name__)

_SLOTS = 2
_OPEN_MARGIN_S = 5.0
_WORKER_BOOTSTRAP = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
    "from pipeline.sources.decoder_pool import serve_descriptor; serve_descriptor(int(sys.argv[2]))"
)


@dataclass
class _Session:
    """What the pipeline side knows of one stream's session in a worker."""

    replies: queue.Queue[tuple[Any, ...]] = field(default_factory=queue.Queue)
    memory: SharedMemory | None = None


class DecoderWorker:
    """One worker process (`pipeline.children`) and the thread that reads its replies."""

    def __init__(self, index: int, heartbeats: Heartbeats) -> None:
        self._process, self._pipe = start_child(_WORKER_BOOTSTRAP)
        self._send_lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._thread = StageThread(f"decoder-{index}", self._receive, heartbeats)
        self._thread.start()
        self.streams = 0

    @property
    def alive(self) -> bool:
        return self._process.poll() is None and self._thread.is_alive()

    @property
    def pid(self) -> int:
        return self._process.pid

    def send(self, message: tuple[Any, ...]) -> bool:
        with self._send_lock:
            try:
                self._pipe.send(message)
                return True
            except (OSError, ValueError):
                return False

    def register(self, key: int) -> _Session:
        session = _Session()
        with self._sessions_lock:
            self._sessions[key] = session
        return session

    def forget(self, key: int) -> None:
        with self._sessions_lock:
            session = self._sessions.pop(key, None)
        if session is not None and session.memory is not None:
            session.memory.close()

    def _receive(self) -> None:
        """Route each reply to its stream; when the worker goes, every stream of it hears `end`."""
        try:
            while True:
                self._thread.beat(busy_for_s=3600)  # waiting on a pipe for a camera's next frame is not a hang
                try:
                    message = self._pipe.recv()
                except (EOFError, OSError):
                    return
                with self._sessions_lock:
                    session = self._sessions.get(message[1])
                if session is not None:
                    session.replies.put(message)
        finally:
            with self._sessions_lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                session.replies.put(("end", None))

    def stop(self, timeout_s: float) -> None:
        self.send(("quit",))
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(1.0)
        self._pipe.close()
        self._thread.join(1.0)


class DecoderPool:
    """The worker processes of one pipeline, started when a stream first needs one and replaced when one dies."""

    def __init__(self, processes: int, heartbeats: Heartbeats) -> None:
        self._heartbeats = heartbeats
        self._workers: list[DecoderWorker | None] = [None] * processes
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        self._started = itertools.count()
        self._closed = False

    def source_factory(self, threads: int) -> Callable[[StreamConfig], VideoSource]:
        def make(config: StreamConfig) -> VideoSource:
            return ProcessSource(config, self, threads)

        return make

    def assign(self) -> tuple[DecoderWorker, int] | None:
        """The live worker with the fewest streams, and a new session key; None once the pool is closed."""
        with self._lock:
            if self._closed:
                return None
            for index, worker in enumerate(self._workers):
                if worker is None or not worker.alive:
                    if worker is not None:
                        log.warning("decoder process %d is gone; starting a new one", index)
                    self._workers[index] = DecoderWorker(next(self._started), self._heartbeats)
            live = [worker for worker in self._workers if worker is not None]
            chosen = min(live, key=lambda worker: worker.streams)
            chosen.streams += 1
            return chosen, next(self._keys)

    def release(self, worker: DecoderWorker) -> None:
        with self._lock:
            worker.streams -= 1

    def running(self) -> list[int]:
        """The process ids of the workers still running."""
        with self._lock:
            return [worker.pid for worker in self._workers if worker is not None and worker.alive]

    def close(self, timeout_s: float = 2.0) -> None:
        with self._lock:
            self._closed = True
            workers = [worker for worker in self._workers if worker is not None]
        for worker in workers:
            worker.stop(timeout_s)


class ProcessSource:
    """A stream decoded in a worker process; a `VideoSource` to its reader."""

    def __init__(self, config: StreamConfig, pool: DecoderPool, threads: int) -> None:
        self._config = config
        self._pool = pool
        self._threads = threads
        self._worker: DecoderWorker | None = None
        self._key = 0
        self._session: _Session | None = None
        self._fps: float | None = None
        self._position_ms: float | None = None
        self._ended = False

    def open(self) -> bool:
        assigned = self._pool.assign()
        if assigned is None:
            return False
        self._worker, self._key = assigned
        self._session = self._worker.register(self._key)
        if not self._worker.send(("open", self._key, self._config.model_dump_json(), self._threads)):
            return False
        reply = self._next(self._config.open_timeout_ms / 1000 + _OPEN_MARGIN_S)
        if reply is None or reply[0] != "opened" or not reply[2]:
            return False
        self._fps = reply[3]
        return True

    def read(self) -> npt.NDArray[np.uint8] | None:
        if self._ended or self._worker is None or self._session is None:
            return None
        reply = self._next(self._config.stall_timeout_s + _OPEN_MARGIN_S)
        if reply is None or reply[0] == "end":
            self._ended = True
            return None
        if reply[0] == "invalid":
            raise InvalidFrame(reply[2])
        _, _, slot, shape, pts_ms, name = reply
        memory = self._session.memory
        if memory is None or memory.name != name:
            if memory is not None:
                memory.close()
            memory = self._session.memory = _attach(name)
        image: npt.NDArray[np.uint8] = np.ndarray(shape, np.uint8, buffer=memory.buf,
                                                  offset=slot * (memory.size // _SLOTS)).copy()
        self._worker.send(("ack", self._key, slot))
        self._position_ms = pts_ms
        return image

    def position_ms(self) -> float | None:
        return self._position_ms

    def frame_rate(self) -> float | None:
        return self._fps

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.send(("close", self._key))
        worker.forget(self._key)
        self._pool.release(worker)

    def _next(self, timeout_s: float) -> tuple[Any, ...] | None:
        assert self._session is not None
        try:
            return self._session.replies.get(timeout=timeout_s)
        except queue.Empty:
            return None


def _attach(name: str) -> SharedMemory:
    """Memory the worker made and will remove: before Python 3.13 attaching also registers it for removal at
    this process's exit, which would remove it under a live worker."""
    from multiprocessing import resource_tracker

    memory = SharedMemory(name=name)
    resource_tracker.unregister(memory._name, "shared_memory")  # type: ignore[attr-defined]
    return memory


# The worker process


def serve_descriptor(descriptor: int) -> None:
    """The worker process's entry point: serve streams on the socket it inherited."""
    _worker_main(Connection(descriptor))


def _worker_main(pipe: Connection) -> None:
    """Serve streams until told to quit or the pipeline goes (the pipe closes)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pipeline stops its workers itself, after its readers
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    send_lock = threading.Lock()
    decoders: dict[int, _StreamDecoder] = {}

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            pipe.send(message)

    while True:
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            break
        kind = message[0]
        if kind == "quit":
            break
        if kind == "open":
            decoder = decoders[message[1]] = _StreamDecoder(message[1], message[2], message[3], send)
            decoder.start()
        elif kind == "ack" and message[1] in decoders:
            decoders[message[1]].free(message[2])
        elif kind == "close" and message[1] in decoders:
            decoders.pop(message[1]).stop()
    for decoder in decoders.values():
        decoder.stop()


class _StreamDecoder:
    """One stream in a worker: opens its source and decodes one frame ahead into two shared-memory slots."""

    def __init__(self, key: int, config_json: str, threads: int, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._key = key
        self._config = StreamConfig.model_validate_json(config_json)
        self._threads = threads
        self._send = send
        self._free = [True] * _SLOTS
        self._condition = threading.Condition()
        self._stopped = False
        self._memory: SharedMemory | None = None
        self._thread = threading.Thread(target=self._run, name=f"decode-{self._config.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def free(self, slot: int) -> None:
        with self._condition:
            self._free[slot] = True
            self._condition.notify_all()

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify_all()
        self._thread.join(5.0)
        if self._memory is not None:
            self._memory.close()
            self._memory.unlink()

    def _run(self) -> None:
        from pipeline.sources.choice import local_source_factory

        source = local_source_factory(self._config, self._threads)(self._config)
        try:
            opened = source.open()
            self._send(("opened", self._key, opened, source.frame_rate() if opened else None))
            if opened:
                self._decode(source)
        except Exception as error:  # a failed open or read fails this session, like a lost camera
            log.warning("stream %s: decoder failed: %r", self._config.id, error)
        finally:
            try:
                source.close()
            finally:
                self._send(("end", self._key))

    def _decode(self, source: VideoSource) -> None:
        slot = 0
        while True:
            with self._condition:
                while not self._free[slot] and not self._stopped:
                    self._condition.wait()
                if self._stopped:
                    return
            try:
                image = source.read()
            except InvalidFrame as error:
                self._send(("invalid", self._key, str(error)))
                continue
            if image is None:
                return
            memory = self._memory_for(image.nbytes)
            view = np.ndarray(image.shape, np.uint8, buffer=memory.buf, offset=slot * (memory.size // _SLOTS))
            view[...] = image
            with self._condition:
                self._free[slot] = False
            self._send(("frame", self._key, slot, image.shape, source.position_ms(), memory.name))
            slot = (slot + 1) % _SLOTS

    def _memory_for(self, frame_bytes: int) -> SharedMemory:
        """Two slots big enough for the frame; a larger frame (a camera that changed its resolution) gets new
        memory once both slots are free, so the reader never copies from memory being replaced."""
        memory = self._memory
        if memory is not None and memory.size // _SLOTS >= frame_bytes:
            return memory
        with self._condition:
            while not all(self._free) and not self._stopped:
                self._condition.wait()
        if memory is not None:
            memory.close()
            memory.unlink()
        self._memory = SharedMemory(create=True, size=_SLOTS * frame_bytes)
        return self._memory
