"""An RTSP server that plays a video clip in a loop, as H.264 over RTP: a stand-in for an IP camera.

Run it with the system Python (`/usr/bin/python3`), where Debian's `python3-gi` and
`gir1.2-gst-rtsp-server-1.0` live:

    /usr/bin/python3 tests/servers/rtsp_server.py --port 8554 --clip clip.mp4

It prints `READY rtsp://127.0.0.1:PORT/MOUNT` on stdout once the server listens and the stream is
ready to play (with `--port 0` the system picks the port, and the line names it). It exits cleanly on
SIGTERM or SIGINT, or when the process that started it goes away (checked four times a second).
`--check` only tells whether everything needed is installed.

The served stream is shared by all clients and stays prepared for the server's whole life, like a
camera's: GStreamer otherwise tears a shared stream down when its last client leaves, and answers
503 to a client that arrives during that teardown (seen when a reader reconnects at once).

Why the clip is first decoded to a JPEG sequence: `multifilesrc loop=true ! qtdemux` does not loop
an MP4 (qtdemux ends the stream after the first pass: the whole pipeline reaches EOS at the clip's
end), whereas `multifilesrc loop=true` over a numbered image sequence loops for ever, and `jpegdec`
keeps the timestamps increasing across the wrap. So the clip is decoded once at start-up (any
container and codec that `decodebin` handles, such as OpenCV's 'mp4v' through gstreamer1.0-libav)
into a private directory, which the served pipeline then reads in a loop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
from fractions import Fraction
from typing import Any

REQUIRED_ELEMENTS = (
    "filesrc", "decodebin", "videoconvert", "jpegenc", "multifilesink",
    "multifilesrc", "jpegdec", "x264enc", "rtph264pay",
)


def import_gstreamer() -> tuple[Any, Any, Any, Any]:
    import gi  # type: ignore[import-not-found]

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtsp", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # type: ignore[import-not-found]

    Gst.init(None)
    return GLib, Gst, GstRtsp, GstRtspServer


def missing_elements(Gst: Any) -> list[str]:
    return [name for name in REQUIRED_ELEMENTS if Gst.ElementFactory.find(name) is None]


def check() -> int:
    try:
        _, gst, _, _ = import_gstreamer()
    except (ImportError, ValueError) as error:
        print(f"cannot load GStreamer's RTSP server through python3-gi: {error}", file=sys.stderr)
        return 1
    missing = missing_elements(gst)
    if missing:
        print(f"missing GStreamer elements: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def decode_to_jpegs(Gst: Any, clip: str, directory: str) -> tuple[Fraction, int]:
    """Decode the clip into DIRECTORY/000000.jpg ...; returns its frame rate and frame count."""
    pattern = os.path.join(directory, "%06d.jpg")
    pipeline = Gst.parse_launch(
        f'filesrc location="{clip}" ! decodebin ! videoconvert name=convert ! '
        f'jpegenc quality=95 ! multifilesink location="{pattern}"'
    )
    pipeline.set_state(Gst.State.PLAYING)
    bus = pipeline.get_bus()
    message = bus.timed_pop_filtered(60 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    rate = Fraction(0)
    caps = pipeline.get_by_name("convert").get_static_pad("src").get_current_caps()
    if caps is not None and caps.get_size() > 0:
        found, numerator, denominator = caps.get_structure(0).get_fraction("framerate")
        if found and numerator > 0 and denominator > 0:
            rate = Fraction(numerator, denominator)
    pipeline.set_state(Gst.State.NULL)
    if message is None:
        raise RuntimeError(f"decoding {clip} did not finish within 60 s")
    if message.type == Gst.MessageType.ERROR:
        error, debug = message.parse_error()
        raise RuntimeError(f"cannot decode {clip}: {error.message} ({debug})")
    count = len([name for name in os.listdir(directory) if name.endswith(".jpg")])
    if count == 0:
        raise RuntimeError(f"{clip} has no video frames")
    return (rate if rate > 0 else Fraction(25)), count


def launch_string(directory: str, rate: Fraction) -> str:
    pattern = os.path.join(directory, "%06d.jpg")
    return (
        f'( multifilesrc location="{pattern}" index=0 loop=true '
        f'caps="image/jpeg,framerate={rate.numerator}/{rate.denominator}" ! jpegdec ! videoconvert ! '
        "video/x-raw,format=I420 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! "
        "rtph264pay name=pay0 pt=96 config-interval=1 )"
    )


def serve(port: int, mount: str, clip: str) -> int:
    GLib, Gst, GstRtsp, GstRtspServer = import_gstreamer()
    missing = missing_elements(Gst)
    if missing:
        print(f"missing GStreamer elements: {', '.join(missing)}", file=sys.stderr)
        return 1
    directory = tempfile.mkdtemp(prefix="rtsp-frames-")
    try:
        try:
            rate, count = decode_to_jpegs(Gst, clip, directory)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
        server = GstRtspServer.RTSPServer()
        server.set_address("127.0.0.1")
        server.set_service(str(port))
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch_string(directory, rate))
        factory.set_shared(True)
        server.get_mount_points().add_factory(mount, factory)
        if server.attach(None) == 0:
            print(f"cannot listen on 127.0.0.1:{port}", file=sys.stderr)
            return 1
        url = f"rtsp://127.0.0.1:{server.get_bound_port()}{mount}"
        loop = GLib.MainLoop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, loop.quit)
        parent = os.getppid()

        def parent_alive() -> bool:
            if os.getppid() != parent:
                loop.quit()
                return False
            return True

        GLib.timeout_add(250, parent_alive)
        # Prepare the shared media once and hold it, like a camera that streams whether or not anyone
        # watches. Otherwise each client that leaves (even one that only sent DESCRIBE) unprepares it,
        # and a client arriving during that teardown is answered 503 Service Unavailable.
        media = factory.construct(GstRtsp.RTSPUrl.parse(url)[1])
        if media is None:
            print(f"cannot build the media for {url}", file=sys.stderr)
            return 1
        status = {"code": 0}

        def prepared(_media: Any) -> None:
            print(f"clip {clip}: {count} frames at {float(rate):g} fps", file=sys.stderr, flush=True)
            print(f"READY {url}", flush=True)

        def unprepared(_media: Any) -> None:
            if loop.is_running():
                print(f"the media for {url} stopped", file=sys.stderr, flush=True)
                status["code"] = 1
                loop.quit()

        def prepare() -> None:
            # Blocks until the pipeline has prerolled, which needs the main loop running (its bus).
            if not media.prepare(None):
                print(f"cannot prepare the media for {url}", file=sys.stderr, flush=True)
                status["code"] = 1
                GLib.idle_add(loop.quit)

        media.connect("prepared", prepared)
        media.connect("unprepared", unprepared)
        threading.Thread(target=prepare, name="prepare", daemon=True).start()
        loop.run()
        return status["code"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=8554, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--mount", default="/stream", help="path of the stream, e.g. /stream")
    parser.add_argument("--clip", help="the video file to serve in a loop")
    parser.add_argument("--check", action="store_true", help="only check that GStreamer's RTSP server works")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    if not args.clip:
        parser.error("--clip is required")
    if not os.path.isfile(args.clip):
        parser.error(f"no such file: {args.clip}")
    mount = args.mount if args.mount.startswith("/") else f"/{args.mount}"
    return serve(args.port, mount, os.path.abspath(args.clip))


if __name__ == "__main__":
    sys.exit(main())
