"""What publishing costs the pipeline's process per message: each thread's CPU, measured.

    python benchmarks/publisher_path.py --messages 20000 --rate 2000 --burst 1

The publisher (`KafkaPublisher`) runs over the Kafka client's child process (`KafkaProcess`) and an embedded
broker, as in a pipeline. One thread submits messages of a typical size at `--rate` a second, `--burst` at
a time: 1 is how the analytics threads hand them over, one frame at a time; 32 is a batch's worth at once.
The script prints the CPU microseconds per message of each thread of this process (read from
`/proc/self/task`) and of the Kafka child. These threads all need the interpreter's lock that a GPU's
inference thread needs too, so this is the figure to hold down.
"""

from __future__ import annotations

import argparse
import threading
import time

from prometheus_client import CollectorRegistry

from pipeline.config import KafkaConfig
from pipeline.ledger import FrameLedger, FrameTicket
from pipeline.ops.health import Heartbeats
from pipeline.ops.metrics import PipelineMetrics
from pipeline.publishing.kafka_process import KafkaProcess
from pipeline.publishing.publisher import KafkaPublisher
from pipeline.publishing.spool import OutgoingMessage
from pipeline.tools.broker import EmbeddedBroker
from pipeline.tools.cpu_account import _thread_seconds

_WARM_UP = 500
_VALUE = b'{"schema":"vap.frame.v1","detections":[' + b"0" * 560 + b"]}"  # about an empty frame's message and more


def wait_published(ledger: FrameLedger, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ledger.published_total < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {ledger.published_total} of {count} messages delivered in {timeout_s:.0f} s")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="messages a second")
    parser.add_argument("--burst", type=int, default=1, help="messages submitted back to back")
    args = parser.parse_args()
    with EmbeddedBroker() as broker:
        metrics = PipelineMetrics(CollectorRegistry())
        ledger = FrameLedger(metrics)
        heartbeats = Heartbeats(metrics)
        client = KafkaProcess(heartbeats)
        client.start()
        publisher = KafkaPublisher(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic="publisher-path"),
                                   ledger, metrics, heartbeats, client.open_producer_or_local)
        publisher.start()
        run = ledger.add_stream("cam")

        def submit(frame_id: int) -> None:
            ticket = FrameTicket("cam", run, frame_id)
            ledger.read(ticket)
            publisher.submit([OutgoingMessage(b"cam", _VALUE, ticket=ticket, built_monotonic=time.monotonic())])

        for frame_id in range(_WARM_UP):
            submit(frame_id)
        wait_published(ledger, _WARM_UP)
        names = {thread.native_id: thread.name for thread in threading.enumerate()}
        before, child_before = _thread_seconds(), sum(_thread_seconds(client.pid or 0).values())
        started = time.monotonic()
        for index in range(args.messages):
            submit(_WARM_UP + index)
            if (index + 1) % args.burst == 0:
                pause = started + (index + 1) / args.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        wait_published(ledger, _WARM_UP + args.messages)
        elapsed = time.monotonic() - started
        after, child_after = _thread_seconds(), sum(_thread_seconds(client.pid or 0).values())
        names.update({thread.native_id: thread.name for thread in threading.enumerate()})
        by_thread: dict[str, float] = {}
        for tid, seconds in after.items():
            name = names.get(tid, "other")
            by_thread[name] = by_thread.get(name, 0.0) + seconds - before.get(tid, 0.0)
        print(f"{args.messages} messages at {args.rate:.0f}/s, {args.burst} at a time, delivered in {elapsed:.1f} s; "
              "CPU us per message:")
        pipeline_threads = {name: seconds for name, seconds in by_thread.items()
                            if name == "publisher" or name.startswith("kafka-")}
        for name, seconds in sorted(pipeline_threads.items(), key=lambda item: -item[1]):
            print(f"  {name:<16} {seconds / args.messages * 1e6:6.1f}")
        print(f"  {'all three':<16} {sum(pipeline_threads.values()) / args.messages * 1e6:6.1f}"
              "   (the publisher's threads in the pipeline's process)")
        print(f"  {'submitting':<16} {by_thread.get('MainThread', 0.0) / args.messages * 1e6:6.1f}"
              "   (this script's thread: ledger, message, submit, and its sleeps)")
        print(f"  {'Kafka child':<16} {(child_after - child_before) / args.messages * 1e6:6.1f}   (its own process)")
        publisher.stop(5.0)
        publisher.join(10.0)
        client.close()


if __name__ == "__main__":
    main()
