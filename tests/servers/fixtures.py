"""Real stream servers for reader tests: an RTSP server (GStreamer, in its own process) and an MJPEG server.

Load as a pytest plugin (`pytest_plugins = ["tests.servers.fixtures"]`); importing starts nothing.

- `RtspServer`: runs `rtsp_server.py` with the system Python (GStreamer's RTSP server comes from
  Debian's packages, see `tools/install-system-deps.sh`) and serves a clip in a loop as H.264 at
  `rtsp://127.0.0.1:PORT/stream`. `stop()` and `restart()` (same port) let tests break a stream and
  bring it back.
- `MjpegServer`: an HTTP `multipart/x-mixed-replace` server on a thread of the test process, the way
  many IP cameras serve MJPEG; it can cut its clients off mid-frame.
- Fixtures: `rtsp_server_factory`, `mjpeg_server_factory` (both stop what they started) and
  `stream_clip` (a small 'mp4v' MP4: a moving box and a frame counter).
"""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
INSTALL_HINT = "run tools/install-system-deps.sh (Debian packages for GStreamer's RTSP server)"

Image = npt.NDArray[np.uint8]

# The moving box's colour (BGR); `box_x` finds it again in decoded frames.
BOX_BGR = (0, 200, 255)
BOX_SIZE = 40


# ---------------------------------------------------------------------------------------------
# Sample clips and frames


def sample_frame(index: int, count: int, width: int = 320, height: int = 240) -> Image:
    """Frame `index` of `count`: a box moving left to right across the frame, and the index written in."""
    image = np.full((height, width, 3), 40, np.uint8)
    travel = max(width - BOX_SIZE - 20, 0)
    x = 10 + (travel * index) // max(count - 1, 1)
    top = max(height // 3 - BOX_SIZE // 2, 0)
    cv2.rectangle(image, (x, top), (x + BOX_SIZE - 1, top + BOX_SIZE - 1), BOX_BGR, -1)
    scale = max(height / 240, 0.4)
    cv2.putText(image, str(index), (8, height - 10), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2)
    return image


def sample_frames(count: int = 30, width: int = 320, height: int = 240) -> list[Image]:
    return [sample_frame(index, count, width, height) for index in range(count)]


def write_sample_clip(path: Path | str, width: int = 320, height: int = 240, frames: int = 30,
                      fps: float = 10.0) -> Path:
    """An MP4 written by OpenCV with the 'mp4v' (MPEG-4 Part 2) codec, as cameras' test clips often are."""
    target = Path(path)
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {target}")
    for image in sample_frames(frames, width, height):
        writer.write(image)
    writer.release()
    return target


def box_x(image: Image) -> float | None:
    """The moving box's centre column in a decoded frame, or None when it is not there."""
    b, g, r = (image[:, :, channel].astype(np.int16) for channel in range(3))
    mask = (abs(b - BOX_BGR[0]) < 60) & (abs(g - BOX_BGR[1]) < 60) & (abs(r - BOX_BGR[2]) < 60)
    if int(mask.sum()) < BOX_SIZE * BOX_SIZE // 4:
        return None
    return float(np.nonzero(mask)[1].mean())


def read_clip_frames(path: Path | str) -> list[Image]:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames: list[Image] = []
    try:
        while True:
            ok, image = capture.read()
            if not ok or image is None:
                break
            frames.append(image)
    finally:
        capture.release()
    if not frames:
        raise RuntimeError(f"no frames could be read from {path}")
    return frames


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# ---------------------------------------------------------------------------------------------
# RTSP


class RtspServerError(RuntimeError):
    pass


@functools.cache
def rtsp_unavailable_reason() -> str | None:
    """Why the RTSP server cannot run here (None when it can); checked once per test session."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found; the RTSP server needs the system Python with python3-gi; {INSTALL_HINT}"
    try:
        result = subprocess.run([SYSTEM_PYTHON, str(RTSP_SERVER_SCRIPT), "--check"], capture_output=True,
                                text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return f"checking GStreamer's RTSP server with {SYSTEM_PYTHON} timed out"
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        return (f"GStreamer's RTSP server is not usable from {SYSTEM_PYTHON} "
                f"({detail[-1] if detail else f'exit {result.returncode}'}); {INSTALL_HINT}")
    return None


def rtsp_describe(url: str, timeout_s: float = 5.0) -> int:
    """Send one RTSP DESCRIBE and return the reply's status code (200 once the stream can be played)."""
    parts = urllib.parse.urlsplit(url)
    request = (f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n"
               "User-Agent: vap-test-fixtures\r\n\r\n")
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 554), timeout=timeout_s) as conn:
        conn.sendall(request.encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    fields = reply.split(b"\r\n", 1)[0].split()
    if len(fields) < 2 or not fields[0].startswith(b"RTSP/") or not fields[1].isdigit():
        raise RtspServerError(f"not an RTSP reply from {url}: {reply[:80]!r}")
    return int(fields[1])


class RtspServer:
    """GStreamer's RTSP server in a child process, serving `clip` in a loop as H.264 on 127.0.0.1.

    `start()` returns once a DESCRIBE is answered with 200 (the stream can be played). The stream is
    shared: every client sees the same live stream, with a key frame at least every 10 frames.
    """

    def __init__(self, clip: Path | str, mount: str = "/stream", start_timeout_s: float = 30.0) -> None:
        self.clip = Path(clip)
        self.mount = mount if mount.startswith("/") else f"/{mount}"
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self.start_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RtspServerError("the RTSP server has not been started")
        return f"rtsp://127.0.0.1:{self.port}{self.mount}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, port: int | None = None) -> RtspServer:
        """Start serving on `port` (None: the port of the last start, or else any free one)."""
        if self.running:
            raise RtspServerError(f"already running at {self.url}")
        if not self.clip.is_file():
            raise RtspServerError(f"no such clip: {self.clip}")
        wanted = port if port is not None else (self.port or 0)
        began = time.monotonic()
        deadline = began + self.start_timeout_s
        self._close_stderr()
        # Kept open after stop() so stderr_text() still works; closed by __exit__ or the next start().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._process = subprocess.Popen(
            [SYSTEM_PYTHON, str(RTSP_SERVER_SCRIPT), "--port", str(wanted), "--mount", self.mount,
             "--clip", str(self.clip)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
        )
        try:
            self.port = self._wait_ready_line(deadline)
            self._wait_playable(deadline)
        except BaseException:
            self._terminate()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if the server has not exited after `timeout_s`. Keeps the port for restart()."""
        self._terminate(timeout_s)

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crashing camera would."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
        self._terminate(5.0)

    def restart(self, down_s: float = 0.0) -> RtspServer:
        """Stop, stay down `down_s` seconds, and start again on the same port."""
        port = self.port
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        return self.start(port)

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def __enter__(self) -> RtspServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and drop its captured stderr."""
        self.stop()
        self._close_stderr()

    def _failure(self, what: str) -> RtspServerError:
        code = self._process.poll() if self._process is not None else None
        status = f"exit code {code}" if code is not None else "still running"
        stderr = self.stderr_text().strip() or "(no output)"
        return RtspServerError(f"RTSP server for {self.clip} {what} ({status}); its stderr:\n{stderr}")

    def _wait_ready_line(self, deadline: float) -> int:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._failure(f"printed no READY line within {self.start_timeout_s:g} s")
                if not selector.select(min(remaining, 0.5)):
                    continue
                chunk = os.read(stdout.fileno(), 4096)
                if not chunk:
                    self._process.wait(5)
                    raise self._failure("exited before it was ready")
                buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode(errors="replace").strip()
        if not line.startswith("READY "):
            raise self._failure(f"printed {line!r} instead of READY")
        port = urllib.parse.urlsplit(line.split()[1]).port
        if port is None:
            raise self._failure(f"named no port in {line!r}")
        return port

    def _wait_playable(self, deadline: float) -> None:
        last = "no reply"
        while time.monotonic() < deadline:
            if not self.running:
                raise self._failure("exited before the stream could be played")
            try:
                status = rtsp_describe(self.url, timeout_s=max(0.5, min(5.0, deadline - time.monotonic())))
            except (OSError, RtspServerError) as error:
                last = str(error)
            else:
                if status == 200:
                    return
                last = f"DESCRIBE answered {status}"
            time.sleep(0.1)
        raise self._failure(f"did not serve {self.url} within {self.start_timeout_s:g} s (last: {last})")

    def _terminate(self, timeout_s: float = 5.0) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        if process.stdout is not None:
            process.stdout.close()

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


RtspServerFactory = Callable[..., RtspServer]


@pytest.fixture
def rtsp_server_factory() -> Iterator[RtspServerFactory]:
    """`start(clip, port=None, mount="/stream")` -> a started RtspServer; all are stopped after the test.

    Skips the test when GStreamer's RTSP server is not installed for the system Python.
    """
    reason = rtsp_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    servers: list[RtspServer] = []

    def start(clip: Path | str, port: int | None = None, mount: str = "/stream") -> RtspServer:
        server = RtspServer(clip, mount=mount)
        servers.append(server)
        return server.start(port)

    yield start
    for server in servers:
        server.close()


# ---------------------------------------------------------------------------------------------
# MJPEG over HTTP

BOUNDARY = "frame"


class _MjpegHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: MjpegServer


class _MjpegHandler(BaseHTTPRequestHandler):
    server: _MjpegHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        if urllib.parse.urlsplit(self.path).path != owner.path:
            self.send_error(404)
            return
        owner._serve(self)


class MjpegServer:
    """An MJPEG camera: `multipart/x-mixed-replace; boundary=frame` over HTTP, at `fps`, on 127.0.0.1.

    Serves the frames of `clip`, or the given `frames`, or else generated ones (`sample_frames`), in a
    loop; every client starts at the first frame. `frames_per_connection` cuts each client off
    mid-frame after that many frames (the server keeps listening); `stop(abrupt=True)` cuts all
    clients off mid-frame, `drop_clients()` does so while the server keeps listening.
    """

    def __init__(self, clip: Path | str | None = None, frames: Sequence[Image] | None = None, fps: float = 10.0,
                 size: tuple[int, int] = (320, 240), count: int = 30, quality: int = 90,
                 frames_per_connection: int | None = None, path: str = "/stream.mjpg") -> None:
        if clip is not None:
            images = read_clip_frames(clip)
        elif frames is not None:
            images = list(frames)
        else:
            images = sample_frames(count, *size)
        if not images:
            raise ValueError("an MJPEG server needs at least one frame")
        self.size = (int(images[0].shape[1]), int(images[0].shape[0]))
        self.fps = fps
        self.frames_per_connection = frames_per_connection
        self.path = path if path.startswith("/") else f"/{path}"
        self.jpegs = [self._encode(image, quality) for image in images]
        self.port: int | None = None
        self.frames_sent = 0
        self.connections = 0
        self._httpd: _MjpegHttpServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._abrupt = False
        self._drop_generation = 0
        self._lock = threading.Condition()
        self._clients: set[socket.socket] = set()

    @staticmethod
    def _encode(image: Image, quality: int) -> bytes:
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("cannot encode a frame as JPEG")
        return bytes(encoded.tobytes())

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the MJPEG server has not been started")
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, port: int | None = None) -> MjpegServer:
        if self.running:
            raise RuntimeError(f"already serving {self.url}")
        wanted = port if port is not None else (self.port or 0)
        self._stopping.clear()
        self._abrupt = False
        httpd = _MjpegHttpServer(("127.0.0.1", wanted), _MjpegHandler)
        httpd.owner = self
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"mjpeg-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, abrupt: bool = False, timeout_s: float = 5.0) -> None:
        """Stop listening and end every client's stream: with the closing boundary, or mid-frame if `abrupt`."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        with self._lock:
            self._abrupt = abrupt
            self._stopping.set()
            self._lock.notify_all()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout_s)
        self._wait_clients_gone(timeout_s)
        self._httpd = None
        self._thread = None

    def drop_clients(self, timeout_s: float = 5.0) -> None:
        """Cut every connected client off mid-frame; the server keeps accepting new ones."""
        with self._lock:
            self._drop_generation += 1
            self._lock.notify_all()
        self._wait_clients_gone(timeout_s)

    def restart(self, down_s: float = 0.0) -> MjpegServer:
        port = self.port
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        return self.start(port)

    def __enter__(self) -> MjpegServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def _wait_clients_gone(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._clients and time.monotonic() < deadline:
                self._lock.wait(0.05)
            for client in self._clients:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)

    def _serve(self, handler: _MjpegHandler) -> None:
        connection: socket.socket = handler.connection
        with self._lock:
            self._clients.add(connection)
            self.connections += 1
            generation = self._drop_generation
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            handler.send_header("Cache-Control", "no-cache, no-store")
            handler.send_header("Connection", "close")
            handler.end_headers()
            interval = 1.0 / self.fps
            next_at = time.monotonic()
            sent = 0
            while True:
                with self._lock:
                    while not self._stopping.is_set() and generation == self._drop_generation:
                        remaining = next_at - time.monotonic()
                        if remaining <= 0:
                            break
                        self._lock.wait(remaining)
                    stopping, dropped = self._stopping.is_set(), generation != self._drop_generation
                    cut = self._abrupt if stopping else dropped
                jpeg = self.jpegs[sent % len(self.jpegs)]
                head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n").encode()
                limit = self.frames_per_connection
                if cut or (limit is not None and sent >= limit):
                    handler.wfile.write(head + jpeg[: len(jpeg) // 2])
                    handler.wfile.flush()
                    connection.shutdown(socket.SHUT_RDWR)
                    return
                if stopping:
                    handler.wfile.write(f"--{BOUNDARY}--\r\n".encode())
                    handler.wfile.flush()
                    return
                handler.wfile.write(head + jpeg + b"\r\n")
                handler.wfile.flush()
                sent += 1
                with self._lock:
                    self.frames_sent += 1
                next_at = max(next_at + interval, time.monotonic() - interval)
        except OSError:
            pass  # the client went away
        finally:
            with self._lock:
                self._clients.discard(connection)
                self._lock.notify_all()


MjpegServerFactory = Callable[..., MjpegServer]


@pytest.fixture
def mjpeg_server_factory() -> Iterator[MjpegServerFactory]:
    """`start(**MjpegServer options, port=None)` -> a started MjpegServer; all are stopped after the test."""
    servers: list[MjpegServer] = []

    def start(port: int | None = None, **options: Any) -> MjpegServer:
        server = MjpegServer(**options)
        servers.append(server)
        return server.start(port)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def stream_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3 s 'mp4v' MP4 (320x240, 10 fps, 30 frames): a box moving left to right and a frame counter."""
    return write_sample_clip(tmp_path_factory.mktemp("stream-clips") / "moving-box.mp4")
