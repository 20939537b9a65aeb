"""``windowkv``: keep whole windows of consecutive tokens, scored per task type, shared within layer groups.

Zuo et al. 2025, "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for Efficient LLM
Inference", https://arxiv.org/abs/2503.17922 (authors' code: optim996/WindowKV).

* The review region (the prompt minus a ``suffix`` window) is cut into consecutive windows of
  ``review_window=8`` tokens. The suffix queries vote for review tokens (softmax attention summed over the
  suffix queries, no pooling). A window's score is, in ``avg`` mode, the mean vote over its tokens and all
  heads; in ``max`` mode, per head the mean of its top ``review_window // 2`` votes, then the mean over heads.
  The lowest-scoring windows are dropped (``ceil((R - budget) / w)`` of them); the suffix is kept on top.
* **The layer budget excludes the suffix** (the authors' convention): a layer keeps ``budget`` review
  tokens plus the suffix.
* Layers are grouped by ``shared_layers=8``; group budgets form an arithmetic sequence from
  ``2B - B*shared_layers//beta`` down to ``B*shared_layers//beta`` (``beta=14``), and only the first layer of
  each group scores: the others reuse its window indices (intra-group index sharing).
* Task-adaptive mode: the authors pick ``max`` (suffix 32) for QA and ``avg`` (suffix 16) for other tasks
  with a BERT classifier whose weights were never released. Our ``mode="auto"`` replaces it with a
  documented heuristic: in each group leader, if the suffix's attention over the review region is peaked
  (the top 2% of review tokens hold more than ``qa_mass=0.3`` of it, as when a question points at facts)
  the mode is ``max``, else ``avg``. Pass ``mode="max"`` or ``mode="avg"`` to fix it.
* One index set per layer, shared by every KV head. Kept windows are stored in chronological order (the
  authors concatenate them by score; attention is order-free since keys carry their positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .base import Policy, ScoreContext, window_attention

SUFFIX = {"max": 32, "avg": 16}


def group_budgets(budget: int, num_layers: int, shared_layers: int, beta: int) -> list[int]:
    """Per-layer review budgets from the authors' group arithmetic (each group's layers share a value)."""
    groups = max(1, math.ceil(num_layers / shared_layers))
    if groups == 1:
        return [budget] * num_layers
    last = budget * shared_layers // beta
    first = 2 * budget - last
    step = (first - last) // (groups - 1)
    per_group = [first - g * step for g in range(groups - 1)] + [last]
    return [per_group[i // shared_layers] for i in range(num_layers)]


@dataclass
class WindowKV(Policy):
    """Whole-window selection with task-adaptive scoring and intra-group index sharing."""

    mode: str = "auto"
    review_window: int = 8
    shared_layers: int = 8
    beta: int = 14
    qa_mass: float = 0.3
    name = "windowkv"
    shared_across_heads = True
    _leader: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.mode not in ("auto", "max", "avg"):
            raise ValueError(f"mode must be 'auto', 'max' or 'avg', got {self.mode!r}")
        self.chosen_mode: dict[int, str] = {}
        self._current = "max" if self.mode != "avg" else "avg"

    @property
    def window(self) -> int:
        """The suffix the engine protects: 32 tokens in ``max`` mode, 16 in ``avg`` (set per group)."""
        return SUFFIX[self._current]

    def _group(self, ctx: ScoreContext) -> int:
        return ctx.layer_rank // self.shared_layers

    def _mode(self, ctx: ScoreContext) -> str:
        group = self._group(ctx)
        if group in self.chosen_mode and ctx.layer_rank % self.shared_layers:
            self._current = self.chosen_mode[group]
            return self._current
        mode = self.mode
        if mode == "auto":
            attn = window_attention(ctx, min(SUFFIX["max"], ctx.queries.shape[2])).mean((1, 2))  # [B, L]
            review = attn[:, : attn.shape[-1] - SUFFIX["max"]]
            top = max(1, int(0.02 * review.shape[-1]))
            share = review.topk(top, dim=-1).values.sum(-1) / review.sum(-1).clamp_min(1e-9)
            mode = "max" if float(share.mean()) > self.qa_mass else "avg"
        self.chosen_mode[group] = mode
        self._current = mode
        return mode

    def suffix(self, ctx: ScoreContext) -> int:
        return min(SUFFIX[self._mode(ctx)], ctx.valid.shape[-1])

    def layer_capacities(self, capacity: torch.Tensor, lengths: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        suffix = self.suffix(ctx)
        caps = []
        for c, n in zip(capacity.tolist(), lengths.tolist()):
            review_budget = group_budgets(int(c), ctx.num_ranked, self.shared_layers, self.beta)[ctx.layer_rank]
            caps.append(min(int(n), review_budget + suffix))
        return torch.tensor(caps, dtype=torch.long)

    def recent_to_protect(self, capacity: int) -> int:
        return 0  # the suffix is handled in score(): the engine's window would use the max-mode length

    def shared_selection(self, ctx: ScoreContext):
        if ctx.layer_rank % self.shared_layers == 0:
            return None
        return self._leader.get(self._group(ctx))

    def remember_selection(self, ctx: ScoreContext, keep: torch.Tensor, counts: torch.Tensor) -> None:
        if ctx.layer_rank % self.shared_layers == 0:
            self._leader[self._group(ctx)] = (keep, counts)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        mode = self._mode(ctx)
        suffix = self.suffix(ctx)
        b, hkv, length = ctx.valid.shape
        votes = window_attention(ctx, suffix)  # [B, H, s, L]
        votes = votes.sum(2)  # [B, H, L]
        review = length - suffix
        w = self.review_window
        n_win = math.ceil(review / w)
        padded = torch.zeros(b, votes.shape[1], n_win * w, device=votes.device)
        padded[..., :review] = votes[..., :review]
        windows = padded.view(b, votes.shape[1], n_win, w)
        if mode == "avg":
            sizes = torch.full((n_win,), float(w), device=votes.device)
            sizes[-1] = review - (n_win - 1) * w
            win_score = (windows.sum(-1) / sizes).mean(1)  # [B, n_win]
        else:
            win_score = windows.topk(max(1, w // 2), dim=-1).values.mean(-1).mean(1)
        token_score = win_score.repeat_interleave(w, dim=-1)[:, :review]
        # whole windows win over partial ones: a window's tokens tie, earlier tokens break ties first
        scores = torch.full((b, length), float("inf"), device=votes.device)
        scores[:, :review] = token_score
        return scores[:, None, :].expand(b, hkv, length).clone()

    def head_capacities(self, scores: torch.Tensor, capacity: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        """Round each layer's review budget to whole windows: drop ``ceil((R - budget) / w)`` windows."""
        suffix = self.suffix(ctx)
        n_valid = ctx.valid.sum(-1)[:, 0].cpu()
        caps = []
        for c, n in zip(capacity.tolist(), n_valid.tolist()):
            review, budget = n - suffix, c - suffix
            if review <= budget:
                caps.append(n)
                continue
            drop = math.ceil((review - budget) / self.review_window)
            kept_windows = max(0, math.ceil(review / self.review_window) - drop)
            kept_tokens = min(review, kept_windows * self.review_window)  # the partial last window may be kept
            caps.append(kept_tokens + suffix)
        return torch.tensor(caps, dtype=torch.long)[:, None].expand(-1, scores.shape[1]).clone()
