"""Quality metrics for caching: PSNR / MSE against the uncached output, and a digit classifier for ``dit-digits``."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error between two image batches."""
    return float(((a.double() - b.double()) ** 2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, cap: float = 100.0) -> float:
    """PSNR in dB (``data_range=2`` for images in ``[-1, 1]``), capped at ``cap`` like TeaCache's eval code."""
    err = mse(a, b)
    if err == 0.0:
        return cap
    return min(cap, 10.0 * math.log10(data_range**2 / err))


def digits_to_pixels(images: torch.Tensor) -> np.ndarray:
    """``(B, 1, 8, 8)`` images in ``[-1, 1]`` -> ``(B, 64)`` pixels on sklearn's ``0..16`` scale."""
    x = images.detach().float().reshape(images.shape[0], -1).clamp(-1, 1)
    return ((x + 1.0) * 8.0).cpu().numpy()


@lru_cache(maxsize=1)
def digits_classifier() -> Any:
    """A logistic-regression classifier trained on all of ``load_digits`` (about 1 s; cached)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    clf = LogisticRegression(max_iter=2000)
    clf.fit(data.data / 16.0, data.target)
    return clf


def classify_digits(images: torch.Tensor) -> np.ndarray:
    """Predicted digit for each ``(1, 8, 8)`` image in ``[-1, 1]``."""
    return digits_classifier().predict(digits_to_pixels(images) / 16.0)


def digit_accuracy(images: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
    """Fraction of samples the classifier labels with their intended class (chance = 0.1)."""
    labels = np.asarray(torch.as_tensor(labels).cpu())
    return float((classify_digits(images) == labels).mean())


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, win_size: int = 7) -> float:
    """Mean structural similarity of two image batches ``(B, C, H, W)`` (Wang et al. 2004), written here.

    Follows scikit-image's defaults: a ``win_size x win_size`` uniform window (shrunk to the image size if
    smaller), sample covariances (``N / (N - 1)``), ``K1 = 0.01``, ``K2 = 0.03``, the mean over valid window
    positions, channels and images. ``data_range=2`` for images in ``[-1, 1]``.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    w = min(win_size, a.shape[-1], a.shape[-2])
    x, y = a.double().flatten(0, 1)[:, None], b.double().flatten(0, 1)[:, None]
    pool = lambda t: torch.nn.functional.avg_pool2d(t, w, stride=1)  # noqa: E731
    n = w * w
    cov_norm = n / (n - 1) if n > 1 else 1.0
    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())
