"""Backgrounds and camera effects for the synthetic world.

Backgrounds are textured and drift slowly (so a detector cannot learn a static scene), but their contrast is
kept well below that of the objects. Everything is an analytic function of the frame index so frames can be
rendered in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatImage = npt.NDArray[np.float32]
Image = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Wave:
    """A drifting plane wave; a few of them summed give soft, slowly changing blotches and stripes."""

    kx: float
    ky: float
    omega: float  # radians per frame
    phase: float
    amplitude: tuple[float, float, float]


@dataclass(frozen=True)
class Background:
    """Parameters of one scene's backdrop and of the camera that films it."""

    base: tuple[float, float, float]
    waves: tuple[Wave, ...]
    gradient: tuple[float, float, float, float, float]  # gx, gy (per pixel), colour weights b, g, r
    gain_amplitude: float
    gain_period: float  # frames
    gain_phase: float
    noise_sigma: float
    texture_amplitude: float
    texture_drift: tuple[float, float]  # pixels per frame
    texture: FloatImage  # periodic tile with unit variance, repeated over the frame


def plan_background(width: int, height: int, max_noise_sigma: float, rng: np.random.Generator) -> Background:
    """Draw a backdrop whose base colour sits in a dark or a light band, leaving room for contrasting objects."""
    base_mean = rng.choice([rng.uniform(35, 85), rng.uniform(170, 220)])
    base = tuple(float(np.clip(base_mean + rng.uniform(-35, 35), 0, 255)) for _ in range(3))
    short = min(width, height)
    waves: list[Wave] = []
    for i in range(int(rng.integers(2, 5))):
        stripes = i == 0 and rng.random() < 0.4
        wavelength = short * (rng.uniform(0.08, 0.25) if stripes else rng.uniform(0.4, 2.0))
        direction = rng.uniform(0, 2 * math.pi)
        k = 2 * math.pi / wavelength
        amp = rng.uniform(5, 12) if stripes else rng.uniform(4, 14)
        tint = rng.uniform(0.5, 1.0, 3)
        waves.append(
            Wave(
                kx=k * math.cos(direction),
                ky=k * math.sin(direction),
                omega=rng.uniform(-0.08, 0.08),
                phase=rng.uniform(0, 2 * math.pi),
                amplitude=(float(amp * tint[0]), float(amp * tint[1]), float(amp * tint[2])),
            )
        )
    g_angle = rng.uniform(0, 2 * math.pi)
    g_strength = rng.uniform(0, 30) / max(width, height)
    weights = rng.uniform(0.5, 1.0, 3)
    return Background(
        base=(base[0], base[1], base[2]),
        waves=tuple(waves),
        gradient=(
            g_strength * math.cos(g_angle),
            g_strength * math.sin(g_angle),
            float(weights[0]),
            float(weights[1]),
            float(weights[2]),
        ),
        gain_amplitude=rng.uniform(0.0, 0.2),
        gain_period=rng.uniform(30, 120),
        gain_phase=rng.uniform(0, 2 * math.pi),
        noise_sigma=rng.uniform(1.0, max_noise_sigma),
        texture_amplitude=rng.uniform(2, 10),
        texture_drift=(rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)),
        texture=_texture_tile(rng, int(rng.choice([64, 128, 256]))),  # keyword order fixes the draw order
    )


def _texture_tile(rng: np.random.Generator, size: int) -> FloatImage:
    """Smooth random texture that wraps around seamlessly, so drifting it never shows a seam."""
    cutoff = int(rng.integers(3, 12))
    spectrum = np.zeros((size, size // 2 + 1, 3), dtype=np.complex128)
    coeffs = rng.normal(size=(2 * cutoff, cutoff, 3)) + 1j * rng.normal(size=(2 * cutoff, cutoff, 3))
    spectrum[:cutoff, :cutoff] = coeffs[:cutoff]
    spectrum[-cutoff:, :cutoff] = coeffs[cutoff:]
    spectrum[0, 0] = 0
    tile = np.fft.irfft2(spectrum, s=(size, size), axes=(0, 1))
    tile /= tile.std() + 1e-9
    return np.asarray(tile, dtype=np.float32)


def render_background(bg: Background, width: int, height: int, frame: int) -> FloatImage:
    """Backdrop for one frame, as float BGR so objects can be painted before rounding."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    size = bg.texture.shape[0]
    rows = (np.arange(height) + round(bg.texture_drift[1] * frame)) % size
    cols = (np.arange(width) + round(bg.texture_drift[0] * frame)) % size
    image: FloatImage = bg.texture[rows[:, None], cols[None, :]] * np.float32(bg.texture_amplitude)
    image += np.array(bg.base, dtype=np.float32)
    gx, gy, wb, wg, wr = bg.gradient
    ramp = gx * (xs - width / 2) + gy * (ys - height / 2)
    for c, weight in enumerate((wb, wg, wr)):
        image[:, :, c] += weight * ramp
    for wave in bg.waves:
        field = np.sin(wave.kx * xs + wave.ky * ys + wave.omega * frame + wave.phase)
        for c in range(3):
            image[:, :, c] += wave.amplitude[c] * field
    return image


def apply_camera(bg: Background, image: FloatImage, seed: int, frame_index: int) -> Image:
    """Slow exposure drift, small flicker and sensor noise; seeded per frame so frames stay independent."""
    gain = 1.0 + bg.gain_amplitude * math.sin(2 * math.pi * frame_index / bg.gain_period + bg.gain_phase)
    noise_rng = np.random.default_rng([seed, frame_index, 0xA015E])
    gain *= 1.0 + noise_rng.uniform(-0.03, 0.03)
    noisy = image * gain + noise_rng.normal(0.0, bg.noise_sigma, image.shape).astype(np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
