"""The dashboard's side of many cameras, measured: how many result messages per second its Kafka consumer
takes in on one CPU core, and what one pushed update of every tile costs its server.

    python benchmarks/dashboard_throughput.py --json benchmarks/results-dashboard.json

A real broker is filled with `--seconds` of traffic from `--streams` cameras: `vap.frame.v1` messages shaped
like a segmentation model's (`--detections` objects, each with a mask outline of `--outline-points`), and a
JPEG for every `--picture-every`-th frame, as `kafka.snapshots.topic` sends them. The dashboard's own feed
(`pipeline.dashboard.feed`) then reads it all from the start, pinned to one core, and the time it takes gives
messages per second. The goal (issue: the dashboard) is 64 cameras at 10 frames/s with room to spare; the
ratio printed is what it keeps up with over what those cameras send.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson

from pipeline.config import KafkaConfig
from pipeline.dashboard.feed import FeedTopics, KafkaFeed
from pipeline.dashboard.state import DashboardState
from pipeline.dashboard.web import without_repeated_overlays
from pipeline.tools.bench import progress
from pipeline.tools.broker import EmbeddedBroker


def frame_message(stream_id: str, frame_id: int, detections: int, outline_points: int,
                  rng: np.random.Generator) -> bytes:
    objects = []
    for index in range(detections):
        x, y = rng.uniform(0, 1800), rng.uniform(0, 1000)
        angles = np.linspace(0, 2 * np.pi, outline_points, endpoint=False)
        outline = np.round(np.stack([x + 40 + 40 * np.cos(angles), y + 40 + 40 * np.sin(angles)], axis=1), 2)
        objects.append({"class_id": index % 3, "label": ("person", "car", "bicycle")[index % 3],
                        "confidence": round(float(rng.uniform(0.3, 1)), 4),
                        "bbox": {"x1": round(x, 2), "y1": round(y, 2), "x2": round(x + 80, 2), "y2": round(y + 80, 2)},
                        "track_id": index + 1, "mask": {"polygon": outline}})
    now = "2026-12-07T10:00:00.000Z"
    return orjson.dumps({
        "schema": "vap.frame.v1", "stream_id": stream_id, "frame_id": frame_id, "pts_ms": frame_id * 100.0,
        "captured_at": now, "published_at": now, "image": {"width": 1920, "height": 1080},
        "model": {"name": "yolo11n-seg", "task": "segment"},
        "latency_ms": {"queue": 3.1, "inference": 18.2, "total": 38.0}, "detections": objects,
    }, option=orjson.OPT_SERIALIZE_NUMPY)


def a_picture(width: int = 640) -> bytes:
    """A JPEG the size vap sends by default (640 wide, quality 80) of a noisy scene, not a flat one."""
    rng = np.random.default_rng(7)
    image = cv2.GaussianBlur(rng.integers(0, 255, (360, width, 3), np.uint8), (7, 7), 0)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return bytes(encoded.tobytes())


def fill(bootstrap: str, topics: FeedTopics, options: argparse.Namespace) -> tuple[int, int, int]:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20, max_request_size=8 << 20,
                             compression_type="zstd")
    rng = np.random.default_rng(1)
    picture = a_picture()
    frames = pictures = frame_bytes = 0
    total = options.streams * int(options.fps * options.seconds)
    for frame_id in range(int(options.fps * options.seconds)):
        for stream in range(options.streams):
            stream_id = f"cam-{stream:03d}"
            value = frame_message(stream_id, frame_id, options.detections, options.outline_points, rng)
            producer.send(topics.frames, value=value, key=stream_id.encode())
            frames, frame_bytes = frames + 1, frame_bytes + len(value)
            if frame_id % options.picture_every == 0:
                assert topics.snapshots is not None
                producer.send(topics.snapshots, value=picture, key=stream_id.encode(),
                              headers=[("frame_id", str(frame_id).encode()), ("content-type", b"image/jpeg")])
                pictures += 1
        if frame_id % 50 == 0:
            progress(f"filling the broker: {frames}/{total} frame messages")
    producer.flush()
    producer.close()
    return frames, pictures, frame_bytes


def ingest(bootstrap: str, topics: FeedTopics, frames: int, pictures: int) -> dict[str, Any]:
    """The feed reads everything from the start; the clock runs from its first record to its last."""
    state = DashboardState()
    feed = KafkaFeed(KafkaConfig(bootstrap_servers=bootstrap), topics, state)
    cpu_before = time.process_time()
    feed.start()
    while state.messages == 0:
        time.sleep(0.001)
    started = time.perf_counter()
    cpu_started = time.process_time()
    last_report = started
    while state.messages < frames:
        time.sleep(0.005)
        if time.perf_counter() - last_report > 2:
            last_report = time.perf_counter()
            progress(f"dashboard read {state.messages}/{frames} frame messages")
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    feed.stop()
    feed.join(5)
    return {"seconds": round(elapsed, 2), "frame_messages_per_s": round(frames / elapsed),
            "pictures_per_s": round(pictures / elapsed), "cpu_seconds": round(cpu, 2),
            "cpu_seconds_including_start": round(time.process_time() - cpu_before, 2), "state": state}


def push_cost(state: DashboardState, rounds: int = 50) -> dict[str, Any]:
    """An update with every tile changed (every camera sent something since the last tick, the usual case at
    10 frames/s): the first one a page gets, with every picture's overlay, and the steady ones after it."""
    stream_ids = list(state.versions())
    pictures_sent: dict[str, str] = {}
    first = len(orjson.dumps({"streams": without_repeated_overlays(state.views(stream_ids), pictures_sent)}))
    sizes, started = [], time.perf_counter()
    for _ in range(rounds):
        for view in state._streams.values():  # new versions: nothing cached
            view.version += 1
        views = without_repeated_overlays(state.views(stream_ids), pictures_sent)
        sizes.append(len(orjson.dumps({"streams": views})))
    per_update_ms = (time.perf_counter() - started) / rounds * 1000
    return {"streams": len(stream_ids), "ms_per_update": round(per_update_ms, 2),
            "bytes_first_update": first, "bytes_per_update": int(np.median(sizes))}


PAGE_PROBE = """
window.benchProbe = {updates: [], longTaskMs: 0};
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.benchProbe.longTaskMs += entry.duration;
}).observe({type: "longtask", buffered: true});
const source = new EventSource("api/updates");
source.addEventListener("update", (message) => {
  const update = JSON.parse(message.data);
  window.benchProbe.updates.push(Date.now() / 1000 - update.server_time);
});
"""


def cameras(bootstrap: str, topics: FeedTopics, options: argparse.Namespace, stop: Any, sent: Any) -> None:
    """Cameras sending in real time, in a process of their own (so they never take the dashboard's GIL), from
    messages encoded ahead of time: only the frame id changes."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    rng, picture = np.random.default_rng(2), a_picture()
    templates = {f"cam-{stream:03d}": [frame_message(f"cam-{stream:03d}", 999_999_999, options.detections,
                                                     options.outline_points, rng) for _ in range(5)]
                 for stream in range(options.streams)}
    started, frame_id = time.monotonic(), 0
    while not stop.is_set():
        for stream_id, variants in templates.items():
            value = variants[frame_id % len(variants)].replace(b'"frame_id":999999999', b'"frame_id":%d' % frame_id)
            producer.send(topics.frames, key=stream_id.encode(), value=value)
            if frame_id % options.picture_every == 0:
                assert topics.snapshots is not None
                producer.send(topics.snapshots, value=picture, key=stream_id.encode(),
                              headers=[("frame_id", str(frame_id).encode())])
        frame_id += 1
        sent.value = frame_id
        stop.wait(max(0.0, started + frame_id / options.fps - time.monotonic()))
    producer.close()


def live_page(topics: FeedTopics, options: argparse.Namespace) -> dict[str, Any]:
    """Cameras sending in real time, the dashboard, and a headless Chromium showing every tile: does the page
    keep up? Measured in the page: updates a second, how late each arrives, main-thread long tasks, and how
    far behind the cameras the pictures on screen are."""
    import multiprocessing
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    from pipeline.dashboard.service import Dashboard, DashboardSettings

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        return {"skipped": "needs Debian's chromium and chromium-driver"}
    context = multiprocessing.get_context("spawn")
    with EmbeddedBroker() as broker:
        stop, sent = context.Event(), context.Value("q", 0)
        sender = context.Process(target=cameras, args=(broker.bootstrap_servers, topics, options, stop, sent),
                                 name="cameras")
        sender.start()
        dashboard = Dashboard(DashboardSettings(kafka=KafkaConfig(bootstrap_servers=broker.bootstrap_servers),
                                                topics=replace_history(topics), port=0))
        dashboard.start()
        chrome_options = Options()
        chrome_options.binary_location = chromium
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
            chrome_options.add_argument(argument)
        browser = webdriver.Chrome(options=chrome_options, service=Service(driver_path))
        try:
            browser.get(dashboard.url)
            time.sleep(8)  # every tile made and its first picture loaded
            browser.execute_script(PAGE_PROBE)
            progress(f"watching {options.streams} live tiles for {options.browser_seconds:.0f} s")
            time.sleep(options.browser_seconds)
            probe = browser.execute_script("return window.benchProbe")
            tiles = browser.execute_script("return document.querySelectorAll('.tile').length")
            drawn = browser.execute_script("const api = window.vapDashboard; "
                                           "return Array.from(api.visible).map(id => api.drawn[id].frame_id)")
            newest = int(sent.value)
            results_behind = newest - min(view["frame_id"] or 0 for view in dashboard.state.views())
        finally:
            browser.quit()
            stop.set()
            sender.join(10)
            dashboard.stop()
    delays = sorted(probe["updates"])
    return {"seconds": options.browser_seconds, "tiles": tiles, "frames_sent_per_stream": newest,
            "updates_per_s": round(len(delays) / options.browser_seconds, 2),
            "update_delay_p50_ms": round(1000 * delays[len(delays) // 2]) if delays else None,
            "update_delay_max_ms": round(1000 * delays[-1]) if delays else None,
            "long_tasks_ms_per_s": round(probe["longTaskMs"] / options.browser_seconds, 1),
            "results_behind_frames_max": results_behind,
            "tiles_on_screen": len(drawn), "picture_behind_frames_max": newest - min(drawn) if drawn else None}


def replace_history(topics: FeedTopics) -> FeedTopics:
    from dataclasses import replace

    return replace(topics, history=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="of camera traffic put in the broker")
    parser.add_argument("--detections", type=int, default=5)
    parser.add_argument("--outline-points", type=int, default=60)
    parser.add_argument("--picture-every", type=int, default=10)
    parser.add_argument("--cpu", type=int, default=0, help="the core the dashboard is pinned to")
    parser.add_argument("--browser-seconds", type=float, default=20.0,
                        help="then watch live cameras in headless Chromium this long (0: skip)")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    topics = FeedTopics(frames="bench.frames", events=None, snapshots="bench.snapshots", history=10**12)
    with EmbeddedBroker() as broker:
        frames, pictures, frame_bytes = fill(broker.bootstrap_servers, topics, options)
        progress(f"filled: {frames} frame messages (mean {frame_bytes / frames:.0f} B), {pictures} pictures")
        os.sched_setaffinity(0, {options.cpu})
        result = ingest(broker.bootstrap_servers, topics, frames, pictures)
        push = push_cost(result.pop("state"))
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    page = live_page(topics, options) if options.browser_seconds > 0 else {"skipped": "--browser-seconds 0"}
    needed = options.streams * options.fps
    report = {
        "setup": {"streams": options.streams, "fps": options.fps, "detections": options.detections,
                  "outline_points": options.outline_points, "picture_every": options.picture_every,
                  "frame_messages": frames, "pictures": pictures,
                  "mean_frame_message_bytes": round(frame_bytes / frames),
                  "cores": 1, "cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
        "ingest": result,
        "needed_frame_messages_per_s": needed,
        "headroom": round(result["frame_messages_per_s"] / needed, 2),
        "push": push,
        "page": page,
    }
    print(f"dashboard consumer on one core: {result['frame_messages_per_s']} frame messages/s and "
          f"{result['pictures_per_s']} pictures/s; {options.streams} cameras at {options.fps:g} frames/s send "
          f"{needed:.0f}/s: {report['headroom']}x headroom")
    print(f"an update of all {push['streams']} tiles: {push['ms_per_update']} ms of the server's time, "
          f"{push['bytes_per_update'] / 1024:.0f} KiB to each page (the first one "
          f"{push['bytes_first_update'] / 1024:.0f} KiB)")
    if "skipped" not in page:
        print(f"a browser showing {page['tiles']} live tiles: {page['updates_per_s']} updates/s, each "
              f"{page['update_delay_p50_ms']} ms late (worst {page['update_delay_max_ms']} ms), "
              f"{page['long_tasks_ms_per_s']} ms/s of long tasks; the newest results at most "
              f"{page['results_behind_frames_max']} frames behind the cameras, pictures on the "
              f"{page['tiles_on_screen']} tiles on screen at most "
              f"{page['picture_behind_frames_max']} (one picture per {options.picture_every} frames)")
    if options.json is not None:
        options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
