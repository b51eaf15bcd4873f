"""One running dashboard: the state, the Kafka feed and the HTTP server, started and stopped together."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from pipeline.config import KafkaConfig
from pipeline.dashboard.feed import FeedTopics, KafkaFeed
from pipeline.dashboard.state import DashboardState
from pipeline.dashboard.web import build_dashboard_app
from pipeline.ops.http import HttpServer

log = logging.getLogger(__name__)

_FEED_STALLED_S = 30.0


@dataclass(frozen=True)
class DashboardSettings:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    topics: FeedTopics = field(default_factory=FeedTopics)
    host: str = "127.0.0.1"
    port: int = 8080
    auth_token: str | None = None
    stale_after_s: float = 5.0
    tick_s: float = 0.5


class Dashboard:
    """`start()`, read `url`, `stop()`. The port is taken in the constructor, so a port in use fails before
    anything starts."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        self.state = DashboardState(settings.stale_after_s)
        self.feed = KafkaFeed(settings.kafka, settings.topics, self.state)
        self._closing = threading.Event()
        app = build_dashboard_app(self.state, settings.auth_token, settings.tick_s, self._feed_alive, self._closing)
        self._server = HttpServer(settings.host, settings.port, app, option="--")

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def _feed_alive(self) -> bool:
        return self.feed.is_alive() and time.monotonic() - self.feed.last_turn < _FEED_STALLED_S

    def start(self) -> None:
        self.feed.start()
        self._server.start()
        log.debug("dashboard on %s, reading Kafka at %s", self.url, self.settings.kafka.bootstrap_servers)

    def stop(self, timeout_s: float = 3.0) -> None:
        self._closing.set()
        self.feed.stop()
        self._server.stop(timeout_s)
        self.feed.join(timeout_s)


def settings_from(config: tuple[KafkaConfig, str] | None, args: argparse.Namespace) -> DashboardSettings:
    """The command line's settings: flags first, then the vap config's (`-c`: its `kafka:` section and events
    topic), then the defaults."""
    kafka, events_topic = config if config is not None else (KafkaConfig(), "vap.events")
    if args.bootstrap:
        kafka = kafka.model_copy(update={"bootstrap_servers": args.bootstrap})
    topics = FeedTopics(
        frames=args.topic or kafka.topic,
        events=args.events_topic or events_topic,
        snapshots=args.snapshots_topic or kafka.snapshots.topic or "vap.snapshots",
    )
    return DashboardSettings(kafka=kafka, topics=topics, host=args.host, port=args.port,
                             auth_token=args.auth_token, stale_after_s=args.stale_after)


def serve(settings: DashboardSettings) -> int:
    """`vap dashboard`: runs until SIGINT or SIGTERM."""
    try:
        dashboard = Dashboard(settings)
    except RuntimeError as error:
        print(f"vap dashboard: {error}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    dashboard.start()
    print(f"vap dashboard: {dashboard.url} (Kafka {settings.kafka.bootstrap_servers}; Ctrl-C stops)", flush=True)
    while not stop.wait(0.5):
        pass
    dashboard.stop()
    return 0
