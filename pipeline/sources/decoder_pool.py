"""Decoding in worker processes (`decoding.processes`): the frames come back through shared memory.

Why: with every stage in one interpreter, decoding competes for its lock with inference, post-processing,
message building and the publisher. Here each stream's decoder runs in a worker process and the stream's
reader, which stays in the pipeline process with all its rules (reconnects, pacing, rate cap, ledger), waits
on a socket, holding no lock, for the next frame.

`ProcessSource` is a `VideoSource` like any other, so the reader does not know where decoding happens. In
the worker, one thread per stream opens the real source (OpenCV or PyAV, chosen as in-process) and decodes
one frame ahead into the stream's shared memory: two slots, one being copied out by the reader, one being
filled. The reader copies each frame out at once and hands the slot back, so a frame never depends on a
worker that may die. Streams decoded on a GPU (`decoder: cuda`) stay in-process.

Each stream's session has a socket pair of its own, whose far end goes to the worker with the request to
open the stream. The reader waits on it directly: a frame reaches the reader's thread without passing
through any other thread of the pipeline's process, whose interpreter is what a GPU host runs short of.
Either side ends a session by closing its end: the worker when the stream ends or fails, the reader when
it is done with it. A worker that dies closes all its sessions, so its streams' reads fail like a lost
camera and the readers reconnect, on a new worker.

Protocol:
    control socket, pipeline -> worker: ("open", stream config as JSON, decoder threads), then the session
                                        socket's descriptor; ("quit",)
    session, worker -> pipeline: ("opened", ok, frame rate), then ("frame", slot, shape, pts_ms, shm name) or
                                 ("invalid", detail) per frame read; end of file when the session is over
    session, pipeline -> worker: one byte per frame copied out, which frees the oldest slot
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.children import bootstrap_for, end_child, start_child
from pipeline.config import StreamConfig
from pipeline.sources.source import InvalidFrame, VideoSource

log = logging.getLogger(__name__)

_SLOTS = 2
_OPEN_MARGIN_S = 5.0
_QUIT_WAIT_S = 1.5  # within the pipeline's wait for its workers (DecoderPool.close)
_SLOT_FREED = b"f"
_WORKER_BOOTSTRAP = bootstrap_for("pipeline.sources.decoder_pool")


class DecoderWorker:
    """One worker process (`pipeline.children`) and the socket that hands it new sessions."""

    def __init__(self) -> None:
        self._process, self._control = start_child(_WORKER_BOOTSTRAP)
        self._control_lock = threading.Lock()
        self.streams = 0

    @property
    def alive(self) -> bool:
        """A dying worker's sockets close before the process can be reaped, so a stream that saw its session
        end must not be opened on it again: the worker never writes to the control socket, and it reads as
        ready only once the worker's end has closed."""
        try:
            return self._process.poll() is None and not self._control.poll(0)
        except (OSError, ValueError):
            return False

    @property
    def pid(self) -> int:
        return self._process.pid

    def open_session(self, config_json: str, threads: int) -> Connection | None:
        """The pipeline's end of a new session, whose other end goes to the worker with the stream to decode;
        None when the worker is gone."""
        ours, theirs = socket.socketpair()
        try:
            with self._control_lock:
                self._control.send(("open", config_json, threads))
                send_handle(self._control, theirs.fileno(), self._process.pid)
        except (OSError, ValueError):
            ours.close()
            return None
        finally:
            theirs.close()
        return Connection(ours.detach())

    def stop(self, timeout_s: float) -> None:
        with self._control_lock, contextlib.suppress(OSError, ValueError):
            self._control.send(("quit",))
        end_child(self._process, timeout_s)
        self._control.close()


class DecoderPool:
    """The worker processes of one pipeline, started when a stream first needs one and replaced when one dies."""

    def __init__(self, processes: int) -> None:
        self._workers: list[DecoderWorker | None] = [None] * processes
        self._lock = threading.Lock()
        self._closed = False
        self.replacements = 0

    def source_factory(self, threads: int) -> Callable[[StreamConfig], VideoSource]:
        def make(config: StreamConfig) -> VideoSource:
            return ProcessSource(config, self, threads)

        return make

    def assign(self) -> DecoderWorker | None:
        """The live worker with the fewest streams; None once the pool is closed."""
        with self._lock:
            if self._closed:
                return None
            for index, worker in enumerate(self._workers):
                if worker is None or not worker.alive:
                    if worker is not None:
                        log.warning("decoder process %d is gone; starting a new one", index)
                        self.replacements += 1
                    self._workers[index] = DecoderWorker()
            live = [worker for worker in self._workers if worker is not None]
            chosen = min(live, key=lambda worker: worker.streams)
            chosen.streams += 1
            return chosen

    def release(self, worker: DecoderWorker) -> None:
        with self._lock:
            worker.streams -= 1

    @property
    def pids(self) -> list[int]:
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
        self._session: Connection | None = None
        self._readable = select.poll()  # made once: Connection.poll builds a selector at every call
        self._memory: SharedMemory | None = None
        self._fps: float | None = None
        self._position_ms: float | None = None

    def open(self) -> bool:
        self._worker = self._pool.assign()
        if self._worker is None:
            return False
        self._session = self._worker.open_session(self._config.model_dump_json(), self._threads)
        if self._session is not None:
            self._readable.register(self._session.fileno(), select.POLLIN)
        reply = self._next(self._config.open_timeout_ms / 1000 + _OPEN_MARGIN_S)
        if reply is None or reply[0] != "opened" or not reply[1]:
            return False
        self._fps = reply[2]
        return True

    def read(self) -> npt.NDArray[np.uint8] | None:
        reply = self._next(self._config.stall_timeout_s + _OPEN_MARGIN_S)
        if reply is None:
            return None
        if reply[0] == "invalid":
            raise InvalidFrame(reply[1])
        _, slot, shape, pts_ms, name = reply
        memory = self._memory
        if memory is None or memory.name != name:
            if memory is not None:
                memory.close()
                self._memory = None
            try:
                memory = self._memory = _attach(name)
            except FileNotFoundError:  # the worker ended the session and removed it after sending the frame
                return None
        image: npt.NDArray[np.uint8] = np.ndarray(shape, np.uint8, buffer=memory.buf,
                                                  offset=slot * (memory.size // _SLOTS)).copy()
        self._free_slot()
        self._position_ms = pts_ms
        return image

    def position_ms(self) -> float | None:
        return self._position_ms

    def frame_rate(self) -> float | None:
        return self._fps

    def close(self) -> None:
        """Ends the session; the worker sees it end and stops decoding the stream."""
        session, self._session = self._session, None
        if session is not None:
            self._readable.unregister(session.fileno())
            session.close()
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        worker, self._worker = self._worker, None
        if worker is not None:
            self._pool.release(worker)

    def _free_slot(self) -> None:
        try:
            if self._session is not None:
                self._session.send_bytes(_SLOT_FREED)
        except OSError:
            pass  # the worker has ended the session; the next read says so

    def _next(self, timeout_s: float) -> tuple[Any, ...] | None:
        """The next message of the session; None when it has ended, or nothing came within `timeout_s`."""
        session = self._session
        try:
            if session is None or not self._readable.poll(math.ceil(timeout_s * 1000)):
                return None
            message: tuple[Any, ...] = session.recv()
            return message
        except (EOFError, OSError):
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
    """The worker process's entry point: serve streams on the control socket it inherited."""
    _worker_main(Connection(descriptor))


def _worker_main(control: Connection) -> None:
    """Serve streams until told to quit or the pipeline goes (the control socket closes). It ignores SIGINT and
    SIGTERM (`bootstrap_for`): the pipeline stops its workers itself, after its readers."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    decoders: list[_StreamDecoder] = []
    while True:
        try:
            message = control.recv()
            if message[0] != "open":
                break
            session = Connection(recv_handle(control))
        except (EOFError, OSError):
            break
        decoders = [decoder for decoder in decoders if decoder.running]
        decoder = _StreamDecoder(message[1], message[2], session)
        decoder.start()
        decoders.append(decoder)
    for decoder in decoders:
        decoder.end_session()
    deadline = time.monotonic() + _QUIT_WAIT_S
    for decoder in decoders:
        decoder.join(max(0.0, deadline - time.monotonic()))


class _StreamDecoder:
    """One stream in a worker: opens its source and decodes one frame ahead into two shared-memory slots, each
    filled again once the reader has said it copied the frame out."""

    def __init__(self, config_json: str, threads: int, session: Connection) -> None:
        self._config = StreamConfig.model_validate_json(config_json)
        self._threads = threads
        self._session = session
        self._memory: SharedMemory | None = None
        self._memory_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"decode-{self._config.id}", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def end_session(self) -> None:
        """From another thread: a wait for a free slot returns, and the next frame goes nowhere."""
        with contextlib.suppress(OSError), socket.fromfd(self._session.fileno(), socket.AF_UNIX,
                                                          socket.SOCK_STREAM) as handle:
            handle.shutdown(socket.SHUT_RDWR)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        self._remove_memory()  # a decoder still stuck in a read must not leave it behind when the process exits

    def _run(self) -> None:
        from pipeline.sources.choice import local_source_factory

        source = local_source_factory(self._config, self._threads)(self._config)
        try:
            opened = source.open()
            self._session.send(("opened", opened, source.frame_rate() if opened else None))
            if opened:
                self._decode(source)
        except (EOFError, OSError):
            pass  # the reader ended the session
        except Exception as error:  # a failed open or read fails this session, like a lost camera
            log.warning("stream %s: decoder failed: %r", self._config.id, error)
        finally:
            try:
                source.close()
            finally:
                self._session.close()
                self._remove_memory()

    def _decode(self, source: VideoSource) -> None:
        """Frames go to the slots in turn, and the reader frees them in the same order, so the next slot is free
        once fewer than all of them wait for the reader."""
        slot, waiting = 0, 0
        while True:
            if waiting == _SLOTS:
                self._session.recv_bytes()
                waiting -= 1
            try:
                image = source.read()
            except InvalidFrame as error:
                self._session.send(("invalid", str(error)))
                continue
            if image is None:
                return
            memory = self._memory
            if memory is None or memory.size // _SLOTS < image.nbytes:
                for _ in range(waiting):  # a larger frame (a camera changed its resolution) gets new memory
                    self._session.recv_bytes()  # once the reader has copied out every frame of the old
                slot, waiting = 0, 0
                memory = self._replace_memory(image.nbytes)
            view = np.ndarray(image.shape, np.uint8, buffer=memory.buf, offset=slot * (memory.size // _SLOTS))
            view[...] = image
            del view
            self._session.send(("frame", slot, image.shape, source.position_ms(), memory.name))
            slot, waiting = (slot + 1) % _SLOTS, waiting + 1

    def _replace_memory(self, frame_bytes: int) -> SharedMemory:
        self._remove_memory()
        with self._memory_lock:
            self._memory = SharedMemory(create=True, size=_SLOTS * frame_bytes)
            return self._memory

    def _remove_memory(self) -> None:
        with self._memory_lock:
            memory, self._memory = self._memory, None
        if memory is None:
            return
        with contextlib.suppress(BufferError):  # a decoder stuck mid-copy still holds a view; the name goes anyway
            memory.close()
        memory.unlink()

