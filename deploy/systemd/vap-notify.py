"""Run vap under systemd's `Type=notify` with a watchdog that follows vap's own health probes.

    vap-notify.py [--config FILE | --base-url URL] [--interval S] -- COMMAND [ARG ...]

Starts COMMAND (normally `vap run -c FILE`) and stays its parent. It tells systemd `READY=1` once
`/readyz` answers 200 (model loaded and warm), then sends `WATCHDOG=1` only while `/healthz` answers 200,
so a pipeline whose loops stop turning is restarted by systemd after `WatchdogSec=`. SIGTERM and SIGINT
are passed on to COMMAND, and this process exits with COMMAND's exit status (128+N after signal N), so
`RestartPreventExitStatus=2` keeps an invalid config from restarting in a loop. SIGHUP (`systemctl reload`,
a config reload) is passed on too, once COMMAND is ready (before, it would kill a vap still importing);
the service stays up and the watchdog fed.

The probe address comes from `--base-url`, else from `http.host`/`http.port` in `--config` (read with the
project's own config loader, so `${VAR}` references resolve as vap resolves them), else
http://127.0.0.1:9108. Without NOTIFY_SOCKET (not started by systemd) it only runs COMMAND.
Standard library only, apart from the optional config loader.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

DEFAULT_BASE_URL = "http://127.0.0.1:9108"
_POLL_S = 0.2
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # probes never go through a proxy


class Notifier:
    """Sends sd_notify(3) datagrams to $NOTIFY_SOCKET; does nothing when it is unset."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        if address and address.startswith("@"):  # abstract namespace socket
            self._address = "\0" + address[1:]

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, message: str) -> None:
        if not self._address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message.encode(), self._address)
            except OSError as error:
                print(f"vap-notify: cannot notify systemd: {error}", file=sys.stderr)


def probe(url: str) -> tuple[bool, str]:
    """(True, "") when `url` answers 200, else (False, why)."""
    try:
        with _OPENER.open(url, timeout=2) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:
        return False, f"{url}: {error}"
    return (True, "") if status == 200 else (False, f"{url} answered {status}")


def base_url_from_config(path: Path) -> str:
    """The probe address for the config's http section; the default when the config cannot be read."""
    try:
        from pipeline.config import load_config

        http = load_config(path).http
    except Exception as error:  # vap itself reports config problems; here the default is good enough
        print(f"vap-notify: using {DEFAULT_BASE_URL} ({path}: {error})", file=sys.stderr)
        return DEFAULT_BASE_URL
    host = "127.0.0.1" if http.host in ("", "0.0.0.0", "::") else http.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{http.port}"


def watchdog_interval(environ: dict[str, str], fallback_s: float) -> float:
    """Half of systemd's WatchdogSec= (from $WATCHDOG_USEC) when it is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
        return int(usec) / 2e6
    return fallback_s


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def supervise(command: list[str], base_url: str, interval_s: float, notifier: Notifier) -> int:
    child = subprocess.Popen(command)  # stdout and stderr are inherited: they go to the journal

    stopping = False
    reload_requested = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        notifier.send("STOPPING=1")
        if child.poll() is None:
            child.send_signal(signum)

    def request_reload(_signum: int, _frame: FrameType | None) -> None:
        nonlocal reload_requested
        reload_requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    signal.signal(signal.SIGHUP, request_reload)

    ready = False
    next_check = time.monotonic()
    last_problem = ""
    while child.poll() is None:
        if reload_requested and ready and not stopping:
            reload_requested = False
            child.send_signal(signal.SIGHUP)
        now = time.monotonic()
        if not stopping and now >= next_check:
            if not ready:
                ready, problem = probe(base_url + "/readyz")
                if ready:
                    notifier.send("READY=1\nSTATUS=ready")
                    next_check = now  # first watchdog ping right away
                else:
                    next_check = now + 1.0
            if ready:
                healthy, problem = probe(base_url + "/healthz")
                if healthy:
                    notifier.send("WATCHDOG=1" + ("\nSTATUS=ready" if last_problem else ""))
                elif problem != last_problem:
                    notifier.send(f"STATUS=unhealthy: {problem}")
                    print(f"vap-notify: unhealthy: {problem}", file=sys.stderr)
                last_problem = problem
                next_check = now + interval_s
        time.sleep(_POLL_S)
    return exit_status(child.wait())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vap-notify", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, help="vap config to read http.host/http.port from")
    parser.add_argument("--base-url", help=f"probe address (default: from --config, else {DEFAULT_BASE_URL})")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between health probes when systemd sets no watchdog (default 10)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.base_url:
        base_url = args.base_url.rstrip("/")
    elif args.config:
        base_url = base_url_from_config(args.config)
    else:
        base_url = DEFAULT_BASE_URL
    notifier = Notifier(os.environ.get("NOTIFY_SOCKET"))
    interval_s = watchdog_interval(dict(os.environ), args.interval)
    try:
        return supervise(command, base_url, interval_s, notifier)
    except OSError as error:
        print(f"vap-notify: cannot start {command[0]}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
