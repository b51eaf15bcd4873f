"""What a model says about itself (its name, labels and task), checked against a config before a run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import ModelMismatch

log = logging.getLogger(__name__)


_CLASSES_SHOWN = 20


def model_display_name(weights: str) -> str:
    return Path(weights).stem


def class_ids_for(entries: list[int | str] | None, labels: dict[int, str], key_path: str) -> list[int] | None:
    """Ids for a config's class list, which may name classes by id or label. An entry the model does not
    have is a startup error: kept silently, it would filter out everything, and nothing would say why."""
    if entries is None:
        return None
    by_label = {label: class_id for class_id, label in labels.items()}
    ids = []
    for entry in entries:
        class_id = entry if isinstance(entry, int) else by_label.get(entry)
        if class_id is None or class_id not in labels:
            shown = ", ".join(f"{known_id} {label}" for known_id, label in list(labels.items())[:_CLASSES_SHOWN])
            more = f" and {len(labels) - _CLASSES_SHOWN} more" if len(labels) > _CLASSES_SHOWN else ""
            raise ModelMismatch(f"{key_path}: {entry!r} is not a class of the model; its classes are {shown}{more}")
        ids.append(class_id)
    return ids


def unsupported_task(task: str, weights: str) -> str | None:
    if task != "obb":
        return None
    return (f"model.weights: {weights!r} is an oriented-box (obb) model, which vap does not support yet; use a "
            "detect, segment, classify or pose model")


def model_labels(model: Any) -> dict[int, str]:
    return {int(k): str(v) for k, v in model.names.items()}


def model_mismatches(config: PipelineConfig) -> list[str] | None:
    """What the model contradicts in a config (a class it does not have, a task vap cannot run), so that
    `vap validate` finds it before a run at a camera site does. None when the weights are not on this
    machine: a bare model name would start a download, which `validate` must not do."""
    weights = config.model.weights
    if not (Path(weights).exists() or weights.endswith((".yaml", ".yml"))):
        return None
    from ultralytics import YOLO

    model = YOLO(weights, task=None if config.model.task == "auto" else config.model.task)
    labels = model_labels(model)
    checks: list[tuple[list[int | str] | None, str]] = [(config.model.classes, "model.classes")]
    for stream_index, stream in enumerate(config.streams):
        analytics = f"streams[{stream_index}].analytics"
        checks += [(zone.classes, f"{analytics}.zones[{i}].classes") for i, zone in enumerate(stream.analytics.zones)]
        checks += [(line.classes, f"{analytics}.lines[{i}].classes") for i, line in enumerate(stream.analytics.lines)]
    task_problem = unsupported_task(str(model.task), weights)
    problems = [] if task_problem is None else [task_problem]
    for entries, key_path in checks:
        try:
            class_ids_for(entries, labels, key_path)
        except ModelMismatch as error:
            problems.append(str(error))
    return problems
