"""The training step shared by our reference DiTs' scripts (``scripts/diffusion/train_*.py``)."""

from __future__ import annotations

import torch


def train_step(loss: torch.Tensor, model: torch.nn.Module, ema: torch.nn.Module, optimizer, scheduler, step: int,
               ema_max: float, clip: float = 1.0) -> float:
    """Backward, gradient clipping at ``clip``, optimizer and LR-schedule step, then the EMA update with the warm-up
    decay ``min(ema_max, (1 + step) / (10 + step))``. Returns ``loss.item()``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    decay = min(ema_max, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1 - decay)
    return loss.item()
