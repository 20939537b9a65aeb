"""ProfilingDiT's offline block profiling: which blocks attend to the foreground, and which to the background.

Paper: "Model Reveals What to Cache: Profiling-Based Feature Reuse for Video Diffusion Models" (ICCV'25),
https://arxiv.org/abs/2504.03140 (code: GeekGuru123/ProfilingDiT). The paper's observation: most layers keep a
consistent preference for foreground or for background regions in their attention. Foreground-focused blocks are
always computed; background-focused blocks are cached (``policies/profiling_dit.py``).

The released code ships hand-made block lists and does not contain the profiling step, so its details are our
choices (each one a keyword argument):

* **Foreground region** (the paper uses the generated object): per sample, a token is foreground when its
  *saliency* exceeds the sample's mean token saliency. Saliency is ``|x - median(x)|`` of the latent, averaged
  over channels and over the token's patch, where ``x`` is the input latent of the trajectory's **last** model
  call (nearly clean after a full schedule). ``foreground=`` replaces this by a fixed ``(N,)`` / ``(B, N)`` token
  mask or by a callable ``latent -> (B, N)`` mask.
* **Attention map**: the self-attention module of each block (``attn1`` or ``attn``) is re-evaluated from its
  input: ``softmax(q k^T * scale)`` with ``to_q`` / ``to_k`` (and ``norm_q`` / ``norm_k``), without attention
  masks and without rotary embeddings (so for RoPE models the map is approximate). It is averaged over heads
  and queries into the attention mass each *key* token receives.
* **Preference** of block ``b``: the mean attention mass on foreground keys divided by the mean foreground
  area fraction (1.0 = no preference, > 1 = foreground-focused), pooled over samples, trajectories and the
  profiled steps (default: every step).
* **Labels**: by default a block is background when its preference is below the mean preference of all
  blocks (relative: on ``dit-digits`` every block attends to the digit's ink more than to its area, so an absolute
  rule would find no background block). ``threshold=t``: background iff preference ``< t`` (``t = 1.0`` is the
  literal "prefers the background"). ``background_ratio=r``: the ``round(r * num_blocks)`` blocks with the lowest
  preference (the Wan2.1 list caches 28 of 40 blocks, ``r = 0.7``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .blocks import find_blocks
from .tracker import TrajectoryTracker, timestep_value

PROFILE_FORMAT = "infercache.profiling_dit/1"


# ------------------------------------------------------------------------------------------------ pure functions
def _patch(patch_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(patch_size, int):
        return (patch_size,) * spatial_dims
    p = tuple(int(v) for v in patch_size)
    if len(p) != spatial_dims:
        raise ValueError(f"patch size {p} does not match a latent with {spatial_dims} spatial dims")
    return p


def token_saliency(latent: torch.Tensor, patch_size: int | Sequence[int] = 1) -> torch.Tensor:
    """``(B, N)`` saliency of each token: ``|x - median(x)|`` averaged over channels and the token's patch.

    ``latent`` is ``(B, C, H, W)`` or ``(B, C, F, H, W)``; tokens are the patches in row-major order (the order of
    diffusers' patch embeddings). The median is taken per sample and channel over all positions.
    """
    if latent.ndim not in (4, 5):
        raise ValueError(f"expected a (B, C, H, W) or (B, C, F, H, W) latent, got shape {tuple(latent.shape)}")
    x = latent.detach().float()
    b, c = x.shape[:2]
    med = x.reshape(b, c, -1).median(dim=-1).values.reshape(b, c, *([1] * (x.ndim - 2)))
    dev = (x - med).abs().mean(dim=1, keepdim=True)
    p = _patch(patch_size, x.ndim - 2)
    pool = torch.nn.functional.avg_pool2d if x.ndim == 4 else torch.nn.functional.avg_pool3d
    return pool(dev, kernel_size=p, stride=p).reshape(b, -1)


def foreground_tokens(latent: torch.Tensor, patch_size: int | Sequence[int] = 1) -> torch.Tensor:
    """``(B, N)`` bool mask: tokens whose saliency exceeds their sample's mean token saliency."""
    s = token_saliency(latent, patch_size)
    return s > s.mean(dim=1, keepdim=True)


def attention_probs(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, N)`` self-attention probabilities of a diffusers ``Attention`` module for its input.

    Recomputed from ``to_q`` / ``to_k``: no attention mask, no rotary embedding.
    """
    h = hidden_states.float()
    if h.ndim != 3:
        raise ValueError(f"expected (B, N, D) attention input, got shape {tuple(h.shape)}")
    q, k = attn.to_q(h.to(attn.to_q.weight.dtype)).float(), attn.to_k(h.to(attn.to_k.weight.dtype)).float()
    heads = int(attn.heads)
    b, n, inner = q.shape
    d = inner // heads
    q, k = _norm(attn, "norm_q", q, heads), _norm(attn, "norm_k", k, heads)
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    scale = float(getattr(attn, "scale", d**-0.5))
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


def _norm(attn: torch.nn.Module, name: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    norm = getattr(attn, name, None)
    if norm is None:
        return x
    b, n, inner = x.shape
    try:  # per-head norm (the common case)
        return norm(x.view(b, n, heads, inner // heads)).reshape(b, n, inner).float()
    except (RuntimeError, ValueError):  # a norm over the full width
        return norm(x).float()


def key_mass(probs: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` attention mass each key token receives, averaged over heads and queries (sums to 1)."""
    return probs.float().mean(dim=(1, 2))


def foreground_preference(mass: torch.Tensor, fg: torch.Tensor) -> tuple[float, float]:
    """``(sum of foreground attention mass, sum of foreground area fraction)`` over the batch.

    Their ratio is the preference: 1.0 when the block attends to the foreground in proportion to its area.
    """
    fg = fg.to(mass.device).bool()
    if fg.shape != mass.shape:
        fg = fg.expand_as(mass)
    return float((mass * fg).sum()), float(fg.float().mean(dim=1).sum())


def label_blocks(
    preference: Sequence[float], threshold: float | None = None, background_ratio: float | None = None
) -> tuple[list[int], list[int]]:
    """``(foreground_blocks, background_blocks)`` from per-block preferences (see the module docstring)."""
    n = len(preference)
    if background_ratio is not None:
        if threshold is not None:
            raise ValueError("give a threshold or a background_ratio, not both")
        if not 0.0 <= background_ratio <= 1.0:
            raise ValueError(f"background_ratio must be in [0, 1], got {background_ratio}")
        k = int(round(background_ratio * n))
        order = sorted(range(n), key=lambda b: (preference[b], b))
        background = sorted(order[:k])
    else:
        t = threshold if threshold is not None else sum(preference) / max(n, 1)
        background = [b for b in range(n) if preference[b] < t]
    foreground = [b for b in range(n) if b not in background]
    return foreground, background


# ----------------------------------------------------------------------------------------------------- result
@dataclass
class BlockProfile:
    """Result of :func:`profile_blocks`; JSON round-trip with :meth:`save` / :meth:`load`."""

    preference: list[float]
    foreground_blocks: list[int]
    background_blocks: list[int]
    threshold: float | None = None
    background_ratio: float | None = None
    per_step: list[list[float]] = field(default_factory=list)  # [step][block] preference
    meta: dict[str, Any] = field(default_factory=dict)

    def relabel(self, threshold: float | None = None, background_ratio: float | None = None) -> BlockProfile:
        """The same measurements with another labelling rule."""
        fg, bg = label_blocks(self.preference, threshold, background_ratio)
        return BlockProfile(self.preference, fg, bg, threshold, background_ratio, self.per_step, dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockProfile:
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a ProfilingDiT block profile (format {d.get('format')!r}, want {PROFILE_FORMAT})")
        return cls(**{k: v for k, v in d.items() if k != "format"})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BlockProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------------- the profiler
def _attention_module(block: torch.nn.Module) -> torch.nn.Module:
    for name in ("attn1", "attn", "self_attn"):
        mod = getattr(block, name, None)
        if isinstance(mod, torch.nn.Module) and hasattr(mod, "to_q") and hasattr(mod, "to_k"):
            return mod
    raise ValueError(
        f"{type(block).__name__} has no self-attention module named attn1 / attn / self_attn with to_q and to_k"
    )


@dataclass
class _Trajectory:
    steps: list[list[torch.Tensor]] = field(default_factory=list)  # [step][block] -> (B, N) key mass
    last_latent: torch.Tensor | None = None


@torch.no_grad()
def profile_blocks(
    transformer: torch.nn.Module,
    run: Callable[[], Any],
    *,
    foreground: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    patch_size: int | Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    threshold: float | None = None,
    background_ratio: float | None = None,
    blocks: str | None = None,
) -> BlockProfile:
    """Profile which blocks attend to the foreground, from the full (uncached) runs made by ``run()``.

    ``foreground``: a token mask or a callable on the last latent (default: :func:`foreground_tokens`);
    ``patch_size``: from ``transformer.config.patch_size`` by default; ``steps``: the step indices to pool
    (default: all); ``threshold`` / ``background_ratio``: the labelling rule (:func:`label_blocks`).
    """
    from .hooks import SESSION_ATTR

    if hasattr(transformer, SESSION_ATTR):
        raise RuntimeError("disable the cache before profiling: profiling needs full, uncached runs")
    _, block_list = find_blocks(transformer, blocks)
    attns = [_attention_module(b) for b in block_list]
    if patch_size is None:
        cfg = getattr(transformer, "config", None)
        patch_size = getattr(cfg, "patch_size", None) or 1
        if hasattr(cfg, "patch_size_t") and cfg.patch_size_t:
            patch_size = (cfg.patch_size_t, patch_size, patch_size)
    tracker = TrajectoryTracker()
    trajs: list[_Trajectory] = []
    current: dict[str, Any] = {}

    def on_model(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        pos = tracker.observe(timestep_value(t), (tuple(x.shape), x.dtype, x.device))
        if pos.new_trajectory:
            trajs.append(_Trajectory())
        traj = trajs[-1]
        if pos.slot == 0:
            traj.steps.append([None] * len(attns))
        traj.last_latent = x.detach()
        current["slot"] = pos.slot

    def make_attn_hook(b: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not trajs:
                return
            h = kwargs.get("hidden_states", args[0] if args else None)
            if kwargs.get("encoder_hidden_states") is not None or (len(args) > 1 and args[1] is not None):
                return  # cross-attention call
            mass = key_mass(attention_probs(module, h))
            row = trajs[-1].steps[-1]
            row[b] = mass if row[b] is None else torch.cat([row[b], mass])  # CFG as separate calls
        return hook

    handles = [transformer.register_forward_pre_hook(on_model, with_kwargs=True)]
    handles += [a.register_forward_pre_hook(make_attn_hook(i), with_kwargs=True) for i, a in enumerate(attns)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if not trajs:
        raise RuntimeError("run() made no call to the model: nothing to profile")

    nb = len(attns)
    num = [0.0] * nb
    den = [0.0] * nb
    per_step_num: dict[int, list[float]] = {}
    per_step_den: dict[int, list[float]] = {}
    for traj in trajs:
        latent = traj.last_latent
        if foreground is None:
            fg = foreground_tokens(latent, patch_size)
        elif callable(foreground):
            fg = foreground(latent)
        else:
            fg = torch.as_tensor(foreground).bool()
            fg = fg.unsqueeze(0) if fg.ndim == 1 else fg
        for s, row in enumerate(traj.steps):
            if steps is not None and s not in steps:
                continue
            for b, mass in enumerate(row):
                if mass is None:
                    continue
                m = fg
                if m.shape[0] != mass.shape[0]:  # e.g. CFG as separate calls: the latent batch repeats
                    m = m.repeat(mass.shape[0] // m.shape[0], 1) if mass.shape[0] % m.shape[0] == 0 else m[:1]
                a, f = foreground_preference(mass, m)
                num[b] += a
                den[b] += f
                per_step_num.setdefault(s, [0.0] * nb)[b] += a
                per_step_den.setdefault(s, [0.0] * nb)[b] += f
    pref = [round(num[b] / den[b], 5) if den[b] > 0 else 1.0 for b in range(nb)]
    per_step = [
        [round(per_step_num[s][b] / per_step_den[s][b], 5) if per_step_den[s][b] > 0 else 1.0 for b in range(nb)]
        for s in sorted(per_step_num)
    ]
    fg_blocks, bg_blocks = label_blocks(pref, threshold, background_ratio)
    meta = dict(
        trajectories=len(trajs),
        steps_per_trajectory=[len(t.steps) for t in trajs],
        patch_size=patch_size if isinstance(patch_size, int) else list(patch_size),
        foreground="saliency" if foreground is None else "given",
    )
    return BlockProfile(pref, fg_blocks, bg_blocks, threshold, background_ratio, per_step, meta)
