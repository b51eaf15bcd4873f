"""`vap dashboard` end to end: vap runs the bundled model on two synthetic clips and publishes results and
pictures to a real broker; the dashboard reads them from Kafka alone; a real headless Chromium (Debian's
`chromium` and `chromium-driver`, driven by Selenium) shows them.

The overlay is checked against the clip generator's ground truth for the very frame whose picture is shown,
and against that frame's own message. Screenshots go to tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

import http.client
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import pytest

from pipeline.app import Pipeline
from pipeline.config import KafkaConfig
from pipeline.dashboard.feed import FeedTopics
from pipeline.dashboard.service import Dashboard, DashboardSettings
from pipeline.tools.broker import EmbeddedBroker, free_port
from pipeline.tools.demo import SHIPPED_WEIGHTS
from pipeline.tools.synth.clips import write_scripted_clip
from pipeline.tools.synth.world import GroundTruthObject, SceneSpec, _Track
from tests.conftest import decode, read_topic, sample, unused_topic, wait_for

pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="the bundled model is not in the tree")

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SIZE = (480, 272)
LONG_FRAMES, SHORT_FRAMES = 90, 25
PICTURE_EVERY = 2
BOX_TOLERANCE_PX = 6.0
ZONE = [[150, 20], [330, 20], [330, 250], [150, 250]]  # the circle's bottom centre is inside for frames 27-86


def track(object_id: int, class_id: int, start: tuple[float, float], velocity: tuple[float, float], frames: int,
          colour: tuple[float, float, float]) -> _Track:
    return _Track(object_id=object_id, class_id=class_id, start_frame=0, end_frame=frames - 1, x0=start[0],
                  y0=start[1], vx=velocity[0], vy=velocity[1], bounce_frames=0, size=32, angle0=0.3, spin=0.02,
                  colour=colour, shade=(0.0, 0.0), z=float(object_id))


def render_clip(path: Path, frames: int, seed: int, tracks: tuple[_Track, ...]) -> list[list[GroundTruthObject]]:
    spec = SceneSpec(width=SIZE[0], height=SIZE[1], n_frames=frames, fps=10.0, seed=seed, n_objects=0)
    return write_scripted_clip(path, spec, tracks)


@dataclass
class Site:
    pipeline: Pipeline
    dashboard: Dashboard
    truth: dict[str, list[list[GroundTruthObject]]]
    topic: str
    snapshots_topic: str


@pytest.fixture(scope="module")
def site(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory, model_weights: str) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("dashboard-clips")
    truth = {
        "cam-long": render_clip(directory / "long.mp4", LONG_FRAMES, 8811, (
            track(1, 0, (70, 90), (3, 0), LONG_FRAMES, (40, 40, 230)),
            track(2, 1, (380, 190), (0, -1), LONG_FRAMES, (230, 200, 40)))),
        "cam-short": render_clip(directory / "short.mp4", SHORT_FRAMES, 8812, (
            track(1, 2, (200, 140), (2, 0), SHORT_FRAMES, (60, 220, 60)),)),
    }
    topic, snapshots_topic = unused_topic("dash"), unused_topic("dash-pictures")
    config = _config(model_weights, broker.bootstrap_servers, topic, snapshots_topic, directory)
    pipeline = Pipeline(config)
    dashboard = Dashboard(DashboardSettings(
        kafka=KafkaConfig(bootstrap_servers=broker.bootstrap_servers),
        topics=FeedTopics(frames=topic, events=None, snapshots=snapshots_topic),
        port=0, stale_after_s=2.0, tick_s=0.25))
    dashboard.start()
    pipeline.start()
    try:
        yield Site(pipeline, dashboard, truth, topic, snapshots_topic)
    finally:
        pipeline.stop()
        dashboard.stop()


def _config(weights: str, bootstrap: str, topic: str, snapshots_topic: str, directory: Path) -> Any:
    from pipeline.config import parse_config

    return parse_config({
        "streams": [{"id": "cam-long", "url": str(directory / "long.mp4"), "realtime": True,
                     "analytics": {"zones": [{"id": "yard", "polygon": ZONE}]}},
                    {"id": "cam-short", "url": str(directory / "short.mp4"), "realtime": True}],
        "model": {"weights": weights, "imgsz": 320, "agnostic_nms": True},
        "batching": {"max_batch": 2, "max_wait_ms": 10},
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "linger_ms": 0,
                  "snapshots": {"topic": snapshots_topic, "every_n_frames": PICTURE_EVERY, "max_width": 320}},
        "http": {"host": "127.0.0.1", "port": 0},
    })


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver: run `bash tools/install-system-deps.sh`")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def script(driver: Any, code: str) -> Any:
    return driver.execute_script(code)


def drawn(driver: Any, stream_id: str) -> dict[str, Any] | None:
    value: dict[str, Any] | None = script(
        driver, f"return window.vapDashboard && window.vapDashboard.drawn[{orjson.dumps(stream_id).decode()}] || null")
    return value


def test_tiles_show_each_picture_with_its_own_frames_detections_live_and_a_stopped_stream_turns_stale(
        site: Site, browser: Any) -> None:
    browser.set_window_size(1280, 800)
    browser.get(site.dashboard.url)
    script(browser, "window.loadedOnce = 'yes'")
    wait_for(lambda: (d := drawn(browser, "cam-long")) and d["picture"] and d["overlay"] and d["boxes"], 30,
             "no picture with an overlay was drawn for cam-long")
    shown = drawn(browser, "cam-long")
    assert shown is not None and shown["picture"].startswith("api/pictures/")

    objects = [obj for obj in site.truth["cam-long"][shown["frame_id"]] if obj.visible_fraction > 0.9]
    assert len(objects) == 2
    for obj in objects:
        near = [box for box in shown["boxes"] if box["label"] == obj.label
                and max(abs(a - b) for a, b in zip(box["source"], obj.bbox, strict=True)) <= BOX_TOLERANCE_PX]
        assert near, f"frame {shown['frame_id']}: no {obj.label} drawn near {obj.bbox}: {shown['boxes']}"
    for box in shown["boxes"]:  # the canvas scale, applied exactly
        scaled = [value * shown["scale"] for value in box["source"]]
        assert np.allclose([box["x1"], box["y1"], box["x2"], box["y2"]], scaled, atol=0.01)
    assert shown["canvas"]["width"] == 320  # the picture's own width (max_width), not the source's
    (zone,) = shown["zones"]
    assert zone["id"] == "yard" and np.allclose(zone["points"], np.array(ZONE) * shown["scale"], atol=0.1)
    frame = shown["frame_id"]
    if not any(abs(frame - edge) <= 3 for edge in (27, 87)):  # the tracker may take a frame or two at the edge
        assert zone["count"] == (1 if 27 <= frame < 87 else 0), (frame, zone)

    first_frame = shown["frame_id"]
    wait_for(lambda: (d := drawn(browser, "cam-long")) and d["frame_id"] > first_frame + PICTURE_EVERY, 10,
             "the picture did not change without a reload")
    assert script(browser, "return window.loadedOnce") == "yes"
    wait_for(lambda: (d := drawn(browser, "cam-long")) and 35 <= d["frame_id"] <= 80, 10,
             "no picture of the circle inside the zone was drawn")
    inside = drawn(browser, "cam-long")
    assert inside is not None
    assert inside["zones"][0]["count"] == 1, inside["zones"]

    short = '[data-stream="cam-short"]'
    wait_for(lambda: script(browser, f"return document.querySelector('{short}').classList.contains('stale')"), 15,
             "cam-short did not turn stale after its clip ended")
    note = script(browser, f"return document.querySelector('{short} .stale-note').textContent")
    assert note.startswith("No frames for ")
    assert not script(browser, "return document.querySelector('[data-stream=\"cam-long\"]').classList"
                               ".contains('stale')")
    browser.save_screenshot(str(ARTIFACTS / "dashboard-1280x800.png"))

    _check_accessibility_basics(browser)
    browser.set_window_size(390, 844)
    time.sleep(0.5)
    assert script(browser, "return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(str(ARTIFACTS / "dashboard-phone.png"))
    browser.get(site.dashboard.url + "#stream=cam-long")
    wait_for(lambda: script(browser, "return !document.getElementById('detail').hidden"), 10, "no detail view")
    browser.save_screenshot(str(ARTIFACTS / "dashboard-detail-phone.png"))
    browser.set_window_size(1280, 800)


def _check_accessibility_basics(driver: Any) -> None:
    """Every tile names its camera in text and describes its picture; text contrast is at least WCAG AA's 4.5."""
    tiles = script(driver, """return Array.from(document.querySelectorAll('.tile')).map(t => ({
        name: t.querySelector('h2 .name').textContent,
        label: t.querySelector('canvas').getAttribute('aria-label')}))""")
    assert {tile["name"] for tile in tiles} == {"cam-long", "cam-short"}
    assert all(tile["label"].startswith(f"Camera {tile['name']}") for tile in tiles)
    ratios = script(driver, """
        const luminance = (rgb) => {
          const [r, g, b] = rgb.match(/\\d+/g).slice(0, 3).map(Number).map(v => {
            v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
          return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const contrast = (a, b) => { const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p);
          return (x + 0.05) / (y + 0.05); };
        const tile = getComputedStyle(document.querySelector('.tile')).backgroundColor;
        const body = getComputedStyle(document.body).backgroundColor;
        return {
          text: contrast(getComputedStyle(document.querySelector('.tile h2')).color, tile),
          muted: contrast(getComputedStyle(document.querySelector('.stats dt')).color, tile),
          summary: contrast(getComputedStyle(document.getElementById('summary')).color, body)};""")
    assert min(ratios.values()) >= 4.5, ratios


def test_pictures_reach_the_snapshots_topic_keyed_by_stream_with_their_frame_and_a_bounded_size(site: Site) -> None:
    wait_for(site.pipeline.sources_exhausted, 30, "the clips did not finish")
    frames = [decode(record) for record in read_topic(site.dashboard.settings.kafka.bootstrap_servers, site.topic,
                                                      LONG_FRAMES + SHORT_FRAMES, timeout_s=10)]
    published = {(message["stream_id"], message["frame_id"]) for message in frames}
    per_stream = {stream_id: sum(1 for message in frames if message["stream_id"] == stream_id)
                  for stream_id in ("cam-long", "cam-short")}
    offered = {stream_id: (count + PICTURE_EVERY - 1) // PICTURE_EVERY for stream_id, count in per_stream.items()}

    def settled() -> tuple[float, float]:
        return (sample(site.pipeline, "vap_snapshot_messages_total", result="sent"),
                sample(site.pipeline, "vap_snapshot_messages_total", result="dropped"))

    # A picture still waiting when its stream's next one comes is replaced and counted as dropped, by design: on
    # a busy machine a few are.
    wait_for(lambda: sum(settled()) >= sum(offered.values()), 10, "every picture should be sent or dropped")
    sent, dropped = settled()
    pictures = read_topic(site.dashboard.settings.kafka.bootstrap_servers, site.snapshots_topic, int(sent),
                          timeout_s=10)
    assert pictures
    for record in pictures:
        headers = dict(record.headers)
        assert headers["content-type"] == b"image/jpeg"
        stream_id, frame_id = record.key.decode(), int(headers["frame_id"])
        assert (stream_id, frame_id) in published
        image = cv2.imdecode(np.frombuffer(record.value, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[1] == 320 and image.shape[0] == round(SIZE[1] * 320 / SIZE[0])
    for stream_id, expected in offered.items():
        got = sum(1 for record in pictures if record.key.decode() == stream_id)
        assert expected - dropped <= got <= expected, (stream_id, got, expected, dropped)
    assert len(pictures) == sent and sent + dropped == sum(offered.values())
    assert dropped <= sum(offered.values()) // 4, "most pictures should be sent"


def test_the_json_endpoint_and_the_pushed_updates_give_the_same_state(site: Site) -> None:
    status, body = get(site.dashboard.port, "/api/streams")
    assert status == 200
    summary = orjson.loads(body)
    assert summary["broker"]["state"] == "connected"
    streams = {view["id"]: view for view in summary["streams"]}
    assert set(streams) == {"cam-long", "cam-short"}
    picture = streams["cam-long"]["picture"]
    status, jpeg = get(site.dashboard.port, "/" + picture["url"])
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert status == 200 and image is not None and image.shape[1] == 320

    connection = http.client.HTTPConnection("127.0.0.1", site.dashboard.port, timeout=5)
    connection.request("GET", "/api/updates")
    response = connection.getresponse()
    assert response.status == 200 and (response.getheader("content-type") or "").startswith("text/event-stream")
    first = read_event(response)
    assert first["full"] and {view["id"] for view in first["streams"]} == set(streams)
    assert first["streams"][0]["frame_id"] == streams[first["streams"][0]["id"]]["frame_id"]
    later = read_event(response)
    assert not later["full"] and later["streams"] == []  # nothing changed: the clips have ended
    connection.close()


def read_event(response: http.client.HTTPResponse) -> dict[str, Any]:
    lines = []
    while (line := response.readline()) != b"\n":
        lines.append(line)
    assert lines[0] == b"event: update\n"
    parsed: dict[str, Any] = orjson.loads(lines[1].removeprefix(b"data: "))
    return parsed


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_token_guards_everything_but_the_health_probe(broker: EmbeddedBroker) -> None:
    dashboard = Dashboard(DashboardSettings(kafka=KafkaConfig(bootstrap_servers=broker.bootstrap_servers),
                                            port=0, auth_token="s3cret"))
    dashboard.start()
    try:
        port = dashboard.port
        assert get(port, "/healthz")[0] == 200
        for path in ("/", "/api/streams", "/api/updates", "/static/app.js", "/api/pictures/1.jpg"):
            assert get(port, path)[0] == 401, path
        assert get(port, "/api/streams", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(port, "/api/streams", {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(port, "/?token=wrong")[0] == 401
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/?token=s3cret")
        response = connection.getresponse()
        cookie = response.getheader("set-cookie", "")
        assert response.status == 303 and response.getheader("location") == "./" and "HttpOnly" in cookie
        connection.close()
        status, page = get(port, "/", {"Cookie": cookie.split(";")[0]})
        assert status == 200 and b'src="static/app.js"' in page  # relative: works under a path prefix
        assert get(port, "/static/app.js", {"Cookie": cookie.split(";")[0]})[0] == 200
    finally:
        dashboard.stop()


def test_the_page_says_when_kafka_is_away_and_recovers_by_itself(browser: Any) -> None:
    port = free_port()
    topic = unused_topic("outage")
    dashboard = Dashboard(DashboardSettings(kafka=KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}"),
                                            topics=FeedTopics(frames=topic, events=None, snapshots=None),
                                            port=0, tick_s=0.25))
    dashboard.start()
    banner = "return [document.getElementById('banner').dataset.state, document.getElementById('banner').hidden]"
    try:
        browser.get(dashboard.url)
        wait_for(lambda: script(browser, banner) == ["unreachable", False], 15, "the page did not say Kafka is away")
        assert "Kafka is unreachable" in script(browser, "return document.getElementById('banner').textContent")
        assert orjson.loads(get(dashboard.port, "/api/streams")[1])["broker"]["state"] == "unreachable"
        with EmbeddedBroker(port=port) as late_broker:
            from kafka import KafkaProducer

            producer = KafkaProducer(bootstrap_servers=late_broker.bootstrap_servers)
            message = {"schema": "vap.frame.v1", "stream_id": "cam-late", "frame_id": 0, "pts_ms": None,
                       "captured_at": "2026-12-07T10:00:00.000Z", "published_at": "2026-12-07T10:00:00.000Z",
                       "image": {"width": 64, "height": 48}, "model": {"name": "m", "task": "detect"},
                       "latency_ms": {"queue": 1, "inference": 1, "total": 5}, "detections": []}
            producer.send(topic, orjson.dumps(message), key=b"cam-late").get(timeout=10)
            producer.close()
            wait_for(lambda: script(browser, "return Boolean(document.querySelector('[data-stream=\"cam-late\"]'))"),
                     20, "the page did not recover and show the stream once Kafka answered")
            assert script(browser, banner)[0] == "connected"
        wait_for(lambda: script(browser, banner) == ["unreachable", False], 15,
                 "the page did not notice the second outage")
        assert script(browser, "return Boolean(document.querySelector('[data-stream=\"cam-late\"]'))")
        browser.save_screenshot(str(ARTIFACTS / "dashboard-kafka-away.png"))
    finally:
        dashboard.stop()
