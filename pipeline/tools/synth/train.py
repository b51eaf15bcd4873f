"""Train the shipped shapes segmentation model from scratch on generated data, on one CPU core.

Run ``python -m pipeline.tools.synth.train``. Everything it needs is generated or shipped inside the installed
packages (the architecture comes from Ultralytics' bundled YAML), so it works where weights, fonts and datasets
cannot be downloaded. The result is reproducible from the command line recorded in the model card.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.tools.synth.dataset import DEFAULT_SIZES, write_dataset
from pipeline.tools.synth.world import CLASS_NAMES

ASSETS_DIR = Path(__file__).resolve().parent.parent.parent / "assets"
WEIGHTS_NAME = "vap-shapes-seg.pt"


@dataclass(frozen=True)
class TrainConfig:
    model: str
    epochs: int
    imgsz: int
    batch: int
    train_images: int
    val_images: int
    seed: int
    threads: int
    close_mosaic: int
    lr0: float
    width: float | None
    cls_gain: float


@dataclass(frozen=True)
class TrainOutcome:
    weights: Path
    seconds: float
    seconds_per_epoch: float
    val_metrics: dict[str, float]
    parameters: int


def _offline_environment(threads: int) -> None:
    """Pin thread counts and forbid network use before Ultralytics or torch read their settings."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _validation_metrics(metrics: Any) -> dict[str, float]:
    return {
        "box_map50": float(metrics.box.map50),
        "box_map50_95": float(metrics.box.map),
        "mask_map50": float(metrics.seg.map50),
        "mask_map50_95": float(metrics.seg.map),
        "box_precision": float(metrics.box.mp),
        "box_recall": float(metrics.box.mr),
    }


def _finalise_weights(source: Path, target: Path) -> int:
    """Keep only what inference needs, so the shipped file is small and carries no optimizer state."""
    import torch

    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt["model"]
    model = model.half().eval()
    for p in model.parameters():
        p.requires_grad = False
    model.names = dict(enumerate(CLASS_NAMES))
    slim = {
        "model": model,
        "train_args": ckpt.get("train_args", {}),
        "date": ckpt.get("date"),
        "version": ckpt.get("version"),
        "license": ckpt.get("license"),
        "epoch": -1,
        "optimizer": None,
        "ema": None,
        "updates": None,
        "best_fitness": None,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, target)
    return sum(p.numel() for p in model.parameters())


def _architecture_yaml(config: TrainConfig, work_dir: Path) -> str:
    """Return the bundled YAML name, or a copy with a narrower width when one was asked for.

    Three flat-coloured shape classes need far less capacity than COCO; a narrower network trains more epochs
    in the same CPU time, which matters more here than width.
    """
    if config.width is None:
        return config.model
    import yaml
    from ultralytics.nn.tasks import yaml_model_load

    spec = yaml_model_load(config.model)
    depth, _, max_channels = spec["scales"][spec["scale"]]
    spec["scales"] = {spec["scale"]: [depth, config.width, max_channels]}
    spec["nc"] = len(CLASS_NAMES)
    for key in ("scale", "yaml_file"):
        spec.pop(key, None)
    path = work_dir / f"{Path(config.model).stem}-w{config.width:g}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return str(path)


def train(config: TrainConfig, work_dir: Path, output: Path) -> TrainOutcome:
    """Generate data, train, and validate the saved weights on the held-out split."""
    _offline_environment(config.threads)
    from ultralytics import YOLO

    start = time.monotonic()
    data_yaml = write_dataset(work_dir / "dataset", config.train_images, config.val_images, seed=config.seed)
    print(f"dataset ready in {time.monotonic() - start:.0f} s: {data_yaml}", flush=True)

    model = YOLO(_architecture_yaml(config, work_dir), task="segment")
    train_start = time.monotonic()
    model.train(
        data=str(data_yaml),
        epochs=config.epochs,
        imgsz=config.imgsz,
        batch=config.batch,
        device="cpu",
        workers=0,
        plots=False,
        amp=False,
        val=False,
        project=str(work_dir / "runs"),
        name="train",
        exist_ok=True,
        seed=config.seed,
        deterministic=False,
        optimizer="AdamW",
        lr0=config.lr0,
        cos_lr=True,
        warmup_epochs=1,
        close_mosaic=config.close_mosaic,
        nbs=config.batch,
        cls=config.cls_gain,
        flipud=0.5,
        degrees=10.0,
        patience=0,
        cache="ram",
        verbose=True,
    )
    train_seconds = time.monotonic() - train_start
    save_dir = Path(model.trainer.save_dir)
    best = save_dir / "weights" / "best.pt"
    source = best if best.exists() else save_dir / "weights" / "last.pt"
    parameters = _finalise_weights(source, output)

    shipped = YOLO(str(output), task="segment")
    metrics = shipped.val(
        data=str(data_yaml), imgsz=config.imgsz, batch=config.batch, device="cpu", plots=False, workers=0
    )
    return TrainOutcome(
        weights=output,
        seconds=train_seconds,
        seconds_per_epoch=train_seconds / config.epochs,
        val_metrics=_validation_metrics(metrics),
        parameters=parameters,
    )


def _architecture(config: TrainConfig) -> str:
    width = "" if config.width is None else f" with width multiple {config.width:g}"
    return f"YOLO11 segmentation, `{Path(config.model).name}`{width}, trained from scratch (no pretrained weights)"


def write_model_card(
    path: Path,
    config: TrainConfig,
    outcome: TrainOutcome,
    command: str,
    end_to_end: dict[str, dict[str, float | int]] | None,
) -> None:
    """Record what the shipped weights are and how well they measured, so the numbers can be re-checked."""
    v = outcome.val_metrics
    size_mb = outcome.weights.stat().st_size / 1e6
    classes = ", ".join(f"{i}: `{n}`" for i, n in enumerate(CLASS_NAMES))
    sizes = ", ".join(f"{w}x{h}" for w, h in DEFAULT_SIZES)
    lines = [
        "# vap-shapes-seg",
        "",
        "Instance segmentation model for the procedural shapes world in `pipeline.tools.synth`. It exists so the",
        "pipeline can be proven end to end (decode, batch, infer, publish) with known ground truth on machines",
        "that cannot download weights. It is not a general-purpose detector.",
        "",
        "| | |",
        "|---|---|",
        f"| File | `pipeline/assets/{WEIGHTS_NAME}` ({size_mb:.1f} MB, FP16, no optimizer state) |",
        "| Task | `segment` |",
        f"| Classes | {classes} |",
        f"| Input size | {config.imgsz} (letterboxed, any aspect ratio) |",
        f"| Architecture | {_architecture(config)}, {outcome.parameters:,} parameters |",
        f"| Training data | {config.train_images} generated frames, {FRAMES_PER_SCENE_TEXT} |",
        f"| Validation data | {config.val_images} generated frames from disjoint scene seeds |",
        f"| Frame sizes | {sizes} |",
        f"| Epochs | {config.epochs} (batch {config.batch}, AdamW lr0 {config.lr0}, cosine, "
        f"cls gain {config.cls_gain:g}, mosaic off for the last {config.close_mosaic}) |",
        f"| Hardware | CPU, {config.threads} thread(s) |",
        f"| Training wall time | {outcome.seconds / 60:.1f} min ({outcome.seconds_per_epoch:.0f} s/epoch) |",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"## Validation (held-out generated frames, Ultralytics `val`, imgsz {config.imgsz})",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| Box mAP50 | {v['box_map50']:.3f} |",
        f"| Box mAP50-95 | {v['box_map50_95']:.3f} |",
        f"| Mask mAP50 | {v['mask_map50']:.3f} |",
        f"| Mask mAP50-95 | {v['mask_map50_95']:.3f} |",
        f"| Box precision / recall | {v['box_precision']:.3f} / {v['box_recall']:.3f} |",
        "",
    ]
    if end_to_end:
        lines += [
            "## End to end on encoded clips",
            "",
            "Fresh scenes (seeds never used for training) written to MP4, decoded with OpenCV and predicted at",
            "imgsz 320, conf 0.25, scored by `pipeline.tools.synth.evaluate` (box IoU >= 0.5 with matching class;",
            "required objects are at least half visible with a box side of at least 12 px; detections of",
            "smaller or mostly hidden objects are ignored rather than counted as false positives).",
            "",
            "| Frames | Required objects | Box recall | Box precision | Mean mask IoU |",
            "|---|---|---|---|---|",
        ]
        for name, s in end_to_end.items():
            lines.append(
                f"| {name} ({s['frames']} frames) | {s['required_objects']} | {s['box_recall']:.3f} | "
                f"{s['box_precision']:.3f} | {s['mean_mask_iou']:.3f} |"
            )
        lines += ["", "Re-measure with `python -m pipeline.tools.synth.evaluate`.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


FRAMES_PER_SCENE_TEXT = "3 frames per scene, each scene with its own seed, background and objects"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the synthetic shapes segmentation model on CPU.")
    parser.add_argument("--model", default="yolo11n-seg.yaml", help="architecture YAML (never a .pt)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=2400)
    parser.add_argument("--val-images", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--close-mosaic", type=int, default=3)
    parser.add_argument("--lr0", type=float, default=0.002)
    parser.add_argument("--width", type=float, default=0.1875, help="width multiple; 0 keeps the YAML's own")
    parser.add_argument("--cls-gain", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=ASSETS_DIR / WEIGHTS_NAME)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep dataset and run here (default: temp)")
    parser.add_argument("--eval-clips", type=int, default=4, help="clips per size for the end-to-end check")
    args = parser.parse_args(argv)
    if args.model.endswith(".pt"):
        parser.error("train from an architecture YAML; .pt names would trigger a download")
    config = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        train_images=args.train_images,
        val_images=args.val_images,
        seed=args.seed,
        threads=args.threads,
        close_mosaic=args.close_mosaic,
        lr0=args.lr0,
        width=args.width or None,
        cls_gain=args.cls_gain,
    )
    command = "python -m pipeline.tools.synth.train " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="vap-train-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        outcome = train(config, work_dir, args.output)
        v = outcome.val_metrics
        print(
            f"validation: box mAP50 {v['box_map50']:.3f}, box mAP50-95 {v['box_map50_95']:.3f}, "
            f"mask mAP50 {v['mask_map50']:.3f}; trained in {outcome.seconds / 60:.1f} min",
            flush=True,
        )
        end_to_end = None
        if args.eval_clips > 0:
            from pipeline.tools.synth.evaluate import evaluate_model

            end_to_end = evaluate_model(args.output, n_clips=args.eval_clips, work_dir=work_dir / "eval")
            for name, summary in end_to_end.items():
                print(f"end to end {name}: " + " ".join(f"{k}={val}" for k, val in summary.items()), flush=True)
        if args.output.resolve().parent == ASSETS_DIR:
            write_model_card(ASSETS_DIR / "MODEL_CARD.md", config, outcome, command.strip(), end_to_end)
        if args.work_dir is None:
            shutil.rmtree(work_dir / "runs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
