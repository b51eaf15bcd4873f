"""Procedural scenes whose ground truth is known exactly.

Every scene is a pure function of its :class:`SceneSpec`: object trajectories are planned up front from the
seed, and each frame is rendered from the frame time alone, so any frame can be rebuilt on its own and two
runs with the same spec give identical pixels. Ground truth is read back from the per-object visible masks that
were actually painted, so it stays exact under occlusion and at the frame border.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.tools.synth.background import Background, apply_camera, plan_background, render_background

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")

_SHIFT = 4  # sub-pixel bits for cv2.fillPoly so slow motion does not snap to whole pixels
_SCALE = 1 << _SHIFT
_CIRCLE_VERTICES = 48

Mask = npt.NDArray[np.bool_]
Image = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines a scene; equal specs render identical frames.

    Sizes are fractions of the shorter frame side so the same spec family works for landscape and portrait
    frames, and the object size range keeps shapes large enough for a small model at a 320 px input. Speeds
    scale with ``fps`` so a clip covers the same motion in seconds whatever its frame rate.
    """

    width: int
    height: int
    n_frames: int
    fps: float = 10.0
    seed: int = 0
    n_objects: int = 4
    min_size: float = 0.06
    max_size: float = 0.16
    max_noise_sigma: float = 6.0
    bounce_probability: float = 0.5

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16:
            raise ValueError("frame must be at least 16x16 pixels")
        if self.n_frames < 1:
            raise ValueError("n_frames must be positive")
        if self.fps <= 0:
            raise ValueError("fps must be positive")
        if self.n_objects < 0:
            raise ValueError("n_objects must not be negative")
        if not 0 < self.min_size <= self.max_size < 0.5:
            raise ValueError("sizes must satisfy 0 < min_size <= max_size < 0.5")


@dataclass(frozen=True)
class GroundTruthObject:
    """One object as it appears in one frame.

    ``bbox`` and ``polygon`` describe only the pixels that are visible (inside the frame and not covered by a
    nearer object); ``visible_fraction`` relates that to the whole shape so callers can decide what is
    reasonable to expect a detector to find. ``center`` is the true shape centre and may lie off-frame.

    Coordinates follow the detector's conventions: ``bbox`` uses pixel edges (a box around pixels 10..19 is
    ``x1=10, x2=20``), while polygon vertices are the indices of traced boundary pixels, the form
    ``cv2.findContours`` returns for predicted masks, so ``cv2.fillPoly`` of the polygon gives back the mask.
    """

    object_id: int
    class_id: int
    label: str
    bbox: tuple[float, float, float, float]
    polygon: list[tuple[float, float]]
    visible_fraction: float
    center: tuple[float, float]


@dataclass(frozen=True)
class _Track:
    """One object's life: linear motion from ``start_frame``, optionally reflected off the frame walls."""

    object_id: int
    class_id: int
    start_frame: int
    end_frame: int  # inclusive
    x0: float
    y0: float
    vx: float  # pixels per frame
    vy: float
    bounce_frames: int  # frames after start during which the walls reflect the object
    size: float  # circumradius in pixels
    angle0: float
    spin: float  # radians per frame
    colour: tuple[float, float, float]
    shade: tuple[float, float]  # brightness gradient across the shape, per pixel along x and y
    z: float


@dataclass(frozen=True)
class ScenePlan:
    """Everything random about a scene, drawn once so frames can be rendered in any order."""

    background: Background
    tracks: tuple[_Track, ...]


def _reflect(p: float, lo: float, hi: float) -> tuple[float, float]:
    """Fold an unbounded coordinate into ``[lo, hi]`` and return it with the resulting direction sign."""
    span = hi - lo
    if span <= 0:
        return (lo + hi) / 2, 1.0
    u = (p - lo) % (2 * span)
    return (lo + u, 1.0) if u <= span else (lo + 2 * span - u, -1.0)


def _track_center(track: _Track, frame: int, width: int, height: int) -> tuple[float, float]:
    """Analytic centre at a frame: reflected while bouncing, then straight on with the last direction."""
    t = frame - track.start_frame
    if track.bounce_frames <= 0:
        return track.x0 + track.vx * t, track.y0 + track.vy * t
    r = track.size
    tb = min(t, track.bounce_frames)
    x, sx = _reflect(track.x0 + track.vx * tb, r, width - r)
    y, sy = _reflect(track.y0 + track.vy * tb, r, height - r)
    extra = t - tb
    return x + sx * track.vx * extra, y + sy * track.vy * extra


def _shape_vertices(class_id: int, cx: float, cy: float, size: float, angle: float) -> npt.NDArray[np.float64]:
    count = {0: _CIRCLE_VERTICES, 1: 4, 2: 3}[class_id]
    theta = angle + np.arange(count) * (2 * math.pi / count)
    return np.stack([cx + size * np.cos(theta), cy + size * np.sin(theta)], axis=1)


def _fill(vertices: npt.NDArray[np.float64], shape: tuple[int, int], offset: tuple[int, int] = (0, 0)) -> Mask:
    canvas = np.zeros(shape, dtype=np.uint8)
    # Pixel (i, j) covers [i, i+1) x [j, j+1); sampling at pixel centres keeps area unbiased.
    pts = np.round((vertices - np.array(offset, dtype=np.float64) - 0.5) * _SCALE).astype(np.int32)
    cv2.fillPoly(canvas, [pts.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return canvas.astype(bool)


def _full_area(vertices: npt.NDArray[np.float64]) -> int:
    """Pixel count of the whole shape, rasterised on the same integer grid as the frame but without clipping."""
    ox, oy = (math.floor(v) - 1 for v in vertices.min(axis=0))
    w, h = (math.ceil(v) + 2 for v in vertices.max(axis=0) - np.array([ox, oy]))
    return int(_fill(vertices, (h, w), (ox, oy)).sum())


def _random_colour(
    rng: np.random.Generator, background: tuple[float, float, float], neighbours: list[tuple[float, float, float]]
) -> tuple[float, float, float]:
    """Pick a colour far from the background and from objects on screen at the same time.

    Distance from the background keeps every edge clear for a small model; distance from the neighbours keeps
    the boundary between overlapping objects visible too.
    """
    base = np.array(background)
    others = np.array(neighbours, dtype=np.float64).reshape(-1, 3)

    def score(c: npt.NDArray[np.float64]) -> float:
        to_bg = min(float(np.linalg.norm(c - base)) / 150, abs(float(c.mean() - base.mean())) / 45)
        to_others = float(np.linalg.norm(others - c, axis=1).min()) / 90 if len(others) else 1.0
        return min(to_bg, to_others)

    best = rng.uniform(0, 255, 3)
    for _ in range(96):
        if score(best) >= 1.0:
            break
        candidate = rng.uniform(0, 255, 3)
        if score(candidate) > score(best):
            best = candidate
    return (float(best[0]), float(best[1]), float(best[2]))


def _entry(spec: SceneSpec, rng: np.random.Generator, size: float, speed: float) -> tuple[float, float, float, float]:
    """Start just outside a random edge, heading into the frame at an angle that crosses it."""
    w, h = spec.width, spec.height
    edge = int(rng.integers(4))
    heading = rng.uniform(-0.9, 0.9)
    if edge == 0:  # left
        x, y, direction = -size, rng.uniform(0.1, 0.9) * h, heading
    elif edge == 1:  # right
        x, y, direction = w + size, rng.uniform(0.1, 0.9) * h, math.pi + heading
    elif edge == 2:  # top
        x, y, direction = rng.uniform(0.1, 0.9) * w, -size, math.pi / 2 + heading
    else:  # bottom
        x, y, direction = rng.uniform(0.1, 0.9) * w, h + size, -math.pi / 2 + heading
    return x, y, speed * math.cos(direction), speed * math.sin(direction)


def _outside(cx: float, cy: float, size: float, width: int, height: int) -> bool:
    return cx + size < 0 or cx - size > width or cy + size < 0 or cy - size > height


def _plan_tracks(spec: SceneSpec, rng: np.random.Generator, background: Background) -> list[_Track]:
    short, long = min(spec.width, spec.height), max(spec.width, spec.height)
    raw: list[tuple[int, int, _Track]] = []
    for slot in range(spec.n_objects):
        frame = 0
        first = True
        while frame < spec.n_frames:
            size = rng.uniform(spec.min_size, spec.max_size) * short
            speed = rng.uniform(0.05, 0.2) * long / spec.fps
            if first and rng.random() < 0.7:
                x0 = rng.uniform(size, spec.width - size)
                y0 = rng.uniform(size, spec.height - size)
                direction = rng.uniform(0, 2 * math.pi)
                vx, vy = speed * math.cos(direction), speed * math.sin(direction)
            else:
                x0, y0, vx, vy = _entry(spec, rng, size, speed)
            bounce = 0
            if rng.random() < spec.bounce_probability:
                bounce = int(rng.integers(10, max(11, spec.n_frames)))
                if not first or x0 < size or x0 > spec.width - size or y0 < size or y0 > spec.height - size:
                    bounce = 0  # reflection only makes sense once the whole shape is inside
            class_id = int(rng.integers(len(CLASS_NAMES)))
            track = _Track(
                object_id=-1,
                class_id=class_id,
                start_frame=frame,
                end_frame=frame,
                x0=x0,
                y0=y0,
                vx=vx,
                vy=vy,
                bounce_frames=bounce,
                size=size,
                angle0=rng.uniform(0, 2 * math.pi),
                spin=rng.uniform(-0.05, 0.05) if rng.random() < 0.5 else 0.0,
                colour=(0.0, 0.0, 0.0),
                shade=(rng.uniform(-20, 20) / size, rng.uniform(-20, 20) / size),
                z=rng.random(),
            )
            end = frame
            while end + 1 < spec.n_frames:
                cx, cy = _track_center(track, end + 1, spec.width, spec.height)
                if end + 1 - frame > 2 and _outside(cx, cy, size, spec.width, spec.height):
                    break
                end += 1
            neighbours = [t.colour for _, _, t in raw if t.start_frame <= end and t.end_frame >= frame]
            colour = _random_colour(rng, background.base, neighbours)
            raw.append((frame, slot, replace(track, end_frame=end, colour=colour)))
            frame = end + 1 + int(rng.integers(0, max(2, spec.n_frames // 8)))
            first = False
    raw.sort(key=lambda item: (item[0], item[1]))
    return [replace(track, object_id=i) for i, (_, _, track) in enumerate(raw)]


def plan_scene(spec: SceneSpec) -> ScenePlan:
    rng = np.random.default_rng([spec.seed, 0x5CE9E])
    background = plan_background(spec.width, spec.height, spec.max_noise_sigma, rng)
    return ScenePlan(background=background, tracks=tuple(_plan_tracks(spec, rng, background)))


def _visible_polygon(mask: Mask) -> list[tuple[float, float]]:
    """Outline of all visible parts as one polygon, joining separate parts through zero-width bridges.

    A detector reports one polygon per object, so split visibility (an object cut in two by a nearer one) is
    expressed the same way instance-segmentation labels do: each extra part is spliced in at its nearest point.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    parts = sorted((c.reshape(-1, 2).astype(np.float64) for c in contours), key=len, reverse=True)
    if not parts:
        return []
    merged = parts[0]
    for part in parts[1:]:
        d = np.linalg.norm(merged[:, None, :] - part[None, :, :], axis=2)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        loop = np.concatenate([part[j:], part[: j + 1]])
        merged = np.concatenate([merged[: i + 1], loop, merged[i:]])
    return [(float(x), float(y)) for x, y in merged]


def render_frame(
    spec: SceneSpec, frame_index: int, plan: ScenePlan | None = None
) -> tuple[Image, list[GroundTruthObject]]:
    """Render one frame without rendering the ones before it (used to sample training images cheaply)."""
    if not 0 <= frame_index < spec.n_frames:
        raise IndexError(f"frame {frame_index} outside 0..{spec.n_frames - 1}")
    plan = plan if plan is not None else plan_scene(spec)
    w, h = spec.width, spec.height
    image = render_background(plan.background, w, h, frame_index)
    active = [t for t in plan.tracks if t.start_frame <= frame_index <= t.end_frame]
    covered = np.zeros((h, w), dtype=bool)
    visible: list[tuple[_Track, Mask, float, tuple[float, float]]] = []
    for track in sorted(active, key=lambda t: t.z, reverse=True):  # nearest first
        cx, cy = _track_center(track, frame_index, w, h)
        angle = track.angle0 + track.spin * (frame_index - track.start_frame)
        vertices = _shape_vertices(track.class_id, cx, cy, track.size, angle)
        full = _fill(vertices, (h, w))
        mask = full & ~covered
        covered |= full
        if mask.any():
            visible.append((track, mask, _full_area(vertices) or 1, (cx, cy)))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    for track, mask, _, (cx, cy) in visible:
        sx, sy = track.shade
        for c in range(3):
            shaded = track.colour[c] + sx * (xs[mask] - cx) + sy * (ys[mask] - cy)
            image[:, :, c][mask] = shaded
    frame = apply_camera(plan.background, image, spec.seed, frame_index)
    objects: list[GroundTruthObject] = []
    for track, mask, area, center in sorted(visible, key=lambda item: item[0].object_id):
        ys_m, xs_m = np.nonzero(mask)
        objects.append(
            GroundTruthObject(
                object_id=track.object_id,
                class_id=track.class_id,
                label=CLASS_NAMES[track.class_id],
                bbox=(float(xs_m.min()), float(ys_m.min()), float(xs_m.max() + 1), float(ys_m.max() + 1)),
                polygon=_visible_polygon(mask),
                visible_fraction=min(1.0, float(mask.sum()) / area),
                center=(float(center[0]), float(center[1])),
            )
        )
    return frame, objects


def render_scene(spec: SceneSpec) -> Iterator[tuple[Image, list[GroundTruthObject]]]:
    """Yield every frame of the scene with its ground truth, in order (BGR, HxWx3 uint8)."""
    plan = plan_scene(spec)
    for i in range(spec.n_frames):
        yield render_frame(spec, i, plan)


def polygon_mask(polygon: list[tuple[float, float]], width: int, height: int) -> Mask:
    """Rasterise a pixel-index polygon the way ground-truth outlines were traced, so round trips are exact."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    if polygon:
        pts = np.round(np.array(polygon, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(canvas, [pts], 1)
    return canvas.astype(bool)
