"""Delivery guarantees against a real broker: order, no duplicates, outages, restarts of vap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml
from kafka import KafkaConsumer, KafkaProducer

from pipeline.app import Pipeline
from pipeline.tools.broker import EmbeddedBroker, free_port
from tests.conftest import (
    CLIP_FRAMES,
    ConfigFactory,
    decode,
    metric_value,
    read_topic,
    run_to_completion,
    sample,
    scrape,
    unused_topic,
    vap_process,
    wait_for,
)


def test_vap_creates_a_partitioned_topic_and_keeps_each_stream_in_order_without_duplicates(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    topic = unused_topic("ordered")
    streams = [{"id": f"cam-{i}", "url": str(clips["landscape" if i % 2 else "portrait"]), "realtime": False}
               for i in range(4)]
    config = make_config(streams, broker.bootstrap_servers, topic, kafka={"partitions": 3})
    pipeline = run_to_completion(config)
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    try:
        assert consumer.partitions_for_topic(topic) == {0, 1, 2}
    finally:
        consumer.close()
    records = read_topic(broker.bootstrap_servers, topic, expected=pipeline.processed, group=f"g-{topic}")
    by_stream: dict[str, list[int]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        message = decode(record)
        by_stream[message["stream_id"]].append(message["frame_id"])
        partitions[message["stream_id"]].add(record.partition)
    assert len(records) == pipeline.processed == sample(pipeline, "vap_kafka_messages_total", result="sent")
    for stream_id, frame_ids in by_stream.items():
        assert frame_ids == sorted(set(frame_ids)), f"{stream_id}: duplicates or out of order"
        assert len(partitions[stream_id]) == 1, "one stream must stay in one partition"
    assert len(set().union(*partitions.values())) > 1, "streams should spread over partitions"


def test_broker_outage_and_restart_loses_only_spool_overflow_and_counts_it_exactly(
    clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    spool_bound = 40  # four seconds of frames: the producer may take that long to reconnect after the restart
    broker = EmbeddedBroker().start()
    topic = "outage"
    config = make_config(
        [{"id": "cam", "url": str(clips["landscape"]), "loop": True}], broker.bootstrap_servers, topic,
        kafka={"spool": {"max_messages": spool_bound}, "request_timeout_ms": 2000},
    )
    pipeline = Pipeline(config)
    pipeline.start()
    try:
        wait_for(lambda: sample(pipeline, "vap_kafka_messages_total", result="sent") >= 5, 30, "nothing sent")
        broker.stop()
        processed_at_kill = pipeline.processed
        read_at_kill = sample(pipeline, "vap_frames_read_total", stream="cam")
        time.sleep(7)  # 70 frames: well past the spool bound
        assert pipeline.processed >= processed_at_kill + 20, "inference must go on while the broker is down"
        processed_at_restart = pipeline.processed
        read_at_restart = sample(pipeline, "vap_frames_read_total", stream="cam")
        sent_at_kill = sample(pipeline, "vap_kafka_messages_total", result="sent")
        broker.start()
        wait_for(lambda: pipeline.processed > processed_at_restart + 20
                 and sample(pipeline, "vap_kafka_messages_total", result="sent") > sent_at_kill + spool_bound,
                 60, "delivery did not resume after the broker came back")
    finally:
        pipeline.stop()
    try:
        sent = sample(pipeline, "vap_kafka_messages_total", result="sent")
        dropped = sample(pipeline, "vap_kafka_messages_total", result="dropped")
        assert sent + dropped == pipeline.processed, "every processed frame is either sent or counted as dropped"
        assert dropped > 0, "an outage longer than the spool bound must overflow, and the overflow is counted"
        records = read_topic(broker.bootstrap_servers, topic, expected=int(sent - sent_at_kill), timeout_s=30)
        frame_ids = [decode(record)["frame_id"] for record in records]
        assert len(frame_ids) == sent - sent_at_kill, "the restarted broker holds exactly what was sent to it"
        assert len(set(frame_ids)) == len(frame_ids), "no duplicates after the producer was rebuilt"
        assert frame_ids == sorted(frame_ids)
        during_outage = [f for f in frame_ids if read_at_kill <= f < read_at_restart]
        # Frames read just before the restart may still sit in the reader buffer or the model when the
        # broker returns: they are published without ever waiting in the spool.
        still_in_pipeline = config.batching.queue_size + config.batching.max_batch
        assert 0 < len(during_outage) <= spool_bound + still_in_pipeline, "outage frames arrive up to the bound"
    finally:
        broker.stop()


def test_a_crash_during_a_broker_outage_loses_nothing_read_a_second_before_it(
    tmp_path: Path, clips: dict[str, Path], model_weights: str
) -> None:
    """The broker goes away for 8 s under a running vap, vap is SIGKILLed (no stop, nothing saved at the
    end), the broker comes back and vap starts again on the same spool dir: the frames read during the
    outage, up to a second before the kill, reach Kafka. Duplicates are allowed, counted and reported."""
    from pipeline.client import MessageStream

    port, http_port = free_port(), free_port()
    spool_dir = tmp_path / "spool"
    config = {
        "streams": [{"id": "first-run", "url": str(clips["landscape"]), "loop": True}],
        "model": {"weights": model_weights, "imgsz": 160},
        "batching": {"max_batch": 2},
        "kafka": {"bootstrap_servers": f"127.0.0.1:{port}", "topic": "spooled", "spool": {"dir": str(spool_dir)}},
        "http": {"host": "127.0.0.1", "port": http_port},
    }
    path = tmp_path / "spool.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_args = ["run", "-c", str(path)]
    broker = EmbeddedBroker(port=port).start()
    try:
        with vap_process(run_args, env=dict(os.environ)) as first:
            wait_for(lambda: _metric(http_port, "vap_kafka_messages_total", result="sent") >= 5, 90,
                     "the first run published nothing")
            broker.stop()
            read_at_outage = _frames(http_port)
            time.sleep(7)
            read_before_crash = _frames(http_port)
            time.sleep(1.0)
            first.kill()
            first.wait(timeout=10)
        assert list(spool_dir.glob("spool-*.log")), "the log is on disk with no stop"
        broker = EmbeddedBroker(port=port).start()
        second = subprocess.run(
            [sys.executable, "-m", "pipeline", *run_args,
             "--set", f"streams.0.url={clips['portrait']}", "--set", "streams.0.id=second-run",
             "--set", "streams.0.loop=false", "--set", "streams.0.realtime=false"],
            env=dict(os.environ), timeout=120,
        )
        assert second.returncode == 0
        outage_frames = int(read_before_crash["read"] - read_at_outage["read"])
        records = read_topic(f"127.0.0.1:{port}", "spooled", expected=outage_frames + CLIP_FRAMES, timeout_s=8)
    finally:
        broker.stop()
    stream = MessageStream()
    arrived = [message for record in records if (message := stream.take(record.value, record.headers)) is not None]
    during_outage = set(range(int(read_at_outage["read"]), int(read_before_crash["read"])))
    dropped = read_before_crash["dropped"] - read_at_outage["dropped"]
    published = {message.frame_id for message in arrived if message.stream_id == "first-run"} & during_outage
    print(f"read during the outage: {len(during_outage)}, dropped by vap: {dropped:.0f}, "
          f"arrived after the crash: {len(published)}, duplicates: {stream.duplicates}")
    assert len(during_outage) >= 50, "the clip is read at 10 frames/s"
    assert len(published) >= 0.9 * (len(during_outage) - dropped)
    assert [m.frame_id for m in arrived if m.stream_id == "second-run"] == list(range(CLIP_FRAMES)), \
        "the new run publishes"


def _metric(port: int, name: str, **labels: str) -> float:
    try:
        return metric_value(scrape(port), name, **labels) or 0.0
    except OSError:
        return 0.0


def _frames(port: int) -> dict[str, float]:
    """Frames the stream `first-run` has read and dropped so far."""
    text = scrape(port)
    dropped = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                  if line.startswith("vap_frames_dropped_total{") and 'stream="first-run"' in line)
    return {"read": metric_value(text, "vap_frames_read_total", stream="first-run") or 0.0, "dropped": dropped}


def test_result_reader_yields_typed_messages_and_reports_frames_dropped_by_the_fps_cap(
    broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    from pipeline.client import ResultReader

    topic = unused_topic("reader")
    config = make_config([{"id": "capped", "url": str(clips["landscape"]), "realtime": False, "fps": 5}],
                         broker.bootstrap_servers, topic)
    pipeline = run_to_completion(config)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    try:
        for stray in (b"not json", b'{"schema": "vap.event.v1", "event": "enter"}', None):
            producer.send(topic, key=b"capped", value=stray).get(timeout=10)
    finally:
        producer.close()
    with ResultReader(broker.bootstrap_servers, topic=topic, from_beginning=True, idle_timeout_s=3) as reader:
        messages = list(reader)
    assert reader.skipped == 3, "stray records are skipped and counted, and the reader goes on"
    assert [m.frame_id for m in messages] == list(range(0, 12, 2))
    assert [m.gap for m in messages] == [0] + [1] * 5
    assert all(m.image.width == 320 and m.schema_id == "vap.frame.v1" for m in messages)
    dropped = sample(pipeline, "vap_frames_dropped_total", stream="capped", reason="fps_cap")
    trailing = 11 - messages[-1].frame_id
    assert dropped == sum(m.gap for m in messages) + trailing


def test_snapshots_are_written_as_annotated_thumbnails_and_referenced_from_messages(
    tmp_path: Path, broker: EmbeddedBroker, clips: dict[str, Path], make_config: ConfigFactory
) -> None:
    import cv2
    import jsonschema

    from pipeline.publishing.messages import load_schema

    topic = unused_topic("snapshots")
    snapshot_dir = tmp_path / "thumbs"
    config = make_config(
        [{"id": "cam", "url": str(clips["landscape"]), "realtime": False}], broker.bootstrap_servers, topic,
        kafka={"snapshots": {"dir": str(snapshot_dir), "every_n_frames": 4, "max_width": 160, "keep_last": 2}},
    )
    run_to_completion(config)
    messages = [decode(r) for r in read_topic(broker.bootstrap_servers, topic, expected=12)]
    with_snapshot = [m for m in messages if "snapshot" in m]
    assert [m["frame_id"] for m in with_snapshot] == [0, 4, 8]
    for message in messages:
        jsonschema.validate(message, load_schema())
    kept = sorted(path.name for path in (snapshot_dir / "cam").iterdir())
    assert kept == ["000000000004.jpg", "000000000008.jpg"], "only the newest keep_last thumbnails stay"
    newest = Path(with_snapshot[-1]["snapshot"]["uri"].removeprefix("file://"))
    image = cv2.imread(str(newest))
    assert image is not None and image.shape[:2] == (96, 160)


def test_the_embedded_broker_outlives_ctrl_c_so_vap_can_flush_to_it(tmp_path: Path) -> None:
    """Ctrl-C reaches a terminal's whole foreground group; the demo's broker must not die before vap stops."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import signal, socket, sys, time\n"
        "from pipeline.tools.broker import EmbeddedBroker\n"
        "interrupted = []\n"
        "signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))  # vap handles Ctrl-C itself\n"
        "with EmbeddedBroker() as broker:\n"
        "    print(broker.bootstrap_servers, flush=True)\n"
        "    while not interrupted:\n"
        "        time.sleep(0.05)\n"
        "    time.sleep(0.5)\n"
        "    with socket.create_connection((broker.host, broker.port), timeout=2):\n"
        "        print('broker still up', flush=True)\n",
        encoding="utf-8",
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip(), "the broker should have started"
        os.killpg(owner.pid, signal.SIGINT)
        output, _ = owner.communicate(timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
    assert owner.returncode == 0 and b"broker still up" in output
