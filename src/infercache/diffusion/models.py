"""The ``dit-digits`` reference model: a tiny class-conditional DiT trained by us on scikit-learn's digits.

It exists so that caching policies can be measured on a model whose velocity field is *trained* (an untrained DiT
has an almost constant output, which makes every cache look free). Train it with
``scripts/diffusion/train_dit_digits.py``; the checkpoint ships under ``checkpoints/dit-digits/``.

Model: diffusers ``DiTTransformer2DModel`` (adaLN-Zero blocks), 1 x 8 x 8 pixels, patch 2 (16 tokens),
10 classes (+1 null class for classifier-free guidance). Objective: rectified flow
(``x_t = (1 - s) x_0 + s e``, target ``v = e - x_0``, model timestep ``1000 s``), sampled with diffusers'
``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints" / "dit-digits"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # index of the class-dropout ("unconditional") embedding

#: Architecture of ``dit-digits`` (kwargs of ``DiTTransformer2DModel``).
DIT_DIGITS_CONFIG: dict[str, Any] = {
    "num_attention_heads": 3,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
}
#: Scheduler of ``dit-digits`` (kwargs of ``FlowMatchEulerDiscreteScheduler``).
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}


def build_dit_digits(**overrides: Any) -> torch.nn.Module:
    """A randomly initialised ``DiTTransformer2DModel`` with the ``dit-digits`` architecture."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**{**DIT_DIGITS_CONFIG, **overrides})


def build_scheduler() -> Any:
    """The flow-matching Euler scheduler ``dit-digits`` was trained for."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def load_dit_digits(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """Load the trained ``dit-digits`` checkpoint: returns ``(transformer, scheduler)``, transformer in eval mode."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else CHECKPOINT_DIR
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"no dit-digits checkpoint at {weights}; train one with `python scripts/diffusion/train_dit_digits.py`"
        )
    config = json.loads((folder / "config.json").read_text())
    model = build_dit_digits(**config.get("model", {}))
    model.load_state_dict(load_file(str(weights)))
    if dtype != torch.float32:
        model.to(dtype)
    model.eval().requires_grad_(False)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**config.get("scheduler", SCHEDULER_CONFIG))
    return model, scheduler


def _begin_call(transformer: torch.nn.Module, num_steps: int) -> None:
    # Tell an enabled cache that a new trajectory starts (no-op without a cache).
    from .hooks import begin_call

    begin_call(transformer, num_inference_steps=num_steps)


@torch.no_grad()
def sample(
    transformer: torch.nn.Module,
    scheduler: Any,
    class_labels: torch.Tensor | list[int],
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    cfg_mode: Literal["batch", "batch_uncond_first", "calls"] = "batch",
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the denoising loop and return images in ``[-1, 1]``, shape ``(B, C, H, W)``.

    ``guidance_scale > 1`` enables classifier-free guidance, either as one batched call per step
    (``cfg_mode="batch"``: ``[cond; uncond]``, like diffusers' ``DiTPipeline``) or as two separate calls
    (``cfg_mode="calls"``: cond first, then uncond). ``cfg_mode="batch_uncond_first"`` batches ``[uncond; cond]``
    (the order diffusers' pipelines and FasterCache assume). ``latents`` overrides the initial noise.
    """
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    b = labels.shape[0]
    cfg = transformer.config
    param = next(transformer.parameters())
    shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = latents.clone() if latents is not None else torch.randn(shape, generator=generator, dtype=torch.float32)
    x = x.to(param.device, param.dtype)
    labels = labels.to(param.device)
    null = torch.full_like(labels, NULL_CLASS)
    scheduler.set_timesteps(num_steps)
    _begin_call(transformer, num_steps)
    for t in scheduler.timesteps:
        tb = t.expand(b).to(param.device)
        if guidance_scale == 1.0:
            v = transformer(x, timestep=tb, class_labels=labels, return_dict=False)[0]
        elif cfg_mode == "batch":
            out = transformer(
                torch.cat([x, x]),
                timestep=torch.cat([tb, tb]),
                class_labels=torch.cat([labels, null]),
                return_dict=False,
            )[0]
            cond, uncond = out.chunk(2)
            v = uncond + guidance_scale * (cond - uncond)
        elif cfg_mode == "batch_uncond_first":
            out = transformer(
                torch.cat([x, x]),
                timestep=torch.cat([tb, tb]),
                class_labels=torch.cat([null, labels]),
                return_dict=False,
            )[0]
            uncond, cond = out.chunk(2)
            v = uncond + guidance_scale * (cond - uncond)
        elif cfg_mode == "calls":
            cond = transformer(x, timestep=tb, class_labels=labels, return_dict=False)[0]
            uncond = transformer(x, timestep=tb, class_labels=null, return_dict=False)[0]
            v = uncond + guidance_scale * (cond - uncond)
        else:
            raise ValueError(f"cfg_mode must be 'batch', 'batch_uncond_first' or 'calls', got {cfg_mode!r}")
        x = scheduler.step(v, t, x).prev_sample
    return x.float().clamp(-1, 1)
