"""``expected_attention``: score keys by the attention that *future* queries are expected to pay them.

Devoto, Jeblick, Jégou 2025, "Expected Attention", https://arxiv.org/abs/2510.00636 (reference code: the
authors' kvpress ``ExpectedAttentionPress``). Model the pre-RoPE queries of the prompt (first ``n_sink=4``
excluded) as a Gaussian (mean ``mu``, covariance ``Sigma``), average the RoPE rotation over the next
``n_future_positions=512`` positions (``R``), and score key ``k`` by
``softmax_j(scale * (R mu).k + scale^2/2 * k^T (R Sigma R^T) k)`` averaged over the GQA group, times
``||v||`` (``use_vnorm=True``). Sinks get the top score. Pre-RoPE queries are recovered exactly by
rotating the post-RoPE ones back by their positions, so no per-model hook is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Policy, ScoreContext, reduce_group


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo HF-style RoPE on ``x [B, H, T, D]`` given ``cos, sin [B, T, rot]`` (partial rotary supported)."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos - rotate_half(x_rot) * sin, x_pass], dim=-1)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    """The average RoPE rotation matrix ``[B, D, D]`` over positions given as ``cos, sin [B, T, rot]``."""
    rot = cos.shape[-1]
    c, s = cos.float().mean(1), sin.float().mean(1)  # [B, rot]
    b = c.shape[0]
    eye = torch.eye(rot)
    perm = torch.cat([torch.cat([torch.zeros(rot // 2, rot // 2), -torch.eye(rot // 2)], 1),
                      torch.cat([torch.eye(rot // 2), torch.zeros(rot // 2, rot // 2)], 1)], 0)  # rotate_half as matrix
    r = torch.diag_embed(c) @ eye + torch.diag_embed(s) @ perm  # [B, rot, rot]
    full = torch.eye(dim).repeat(b, 1, 1)
    full[:, :rot, :rot] = r
    return full


@dataclass
class ExpectedAttention(Policy):
    """Expected future attention under a Gaussian model of the queries, times the value norm."""

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    gqa_reduce: str = "mean"
    name = "expected_attention"
    needs_all_queries = True
    _stats: dict = field(default_factory=dict, repr=False)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.rotary is None:
            raise ValueError("expected_attention needs the model's rotary embedding (pass the model to the cache)")
        keys = ctx.keys.float()
        b, hkv, length, d = keys.shape
        if ctx.phase == "prefill":
            q_pos = ctx.query_positions
            cos, sin = ctx.rotary(q_pos)
            q = unrotate(ctx.queries.float(), cos.float(), sin.float())  # [B, H, Lq, D] pre-RoPE
            q = q[:, :, self.n_sink :] if q.shape[2] > self.n_sink + 1 else q
            mu = q.mean(2)  # [B, H, D]
            centred = q - mu[:, :, None]
            sigma = centred.transpose(-1, -2) @ centred / q.shape[2]  # biased, as the authors
            self._stats[ctx.layer_idx] = (mu, sigma)
            start = q_pos[:, -1:] + 1
        else:
            mu, sigma = self._stats[ctx.layer_idx]
            start = ctx.stats["next_position"]
        future = start + torch.arange(self.n_future_positions, device=start.device)[None, :]
        f_cos, f_sin = ctx.rotary(future)
        rbar = mean_rotation(f_cos, f_sin, d)  # [B, D, D]
        mu_r = torch.einsum("bij,bhj->bhi", rbar, mu)
        g = mu.shape[1] // hkv
        k = keys.repeat_interleave(g, dim=1)  # [B, H, L, D] transient
        logits = torch.einsum("bhld,bhd->bhl", k, mu_r) * ctx.scaling
        if self.use_covariance:
            sig_r = rbar[:, None] @ sigma @ rbar[:, None].transpose(-1, -2)
            logits = logits + torch.einsum("bhld,bhde,bhle->bhl", k, sig_r, k) * (ctx.scaling**2) / 2
        valid = ctx.valid.repeat_interleave(g, dim=1)
        probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
        scores = reduce_group(probs, hkv, self.gqa_reduce)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * ctx.values.float().norm(dim=-1)
        rank = torch.cumsum(ctx.valid.long(), dim=-1) - 1
        return scores.masked_fill(ctx.valid & (rank < self.n_sink), float("inf"))
