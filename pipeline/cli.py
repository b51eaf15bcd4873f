"""The `vap` command line. Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pipeline import __version__
from pipeline.inference.offline import keep_model_libraries_offline

if TYPE_CHECKING:
    from pipeline.app import Pipeline
    from pipeline.config import PipelineConfig
    from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; this keeps its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type for bounds: zero or a negative number of seconds or frames is a usage mistake."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'a whole' if kind is int else 'a'} number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vap", description="Real-time video analytics: cameras -> YOLO -> Kafka.")
    parser.add_argument("--version", action="version", version=f"vap {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object per line, with the stream id on stream events")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run the pipeline from a config file")
    run.add_argument("-c", "--config", type=Path, required=True, help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config value (repeatable)")
    run.add_argument("--duration", type=_positive(float), help="stop after this many seconds")
    run.add_argument("--max-frames", type=_positive(int),
                     help="stop after this many processed frames (frames already read then are still processed)")
    run.add_argument("--watch", action="store_true",
                     help="re-read the config file when it changes (SIGHUP always re-reads it)")

    demo = commands.add_parser("demo", help="zero set-up demo: sample clips, bundled model, embedded broker")
    demo.add_argument("--duration", type=_positive(float), default=60.0, help="seconds to run (default 60)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    validate = commands.add_parser("validate", help="check a config file")
    validate.add_argument("-c", "--config", type=Path, required=True)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    consume = commands.add_parser("consume", help="tail result messages from Kafka")
    consume.add_argument("--bootstrap", default="localhost:9092", help="HOST:PORT[,HOST:PORT]")
    consume.add_argument("--topic", default="vap.frames", help="vap.frames for results, vap.events for zone events")
    consume.add_argument("--stream", action="append", default=[], help="only this stream id (repeatable)")
    consume.add_argument("--label", action="append", default=[],
                         help="only messages with a detection of this label (repeatable)")
    consume.add_argument("--from-beginning", action="store_true")
    consume.add_argument("--format", choices=["json", "table"], default="table")
    consume.add_argument("--group", help="consumer group id (default: none, no offsets committed)")
    consume.add_argument("--max-messages", type=_positive(int), help="exit after this many messages")
    consume.add_argument("--idle-timeout", type=_positive(float),
                         help="exit after this many seconds without a message")

    commands.add_parser("schema", help="print the JSON Schema of the result message")

    _add_dashboard_parser(commands)

    _add_streams_parser(commands)

    _add_bench_parser(commands)

    train = commands.add_parser("train-demo-model", help="regenerate the synthetic dataset and retrain the demo model",
                                add_help=False)
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    return parser


def _add_bench_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    bench = commands.add_parser("bench", help="benchmark vap against the model limit and Ultralytics' streaming")
    bench.add_argument("--quick", action="store_true", help="short clips and timings (about 2 minutes on CPU)")
    bench.add_argument("--streams", type=int, default=4)
    bench.add_argument("--frames", type=int, default=150, help="frames per generated clip")
    bench.add_argument("--size", default="640x360", help="clip size WIDTHxHEIGHT")
    bench.add_argument("--imgsz", type=int, default=320)
    bench.add_argument("--batch", type=int, default=4)
    bench.add_argument("--max-wait-ms", type=float, default=20.0)
    bench.add_argument("--device", default="auto")
    bench.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "openvino", "tensorrt"],
                       help="every contender runs the same runtime (default: the fastest installed)")
    bench.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "int8"],
                       help="every contender runs at this precision; int8 also measures the FP32 limit beside it")
    bench.add_argument("--decoder", default="cpu",
                       help="where vap decodes the clips: cpu, or cuda[:N] for the GPU's video engine (NVDEC)")
    bench.add_argument("--codec", default="auto", choices=["auto", "mpeg4", "h264", "h265"],
                       help="codec of the generated clips: h264 and h265 are what cameras send (auto: h264 on a GPU, "
                            "mpeg4 on the CPU, as earlier CPU runs)")
    bench.add_argument("--weights", help="model file (default: the bundled model)")
    bench.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="add a paced run this long")
    bench.add_argument("--decoding-processes", type=int, default=0, metavar="N",
                       help="vap decodes in N worker processes (decoding.processes); 0: on the readers' threads")
    bench.add_argument("--polygon-processes", type=int, default=0, metavar="N",
                       help="on a GPU, vap traces mask outlines in N worker processes (model.polygon_processes)")
    bench.add_argument("--message-processes", type=int, default=0, metavar="N",
                       help="vap builds messages in N worker processes (analytics.message_processes)")
    bench.add_argument("--inference-process", action="store_true",
                       help="vap runs the model in a process of its own (model.inference_process)")
    bench.add_argument("--sweep", type=_camera_counts, default=(), metavar="N,N,...",
                       help="also run this many cameras each, paced at --sweep-fps, e.g. 16,32,64")
    bench.add_argument("--sweep-fps", type=float, default=30.0, help="frames/s of each camera in the sweep")
    bench.add_argument("--sweep-seconds", type=float, default=20.0, help="frames' worth of time per sweep step")
    bench.add_argument("--spool-log", action="store_true",
                       help="also measure what the spool's crash-safe log (kafka.spool.dir) costs, in ABBA runs")
    bench.add_argument("--json", type=Path, help="also write the numbers to this file")


def _camera_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 16,32,64, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected counts like 16,32,64, got {text!r}")
    return counts


def _add_dashboard_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    dashboard = commands.add_parser("dashboard", help="a web page with every camera live, read from Kafka alone")
    dashboard.add_argument("-c", "--config", type=Path,
                           help="take Kafka's settings and the topics from this vap config")
    dashboard.add_argument("--bootstrap", help="HOST:PORT[,HOST:PORT] (default: the config's, else localhost:9092)")
    dashboard.add_argument("--topic", help="results topic (default: the config's kafka.topic, else vap.frames)")
    dashboard.add_argument("--events-topic", help="zone events (default: tracking.events_topic, else vap.events)")
    dashboard.add_argument("--snapshots-topic",
                           help="pictures (default: kafka.snapshots.topic, else vap.snapshots)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 picks one)")
    dashboard.add_argument("--auth-token", default=os.environ.get("VAP_DASHBOARD_TOKEN") or None,
                           help="require this token (default: $VAP_DASHBOARD_TOKEN); open the page once as "
                                "/?token=TOKEN")
    dashboard.add_argument("--stale-after", type=_positive(float), default=5.0,
                           help="seconds without a message before a camera's tile turns grey (default 5)")


def _add_streams_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    streams = commands.add_parser("streams", help="list, add or remove the fleet's streams (fleet mode)")
    streams_commands = streams.add_subparsers(dest="streams_command", required=True, parser_class=_Parser)
    for name, text in (("list", "every stream in the registry"), ("add", "add (or --replace) a stream"),
                       ("remove", "remove a stream")):
        sub = streams_commands.add_parser(name, help=text)
        sub.add_argument("-c", "--config", type=Path, help="take Kafka's settings and fleet.streams_topic from here")
        sub.add_argument("--bootstrap", help="HOST:PORT[,HOST:PORT] (default: the config's, else localhost:9092)")
        sub.add_argument("--topic", help="the registry topic (default: the config's fleet.streams_topic, "
                                         "else vap.streams)")
        if name == "list":
            sub.add_argument("--format", choices=["table", "json"], default="table")
        elif name == "add":
            sub.add_argument("--id", help="stream id")
            sub.add_argument("--url", help="rtsp://, http(s)://, a file path or /dev/videoN")
            sub.add_argument("-f", "--file", type=Path, help="a YAML file holding one stream (as a streams: item)")
            sub.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                             help="any stream key, e.g. fps=5 or analytics.tracking=true (repeatable)")
            sub.add_argument("--replace", action="store_true", help="change a stream already in the registry")
        else:
            sub.add_argument("id", help="stream id")


def entry() -> None:
    """The `vap` command: `main`, then the process's end.

    A stop may leave a thread behind inside native code (a camera's FFmpeg open that ignores its timeout, a
    model stuck in a batch). Tearing the interpreter down around such a thread can abort the process
    (C++'s "terminate called without an active exception"), turning a clean stop into a crash. Once
    everything is flushed, such a process ends at once instead.
    """
    code = main()
    if any(thread is not threading.main_thread() and thread.is_alive() for thread in threading.enumerate()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    keep_model_libraries_offline()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "train-demo-model":
        args.train_args = [*unknown, *args.train_args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging(args.log_level, args.log_format)
    handlers = {
        "run": _run,
        "demo": _demo,
        "validate": _validate,
        "consume": _consume,
        "schema": _schema,
        "streams": _streams,
        "dashboard": _dashboard,
        "bench": _bench,
        "train-demo-model": _train_demo_model,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return EXIT_OK


def _load(args: argparse.Namespace) -> PipelineConfig | None:
    """The validated config, or None after printing every problem with its key path."""
    from pipeline.config import check_files_exist, load_config
    from pipeline.errors import ConfigError

    try:
        config = load_config(args.config, args.overrides)
        check_files_exist(config)
    except ConfigError as error:
        _report_invalid_config(args.config, error)
        return None
    return config


def _report_invalid_config(path: Path | None, error: ConfigError) -> None:
    """One line per problem, each naming its key path, as `vap validate` prints them."""
    for line in error.lines():
        print(f"invalid config {path}: {line}", file=sys.stderr)


def _validate(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_USAGE
    from pipeline.inference.model_info import model_mismatches

    try:
        problems = model_mismatches(config)
    except Exception as error:
        print(f"invalid config {args.config}: model.weights: cannot load {config.model.weights!r} ({error})",
              file=sys.stderr)
        return EXIT_USAGE
    for problem in problems or []:
        print(f"invalid config {args.config}: {problem}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    unchecked = "" if problems is not None else (
        f" (class names not checked: model.weights {config.model.weights!r} is not a file on this machine)")
    print(f"{args.config}: valid{unchecked}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_USAGE
    return run_pipeline(config, args.config, args.overrides, args.watch, args.duration, args.max_frames)


def run_pipeline(
    config: PipelineConfig,
    path: Path,
    overrides: list[str],
    watch: bool,
    duration_s: float | None = None,
    max_frames: int | None = None,
) -> int:
    """Run until a signal, the duration, the frame bound, or the end of every file source."""
    from pipeline.app import Pipeline
    from pipeline.errors import ConfigError, ModelMismatch
    from pipeline.ops.reload import ConfigReloader

    pipeline = Pipeline(config, config_path=path)
    reloader = ConfigReloader(path, overrides, config, pipeline, watch=watch)

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        pipeline.request_stop()

    def request_reload(_signum: int, _frame: FrameType | None) -> None:
        reloader.request_reload()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, request_reload)
    try:
        try:
            pipeline.start(max_frames=max_frames)
        except ModelMismatch as error:
            print(f"invalid config {path}: {error}", file=sys.stderr)
            return EXIT_USAGE
        except ConfigError as error:  # found only while starting: calibration frames that cannot be read
            _report_invalid_config(path, error)
            return EXIT_USAGE
        except Exception as error:
            log.error("cannot start: %s", error)
            log.debug("start failure", exc_info=True)
            return EXIT_FAILURE
        reloader.start()
        reason = pipeline.wait(duration_s)
        log.info("%s; stopping", reason)
        unread = _streams_never_read(pipeline) if reason == "all sources finished" else []
        if unread and len(unread) == len(pipeline.readers):
            log.error("every stream ended without giving a single frame (see the errors above); check that each "
                      "url is a video this machine can decode")
        elif unread:
            log.error("stream(s) %s ended without giving a single frame (see the errors above), the others were "
                      "processed; check that each url is a video this machine can decode", ", ".join(unread))
        return EXIT_FAILURE if unread else EXIT_OK
    finally:
        try:
            reloader.stop()
        finally:
            pipeline.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _streams_never_read(pipeline: Pipeline) -> list[str]:
    """A file that failed to open or decode "finishes" like one that was read to its end; only the readers tell
    the two apart, and a batch job must not report success when one of its files gave nothing."""
    return [stream_id for stream_id, reader in list(pipeline.readers.items()) if not reader.ever_read]


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line for log shippers; stream events carry their stream id as a field."""

    def format(self, record: logging.LogRecord) -> str:
        import orjson

        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        stream = getattr(record, "stream", None)
        if stream is not None:
            entry["stream"] = stream
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level))
    logging.getLogger("kafka").setLevel(logging.ERROR)


def _demo(args: argparse.Namespace) -> int:
    from pipeline.tools.demo import run_demo

    return run_demo(duration_s=args.duration, overrides=args.overrides)


def _consume(args: argparse.Namespace) -> int:
    from pipeline.tools.consume import ConsumeOptions, consume

    options = ConsumeOptions(
        bootstrap=args.bootstrap,
        topic=args.topic,
        streams=tuple(args.stream),
        labels=tuple(args.label),
        from_beginning=args.from_beginning,
        output_format=args.format,
        group=args.group,
        max_messages=args.max_messages,
        idle_timeout_s=args.idle_timeout,
    )
    return consume(options, sys.stdout)


def _dashboard(args: argparse.Namespace) -> int:
    from pipeline.config import load_kafka_section
    from pipeline.dashboard.service import serve, settings_from
    from pipeline.errors import ConfigError

    config = None
    if args.config is not None:
        try:
            config = load_kafka_section(args.config)
        except ConfigError as error:
            _report_invalid_config(args.config, error)
            return EXIT_USAGE
    if not 0 <= args.port <= 65535:
        print(f"vap dashboard: --port {args.port} is not a port (0-65535)", file=sys.stderr)
        return EXIT_USAGE
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the page and one log line say when Kafka is away
    return serve(settings_from(config, args))


def _streams(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.tools import streams

    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # an unreachable broker is said once, below
    kafka = fleet = None
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as error:
            _report_invalid_config(args.config, error)
            return EXIT_USAGE
        kafka, fleet = config.kafka, config.fleet
    registry = streams.registry_from(kafka, fleet, args.bootstrap, args.topic)
    try:
        if args.streams_command == "list":
            return streams.list_streams(registry, args.format, sys.stdout)
        if args.streams_command == "remove":
            return streams.remove_stream(registry, args.id)
        try:
            stream = streams.stream_from(args.id, args.url, args.settings, args.file)
        except (ValueError, OSError) as error:
            print(f"vap streams add: {error}", file=sys.stderr)
            return EXIT_USAGE
        return streams.add_stream(registry, stream, args.replace)
    except streams.RegistryError as error:
        print(f"vap streams: {error}", file=sys.stderr)
        return EXIT_FAILURE


def _schema(_args: argparse.Namespace) -> int:
    from pipeline.publishing.messages import load_schema

    print(json.dumps(load_schema(), indent=2))
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from pipeline.tools.bench import BenchOptions, codec_available, format_report, report_json, run_bench

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"vap bench: --size must be WIDTHxHEIGHT, got {args.size!r}", file=sys.stderr)
        return EXIT_USAGE
    if args.codec != "auto" and not codec_available(args.codec):
        print(f"vap bench: --codec {args.codec} needs PyAV built with libx264 and libx265, as PyPI's wheels are",
              file=sys.stderr)
        return EXIT_USAGE
    options = BenchOptions(
        streams=args.streams, frames=args.frames, width=width, height=height, imgsz=args.imgsz, batch=args.batch,
        max_wait_ms=args.max_wait_ms, device=args.device, runtime=args.runtime, precision=args.precision,
        decoder=args.decoder, codec=args.codec, weights=args.weights, quick=args.quick,
        soak_s=args.soak, spool_log=args.spool_log, decoding_processes=args.decoding_processes,
        polygon_processes=args.polygon_processes, message_processes=args.message_processes,
        inference_process=args.inference_process, sweep=args.sweep, sweep_fps=args.sweep_fps,
        sweep_seconds=args.sweep_seconds, json_path=args.json,
    )
    report = run_bench(options)
    print(format_report(report))
    if args.json:
        args.json.write_text(report_json(report), encoding="utf-8")
    return EXIT_OK


def _train_demo_model(args: argparse.Namespace) -> int:
    from pipeline.tools.synth.train import main as train_main

    return train_main(args.train_args)
