"""Config hot reload: re-read the file on change (`vap run --watch`) or on SIGHUP, apply stream changes.

Streams are added, removed or restarted (when any of their fields changed) without pausing the
others. Every other section (tracking, model, batching, kafka, http) needs a restart; a change there is
logged as such, never silently ignored. A config that no longer validates is reported and the running one kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.config import PipelineConfig, StreamConfig, check_files_exist, load_config
from pipeline.errors import ConfigError, StreamExists, UnknownStream

log = logging.getLogger(__name__)

# Derived, not listed: a section added to the config later must not be ignored on reload by default.
_RESTART_SECTIONS = tuple(name for name in PipelineConfig.model_fields if name != "streams")


class RunningStream(Protocol):
    @property
    def config(self) -> StreamConfig: ...


class StreamControl(Protocol):
    """The running pipeline as a reload sees it; the control API may change its streams at any time."""

    @property
    def readers(self) -> Mapping[str, RunningStream]: ...

    def add_stream(self, stream: StreamConfig) -> None: ...

    def remove_stream(self, stream_id: str) -> None: ...

    def sync_file_streams(self, streams: list[StreamConfig]) -> bool: ...


@dataclass(frozen=True)
class ReloadPlan:
    add: tuple[StreamConfig, ...]
    remove: tuple[str, ...]
    restart: tuple[StreamConfig, ...]
    needs_restart: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove or self.restart or self.needs_restart)


def plan_reload(current: PipelineConfig, new: PipelineConfig) -> ReloadPlan:
    old_streams = {stream.id: stream for stream in current.streams}
    new_streams = {stream.id: stream for stream in new.streams}
    changed_keys: list[str] = []
    for section in _RESTART_SECTIONS:
        before, after = getattr(current, section), getattr(new, section)
        if before is None or after is None:  # an optional section (fleet) added or taken away
            changed_keys.extend([section] if before != after else [])
            continue
        before, after = before.model_dump(), after.model_dump()
        changed_keys.extend(f"{section}.{key}" for key in after if before.get(key) != after[key])
    return ReloadPlan(
        add=tuple(stream for stream_id, stream in new_streams.items() if stream_id not in old_streams),
        remove=tuple(stream_id for stream_id in old_streams if stream_id not in new_streams),
        restart=tuple(
            stream for stream_id, stream in new_streams.items()
            if stream_id in old_streams and old_streams[stream_id] != stream
        ),
        needs_restart=tuple(changed_keys),
    )


class ConfigReloader:
    """Watches one config file (optionally) and applies reloads on its own named thread."""

    def __init__(
        self,
        path: Path,
        overrides: list[str],
        current: PipelineConfig,
        control: StreamControl,
        watch: bool,
        poll_s: float = 0.5,
    ) -> None:
        self._path = path
        self._overrides = overrides
        self._current = current
        self._control = control
        self._watch = watch
        self._poll_s = poll_s
        self._requested = threading.Event()
        self._stop = threading.Event()
        self._last_seen = self._fingerprint()
        self._thread = threading.Thread(target=self._run, name="config-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_reload(self) -> None:
        """Safe from a signal handler: only sets a flag the reload thread watches."""
        self._requested.set()

    def stop(self) -> None:
        """Safe whether or not `start` ran: a pipeline that failed to start stops its reloader too."""
        self._stop.set()
        self._requested.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    def _fingerprint(self) -> tuple[float, int] | None:
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def _run(self) -> None:
        while not self._stop.is_set():
            requested = self._requested.wait(self._poll_s)
            if self._stop.is_set():
                return
            self._requested.clear()
            seen = self._fingerprint()
            if requested or (self._watch and seen != self._last_seen):
                self._last_seen = seen
                try:
                    self.reload()
                except Exception:
                    log.exception("config reload failed midway; streams may be partly updated (see /api/v1/streams)")

    def reload(self) -> ReloadPlan | None:
        try:
            new = load_config(self._path, self._overrides)
            check_files_exist(new)
        except ConfigError as error:
            for line in error.lines():
                log.error("config reload rejected, keeping the running config: %s", line)
            return None
        plan = plan_reload(self._current, new)
        for key in plan.needs_restart:
            log.warning("config reload: %s changed but needs a restart of vap to apply; not applied", key)
        if self._control.sync_file_streams(list(new.streams)):
            self._current = self._current.model_copy(update={"streams": list(new.streams)})
            log.info("config reloaded: the file's streams are in the fleet's registry")
            return plan
        believed = {stream.id: stream for stream in self._current.streams}
        failed: list[str] = []
        for stream_id in plan.remove:
            if self._remove(stream_id):
                believed.pop(stream_id)
            else:
                failed.append(stream_id)
        for stream in (*plan.restart, *plan.add):
            if self._ensure(stream):
                believed[stream.id] = stream
            else:
                believed.pop(stream.id, None)  # not running as the file says: the next reload tries again
                failed.append(stream.id)
        self._current = self._current.model_copy(update={"streams": list(believed.values())})
        if failed:
            log.error("config reload applied in part: stream(s) %s do not run as the file says (see the errors "
                      "above); the file's other changes are applied, and the next reload tries these again",
                      ", ".join(failed))
        else:
            log.info("config reloaded: %d added, %d removed, %d restarted", len(plan.add), len(plan.remove),
                     len(plan.restart))
        return plan

    def _running(self, stream_id: str) -> StreamConfig | None:
        reader = self._control.readers.get(stream_id)
        return None if reader is None else reader.config

    def _remove(self, stream_id: str) -> bool:
        """Stop a stream the file no longer has; one the control API removed already is fine."""
        try:
            self._control.remove_stream(stream_id)
        except UnknownStream:
            log.info("stream %s: already removed (through the control API)", stream_id, extra={"stream": stream_id})
        except Exception as error:
            log.error("stream %s: config reload could not remove it: %s", stream_id, error,
                      extra={"stream": stream_id})
            return False
        return True

    def _ensure(self, stream: StreamConfig) -> bool:
        """Make `stream` run exactly as the file says, whatever the control API did to it meanwhile."""
        running = self._running(stream.id)
        if running == stream:
            log.info("stream %s: already running as the file says", stream.id, extra={"stream": stream.id})
            return True
        if running is not None and not self._remove(stream.id):
            return False
        try:
            self._control.add_stream(stream)
        except StreamExists:
            log.error("stream %s: config reload could not start it: the control API added a stream with this id "
                      "meanwhile; reload again", stream.id, extra={"stream": stream.id})
            return False
        except Exception as error:
            log.error("stream %s: config reload could not start it: %s", stream.id, error,
                      extra={"stream": stream.id})
            return False
        return True
