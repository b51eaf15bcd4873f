"""The errors one stage raises and another (the CLI, the HTTP API, a reload) turns into an answer.

They live here rather than beside their first user so that no stage imports the HTTP layer, or the CLI,
to learn what went wrong.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A config that cannot be used; `problems` holds one `(key path, message)` pair per mistake."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))

    def lines(self) -> list[str]:
        return [f"{path}: {message}" if path else message for path, message in self.problems]


class ModelMismatch(ValueError):
    """A config value the loaded model contradicts, such as a class it does not have: found only once the
    model is loaded, yet a mistake in the config like any other, so `vap run` exits 2 for it too."""


class StreamExists(Exception):
    """A stream with this id already runs."""


class UnknownStream(Exception):
    """No stream with this id runs."""


class NotAcceptingChanges(Exception):
    """The pipeline is starting or stopping; the message says which. Reads still answer meanwhile."""


class RegistryUnavailable(RuntimeError):
    """Fleet mode: the stream registry could not be written in time (the broker is away)."""
