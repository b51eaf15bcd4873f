"""A real Prometheus server scrapes a running pipeline; PromQL answers match what the test produced."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.app import Pipeline
from pipeline.tools.broker import EmbeddedBroker, free_port
from tests.conftest import ConfigFactory, decode, read_topic, unused_topic, wait_for, write_moving_box_clip

PROMETHEUS = shutil.which("prometheus")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[Any]:
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus package is not installed (tools/install-system-deps.sh installs it)")

    class Server:
        process: subprocess.Popen[bytes] | None = None
        port = free_port()

        def start(self, target_port: int) -> None:
            config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                      "scrape_configs": [{"job_name": "vap", "static_configs": [
                          {"targets": [f"127.0.0.1:{target_port}"]}]}]}
            config_path = tmp_path / "prometheus.yml"
            config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
            self.process = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )

        def query(self, promql: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
            assert body["status"] == "success", body
            result: list[dict[str, Any]] = body["data"]["result"]
            return result

        def scalar(self, promql: str) -> float | None:
            result = self.query(promql)
            return float(result[0]["value"][1]) if result else None

    server = Server()
    yield server
    if server.process is not None:
        server.process.terminate()
        server.process.wait(timeout=10)


def test_prometheus_reports_per_stream_fps_drops_and_p99_latency_that_match_the_run(
    tmp_path: Path, broker: EmbeddedBroker, make_config: ConfigFactory, prometheus_server: Any
) -> None:
    # 15 s, so the 4 s rate windows have a steady middle even when the first scrape comes late on a busy host.
    clip_frames = 150
    clip = write_moving_box_clip(tmp_path / "ten-fps.mp4", 320, 192, frames=clip_frames, fps=10.0)
    topic = unused_topic("prom")
    port = free_port()
    config = make_config(
        [{"id": "full", "url": str(clip)}, {"id": "capped", "url": str(clip), "fps": 5}],
        broker.bootstrap_servers, topic, model={"warmup": True}, http={"port": port},
    )
    prometheus_server.start(port)
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        wait_for(lambda: prometheus_server.scalar('up{job="vap"}') == 1, 60, "Prometheus never scraped vap",
                 ignore=(OSError,))
        rates: list[float] = []
        while not pipeline.sources_exhausted():
            rate = prometheus_server.scalar('rate(vap_frames_processed_total{stream="full"}[4s])')
            if rate:
                rates.append(rate)
            time.sleep(1)
        registry = pipeline.registry

        def counted_by_publisher() -> float:
            return sum(registry.get_sample_value("vap_frames_processed_total", {"stream": s}) or 0.0
                       for s in ("full", "capped"))

        wait_for(lambda: counted_by_publisher() == pipeline.processed, 10,
                 "the publisher never counted every delivered frame")
        expected_drops = registry.get_sample_value(
            "vap_frames_dropped_total", {"stream": "capped", "reason": "fps_cap"})
        expected_full = registry.get_sample_value("vap_frames_processed_total", {"stream": "full"})
        # 30 s: on a loaded 2-core host a scrape can miss its 1 s timeout several times in a row.
        drops = 'vap_frames_dropped_total{stream="capped",reason="fps_cap"}'
        processed = 'vap_frames_processed_total{stream="full"}'
        wait_for(lambda: prometheus_server.scalar(drops) == expected_drops, 30,
                 f"drop count never matched {expected_drops}", ignore=(OSError,))
        wait_for(lambda: prometheus_server.scalar(processed) == expected_full, 30,
                 f"processed count never matched {expected_full}", ignore=(OSError,))
        p99 = prometheus_server.scalar(
            'histogram_quantile(0.99, sum by (le) (vap_end_to_end_latency_seconds_bucket{stream="full"}))')
    finally:
        pipeline.stop()
    assert expected_drops is not None and 0.4 * clip_frames <= expected_drops <= 0.6 * clip_frames, (
        "a 5 fps cap on 10 fps drops about half")
    fps = sorted(rates)[len(rates) // 2] if rates else None
    assert fps is not None and 7 <= fps <= 13, f"Prometheus saw {rates} frames/s for a 10 frames/s stream"
    latencies = sorted(decode(r)["latency_ms"]["total"] / 1000 for r in read_topic(
        broker.bootstrap_servers, topic, expected=pipeline.processed) if r.key == b"full")
    # Prometheus ranks at 0.99 x count, between these two observations; they can sit in neighbouring buckets.
    true_p99 = latencies[int(0.99 * (len(latencies) - 1))]
    next_up = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)))]
    buckets = [b for b in pipeline.metrics.end_to_end_latency._upper_bounds]
    upper = next(b for b in buckets if b >= next_up)
    lower = max([0.0] + [b for b in buckets if b < true_p99])
    assert p99 is not None and lower <= p99 <= upper, f"Prometheus p99 {p99} vs measured {true_p99}-{next_up}"


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (tools/install-system-deps.sh installs Debian's prometheus)")
    rules = REPO / "deploy" / "prometheus" / "alerts.yml"
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_removed_stream_leaves_no_series_behind_and_comes_back_from_zero() -> None:
    from prometheus_client import CollectorRegistry

    from pipeline.ops.metrics import PipelineMetrics

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    metrics.add_stream("cam")
    metrics.stream("cam").frames_read.inc(3)
    metrics.stream("cam").detections("car").inc(2)
    metrics.stream("cam").end_to_end_latency.observe(0.1)
    metrics.stream("cam").zone_events("door", "enter", "person").inc()
    metrics.stream("cam").occupancy("door", "person").set(3)

    metrics.remove_stream("cam")
    metrics.stream("cam").frames_processed.inc()  # a result still in flight
    metrics.stream("cam").occupancy("door", "person").set(2)

    left = [s for family in registry.collect() for s in family.samples if s.labels.get("stream") == "cam"]
    assert left == []
    metrics.add_stream("cam")
    assert registry.get_sample_value("vap_frames_read_total", {"stream": "cam"}) == 0.0
    assert registry.get_sample_value("vap_detections_total", {"stream": "cam", "label": "car"}) is None


def test_series_a_frame_carries_from_before_its_streams_removal_never_export_the_stream_again() -> None:
    from prometheus_client import CollectorRegistry

    from pipeline.ops.metrics import PipelineMetrics

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    metrics.add_stream("cam")
    carried = metrics.stream("cam")  # what the reader stamps on each frame it reads (Frame.series)
    carried.detections("car").inc()
    metrics.remove_stream("cam")

    carried.frames_processed.inc()
    carried.detections("car").inc()
    carried.detections("person").inc()  # a label the stream had not reported before it was removed
    carried.zone_events("door", "enter", "person").inc()
    carried.occupancy("door", "person").set(1)

    assert not [s for family in registry.collect() for s in family.samples if s.labels.get("stream") == "cam"]


def test_streams_added_and_removed_for_ever_leave_bounded_bookkeeping() -> None:
    from prometheus_client import CollectorRegistry

    from pipeline.ops.metrics import PipelineMetrics

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    for index in range(3000):
        metrics.add_stream(f"cam-{index}")
        metrics.remove_stream(f"cam-{index}")
        metrics.stream(f"cam-{index}").frames_processed.inc()
    assert len(metrics._removed) <= 1024 and metrics._unexported is not None
    assert len(metrics._unexported.frames_processed._metrics) <= 64
    assert not [s for family in registry.collect() for s in family.samples if "stream" in s.labels]
