"""``retention_gates``: learned retention scores with age decay, one global budget over all layers and heads.

Bui, Nguyen, Cohan, Ying 2026, "Make Each Token Count", https://arxiv.org/abs/2605.09649 (built on TRIM-KV,
https://arxiv.org/abs/2512.03324, code ngocbh/trimkv). A trained gate gives every token, when it is created, a
retention ``beta_i`` per KV head (:mod:`.retention_gate_modules`). At step ``t`` the token at position ``p_i``
scores ``log alpha = (t - p_i) log beta_i`` (``lookahead=1``); with a lookahead ``n`` the geometric retention
``(t + 1 - p_i) log beta + log(1 - beta^n) - log(1 - beta)`` (the retention summed over the next ``n`` steps).

Eviction is global, as in the paper's unified memory budget: the cache keeps the top ``sum of the layer budgets``
entries over every layer and KV head together, so heads and layers end with different lengths (really held:
the ragged store keeps each head's own entries). It runs after prefill and while decoding (every
``compress_every`` steps; the authors' buffer is 128, ours defaults to the engine's 1 so the budget always
holds). ``min_per_head`` (authors' ``floor_budget_ratio``, default 0) is not offered: a head may keep nothing.

Options: ``gates`` (None: the weights saved with the model by ``infercache train-gates``; a path; a
:class:`~.retention_gate_modules.RetentionGateSet`; ``"untrained"``: bias-only gates, i.e. recency eviction, the baseline the paper starts
from), ``lookahead`` (1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Policy, ScoreContext


@dataclass
class RetentionGates(Policy):
    """Learned per-token retention with age decay; one global top-k over all layers and KV heads."""

    gates: object = None
    lookahead: int = 1
    name = "retention_gates"
    decode_mode = "evict"
    global_budget = True
    needs_attention_input = True
    entry_channels = ("log_beta", "position")
    _modules: object = field(default=None, repr=False)

    def __post_init__(self):
        if not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise ValueError(f"lookahead must be an int >= 1, got {self.lookahead!r}")

    def prepare(self, model) -> None:
        from .retention_gate_modules import load_gates_for

        self._modules = load_gates_for(model, self.gates)

    def entry_stats(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        """Per-entry channels of new tokens: ``log_beta`` and ``position``, each ``[B, Hkv, T]`` float32."""
        if self._modules is None:
            raise RuntimeError("retention_gates: the policy was not prepared with a model")
        with torch.no_grad():
            log_beta = self._modules.log_beta(layer_idx, hidden)
        b, hkv, t = log_beta.shape
        pos = positions.to(log_beta.device).float()[:, None, -t:].expand(b, hkv, t)
        return {"log_beta": log_beta, "position": pos.contiguous()}

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        log_beta, pos = ctx.stats["log_beta"], ctx.stats["position"]
        # t = tokens seen + 1 (the step the next query comes at), as in the authors' code
        now = ctx.stats["seen"].to(pos.device).float().view(-1, 1, 1) + 1
        return retention_score(log_beta, now - pos, self.lookahead)


def retention_score(log_beta: torch.Tensor, age: torch.Tensor, lookahead: int = 1) -> torch.Tensor:
    """``age * log beta`` (``lookahead=1``), or the geometric retention over the next ``lookahead`` steps."""
    if lookahead == 1:
        return age * log_beta
    # log(1 - beta^n) - log(1 - beta): finite as beta -> 1 (it tends to log n)
    lb = log_beta.clamp(max=-1e-7)
    return (age + 1) * log_beta + torch.log(-torch.expm1(lookahead * lb)) - torch.log(-torch.expm1(lb))
