"""Procedural moving-digits clips (scikit-learn's 8x8 digits bouncing on a canvas), the training data of the
``video-dit-moving-digits`` model: the video analogue of ``dit-digits``, small enough to train on a CPU.

Each clip: ``num_digits`` digits (random class and sklearn sample) start at random positions with random integer
velocities (at least 1 pixel per frame on one axis) and bounce off the canvas edges; overlapping digits combine
by ``max``. Pixels are in ``[-1, 1]`` (-1 = background). Deterministic for a given ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

DIGIT = 8  # sklearn digits are 8 x 8


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@dataclass
class MovingDigits:
    """``clips`` ``(N, 1, F, S, S)`` in ``[-1, 1]``; ``labels`` ``(N, num_digits)``; ``positions``
    ``(N, num_digits, F, 2)`` top-left corners (row, col) per frame; ``velocities`` ``(N, num_digits, 2)`` at frame 0."""

    clips: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    velocities: torch.Tensor


def _bounce(p: int, v: int, lo: int, hi: int) -> tuple[int, int]:
    p += v
    while p < lo or p > hi:
        if p < lo:
            p, v = 2 * lo - p, -v
        if p > hi:
            p, v = 2 * hi - p, -v
    return p, v


def moving_digits(
    num_clips: int,
    num_frames: int = 8,
    size: int = 16,
    num_digits: int = 1,
    max_speed: int = 2,
    seed: int = 0,
    classes: list[int] | None = None,
) -> MovingDigits:
    """Generate ``num_clips`` clips (see the module docstring); ``classes`` restricts the digit classes."""
    if size < DIGIT:
        raise ValueError(f"size must be >= {DIGIT}")
    if max_speed < 1:
        raise ValueError("max_speed must be >= 1")
    images, targets = _digits()
    pool = np.arange(len(targets)) if classes is None else np.flatnonzero(np.isin(targets, classes))
    rng = np.random.default_rng(seed)
    hi = size - DIGIT
    clips = np.zeros((num_clips, 1, num_frames, size, size), dtype=np.float32)
    labels = np.zeros((num_clips, num_digits), dtype=np.int64)
    pos = np.zeros((num_clips, num_digits, num_frames, 2), dtype=np.int64)
    vel = np.zeros((num_clips, num_digits, 2), dtype=np.int64)
    for n in range(num_clips):
        for d in range(num_digits):
            idx = rng.choice(pool)
            labels[n, d] = targets[idx]
            p = rng.integers(0, hi + 1, size=2)
            v = rng.integers(-max_speed, max_speed + 1, size=2)
            if hi > 0 and not v.any():
                v[rng.integers(0, 2)] = rng.choice([-1, 1])
            vel[n, d] = v
            r, c, vr, vc = int(p[0]), int(p[1]), int(v[0]), int(v[1])
            for f in range(num_frames):
                pos[n, d, f] = (r, c)
                patch = clips[n, 0, f, r : r + DIGIT, c : c + DIGIT]
                np.maximum(patch, images[idx], out=patch)
                if hi > 0:
                    r, vr = _bounce(r, vr, 0, hi)
                    c, vc = _bounce(c, vc, 0, hi)
    return MovingDigits(
        torch.from_numpy(clips * 2.0 - 1.0), torch.from_numpy(labels), torch.from_numpy(pos), torch.from_numpy(vel)
    )
