"""The ``video-dit-moving-digits`` reference model and its clip-quality metrics.

A :class:`CausalVideoDiT` trained by ``scripts/diffusion/train_video_dit.py`` on procedural moving-digit clips
(teacher forcing, rectified flow, 2 frames per chunk); the checkpoint ships under
``checkpoints/video-dit-moving-digits/``. ``load_video_dit()`` returns the model in eval mode.

Quality of a generated clip needs no reference clip: in every frame the brightest ``8 x 8`` window is located
and classified with the ``load_digits`` logistic regression (``quality.digits_classifier``). ``video_quality``
reports the classifier's mean confidence (is there a recognisable digit), identity consistency (the share of
frames whose predicted digit equals the clip's most frequent one: does the digit stay the same digit), and motion
consistency (the share of frame-to-frame moves of the window within the data's 2 px/frame speed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import CausalVideoDiT

VIDEO_CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "video-dit-moving-digits"

#: Architecture of ``video-dit-moving-digits`` (kwargs of ``CausalVideoDiT``).
VIDEO_DIT_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "frame_size": 16,
    "patch_size": 4,
    "dim": 96,
    "depth": 4,
    "heads": 4,
}
#: How it is sampled: chunk size, Euler steps, and the clip length used for evaluation (twice the training length).
VIDEO_SAMPLING: dict[str, Any] = {"chunk_frames": 2, "num_steps": 12, "eval_frames": 16}


def load_video_dit(path: str | Path | None = None) -> CausalVideoDiT:
    """Load the trained ``video-dit-moving-digits`` checkpoint (eval mode, no grad)."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else VIDEO_CHECKPOINT_DIR
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"no video-dit-moving-digits checkpoint at {weights}; train one with "
            "`python scripts/diffusion/train_video_dit.py`"
        )
    config = json.loads((folder / "config.json").read_text())
    model = CausalVideoDiT(**config.get("model", VIDEO_DIT_CONFIG))
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)


def locate_digit(frames: torch.Tensor, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightest ``size x size`` window of each frame ``(N, H, W)`` in ``[-1, 1]``: ``(crops (N, 1, size, size),
    top-left corners (N, 2))``."""
    ink = (frames.float() + 1) / 2
    sums = torch.nn.functional.avg_pool2d(ink[:, None], size, stride=1)[:, 0]  # (N, H-size+1, W-size+1)
    n, gh, gw = sums.shape
    idx = sums.reshape(n, -1).argmax(dim=1)
    rows, cols = idx // gw, idx % gw
    crops = torch.stack([frames[i, r : r + size, c : c + size] for i, (r, c) in enumerate(zip(rows, cols))])
    return crops[:, None], torch.stack([rows, cols], dim=1)


def video_quality(video: torch.Tensor, max_speed: int = 2) -> dict[str, float]:
    """Reference-free quality of clips ``(B, 1, F, H, W)`` in ``[-1, 1]`` (see the module docstring)."""
    from ..quality import digits_classifier, digits_to_pixels

    b, _, f = video.shape[:3]
    crops, corners = locate_digit(video[:, 0].reshape(b * f, *video.shape[-2:]))
    proba = digits_classifier().predict_proba(digits_to_pixels(crops) / 16.0)  # (B*F, 10)
    pred = proba.argmax(axis=1).reshape(b, f)
    conf = float(proba.max(axis=1).mean())
    majority = np.array([np.bincount(row, minlength=10).argmax() for row in pred])
    consistency = float((pred == majority[:, None]).mean())
    corners = corners.reshape(b, f, 2)
    step = (corners[:, 1:] - corners[:, :-1]).abs().amax(dim=-1)
    motion = float((step <= max_speed).float().mean()) if f > 1 else 1.0
    return {"confidence": round(conf, 4), "identity_consistency": round(consistency, 4), "motion_ok": round(motion, 4)}


def save_video_grid(video: torch.Tensor, path: str | Path, scale: int = 4) -> None:
    """One row per clip, one column per frame, dark digits on white (PNG)."""
    from PIL import Image

    b, _, f, h, w = video.shape
    grid = torch.ones(b * (h + 1) + 1, f * (w + 1) + 1)
    for i in range(b):
        for j in range(f):
            grid[1 + i * (h + 1) : 1 + i * (h + 1) + h, 1 + j * (w + 1) : 1 + j * (w + 1) + w] = (
                video[i, 0, j].float() + 1
            ) / 2
    arr = (255 * (1 - grid.clamp(0, 1))).to(torch.uint8).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


def psnr_video(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB, capped at 100) between clip batches in ``[-1, 1]``."""
    err = float(((a.double() - b.double()) ** 2).mean())
    return 100.0 if err == 0 else min(100.0, 10 * math.log10(4.0 / err))
