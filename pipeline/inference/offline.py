"""Keeps the model libraries from calling out of a camera site.

Left to themselves, they do at every start:
- OpenVINO sends a usage event to Google Analytics when it is imported (and NNCF when it quantizes), from a
  thread pool that forks a helper process inside the running pipeline;
- Ultralytics resolves two public DNS names when it is imported, to decide whether it may send its own
  usage events and download files.

A box next to cameras talks to its cameras, its broker and its scrapers, and nothing else. Both libraries
fall back to their built-in no-op when their telemetry package is missing, and Ultralytics reads
`YOLO_OFFLINE`; so neither is patched, and the user's home is not written to.
"""

from __future__ import annotations

import os
import sys

_OPENVINO_TELEMETRY = "openvino_telemetry"


def keep_model_libraries_offline() -> None:
    """Call before the first import of OpenVINO, NNCF or Ultralytics; later calls change nothing. An operator
    who wants Ultralytics online sets `YOLO_OFFLINE=0` in the environment."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if _OPENVINO_TELEMETRY not in sys.modules:
        sys.modules[_OPENVINO_TELEMETRY] = None  # type: ignore[assignment]  # import raises ImportError
