"""TeaCache: accumulate the polynomial-rescaled change of the timestep-modulated input; reuse the stack residual.

Paper: "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model" (CVPR'25),
https://arxiv.org/abs/2411.19108 (code: ali-vilab/TeaCache, ``TeaCache4FLUX/teacache_flux.py``).

Rule: probe ``m_t`` = block 0's timestep-modulated input (its adaLN output); ``acc += poly(rel_l1(m_t, m_{t-1}))``
(the previous probe is updated every step); skip while ``acc < threshold``, returning ``stack_in + r_last``
(``r`` = block-stack output minus input at the last computed step); the first and the last step are computed.

``poly`` is a 4th-order polynomial fitted per model (``np.polyfit`` of the model-output change on the probe
change over full runs; clamped at 0 here, so the accumulator never decreases).
:func:`infercache.diffusion.calibrate_teacache` fits it for any model from a few runs;
``coefficients=None`` uses the raw relative L1 (identity). Defaults: ``threshold=0.6`` (the FLUX script's
default, meaningful only with a matching polynomial), ``warmup_steps=1``, ``last_steps=1``, no skip cap.
Probes: ``"modulated"`` (default; known for adaLN-Zero DiT blocks and PixArt's adaLN-single blocks),
``"timestep"`` (the Wan variant's timestep embedding; DiT blocks only) or ``"input"`` (the raw stack input, for any
model; not in the paper).
"""

from __future__ import annotations

import os

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..blocks import get_arg, rel_l1
from ..config import CacheConfig
from ..registry import register_policy
from .base import BranchState, CachePolicy, ProbeInput, StepInfo

#: Published / calibrated polynomials (highest degree first, like ``np.poly1d``).
KNOWN_COEFFICIENTS: dict[str, list[float]] = {
    # TeaCache4FLUX (FLUX.1-dev), probe = block-0 modulated input.
    "flux": [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01],
    # TeaCache4Wan2.1, t2v-1.3B with use_ret_steps=True (probe = time-projection output e0).
    "wan2.1-t2v-1.3b-ret": [-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02],
    # dit-digits, 20 steps, CFG 2.0, modulated probe; fitted by scripts/diffusion/bench_digits.py on held-out seeds.
    # The fit is poor here (R^2 about 0.2, probe changes 0.07-0.18): the probe barely predicts the output change.
    "dit-digits": [1.583518e04, -8.600101e03, 1.674521e03, -1.358199e02, 3.933543e00],
}


@dataclass
class TeaCacheConfig(CacheConfig):
    """TeaCache options (see the module docstring)."""

    threshold: float = 0.6
    coefficients: Sequence[float] | str | None = None
    probe: Literal["modulated", "timestep", "input"] = "modulated"
    warmup_steps: int = 1
    last_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probe not in ("modulated", "timestep", "input"):
            raise ValueError(f"probe must be 'modulated', 'timestep' or 'input', got {self.probe!r}")


@dataclass
class TeaCacheState(BranchState):
    prev_probe: torch.Tensor | None = None
    residual: torch.Tensor | None = None


def _is_dit_block(block: torch.nn.Module) -> bool:
    return getattr(block, "norm_type", None) == "ada_norm_zero"


def modulated_input(block: torch.nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Block 0's timestep-modulated input for the block classes we know."""
    norm_type = getattr(block, "norm_type", None)
    if norm_type == "ada_norm_zero":  # DiT: AdaLayerNormZero(h, timestep, class_labels)
        t = get_arg(args, kwargs, "timestep", 4)
        y = get_arg(args, kwargs, "class_labels", 6)
        return block.norm1(h, t, y, hidden_dtype=h.dtype)[0]
    if norm_type == "ada_norm_single":  # PixArt: scale_shift_table + 6*dim timestep embedding
        t = get_arg(args, kwargs, "timestep", 4)
        shift, scale = (block.scale_shift_table[None] + t.reshape(h.shape[0], 6, -1)).chunk(6, dim=1)[:2]
        return block.norm1(h) * (1 + scale) + shift
    raise NotImplementedError(
        f"no TeaCache modulated-input probe is known for {type(block).__name__} (norm_type={norm_type!r}); "
        "use probe='input'"
    )


def timestep_embedding(block: torch.nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Block 0's conditioning embedding (timestep + label) of an adaLN-Zero DiT block."""
    if not _is_dit_block(block):
        raise NotImplementedError(
            f"probe='timestep' is implemented for adaLN-Zero DiT blocks, not {type(block).__name__}"
        )
    t = get_arg(args, kwargs, "timestep", 4)
    y = get_arg(args, kwargs, "class_labels", 6)
    return block.norm1.emb(t, y, hidden_dtype=h.dtype)


PROBES: dict[str, Callable[..., torch.Tensor]] = {
    "modulated": modulated_input,
    "timestep": timestep_embedding,
    "input": lambda block, h, args, kwargs: h,
}


def compute_probe(kind: str, inp: ProbeInput) -> torch.Tensor:
    return PROBES[kind](inp.block, inp.x, inp.args, inp.kwargs).detach()


@register_policy("teacache")
class TeaCachePolicy(CachePolicy):
    config_class = TeaCacheConfig
    state_class = TeaCacheState

    def setup(self, transformer: torch.nn.Module, blocks: torch.nn.ModuleList | None) -> None:
        coeffs = self.config.coefficients
        if isinstance(coeffs, (str, os.PathLike)) and str(coeffs).endswith(".json"):
            from ..calibration import load_calibration

            coeffs = load_calibration(coeffs, "teacache")
        if isinstance(coeffs, str):
            if coeffs not in KNOWN_COEFFICIENTS:
                raise ValueError(f"no TeaCache coefficients named {coeffs!r}; known: {', '.join(KNOWN_COEFFICIENTS)}")
            coeffs = KNOWN_COEFFICIENTS[coeffs]
        self._poly = np.poly1d(coeffs) if coeffs is not None else None
        if self.config.probe != "input" and blocks is not None:
            block = blocks[0]
            if self.config.probe == "modulated" and getattr(block, "norm_type", None) not in (
                "ada_norm_zero",
                "ada_norm_single",
            ):
                raise NotImplementedError(
                    f"no TeaCache modulated-input probe is known for {type(block).__name__}; use probe='input'"
                )
            if self.config.probe == "timestep" and not _is_dit_block(block):
                raise NotImplementedError(f"probe='timestep' needs adaLN-Zero DiT blocks, not {type(block).__name__}")

    def rescale(self, x: float) -> float:
        """``poly(x)``, clamped at 0 (a fitted polynomial can dip below 0 outside its calibration range)."""
        return max(0.0, float(self._poly(x))) if self._poly is not None else x

    def probe(self, state: TeaCacheState, inp: ProbeInput, step: StepInfo) -> torch.Tensor:
        return compute_probe(self.config.probe, inp)

    def distance(self, state: TeaCacheState, probe: torch.Tensor, step: StepInfo) -> float | None:
        if state.prev_probe is None:
            return None
        return self.rescale(rel_l1(probe, state.prev_probe))

    def can_reuse(self, state: TeaCacheState) -> bool:
        return state.residual is not None

    def observe(self, state: TeaCacheState, probe: Any, skipped: bool, step: StepInfo) -> None:
        state.prev_probe = probe

    def reuse(self, state: TeaCacheState, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        return x + state.residual

    def record(self, state: TeaCacheState, x_in: torch.Tensor, x_out: torch.Tensor, step: StepInfo) -> None:
        state.residual = x_out - x_in
