"""Cache-Craft attention statistics of a segment, recorded when its KV is computed and stored with it.

For a segment ``C_i`` computed in context (every layer ``l``, attention probabilities averaged over heads):

* ``inter[l][j] = Σ_{k∈C_i} Σ_{m∈C_j} a_km`` for each earlier segment ``C_j`` (Cache-Craft Eq. 3);
* ``intra[l] = Σ_{k,m∈C_i, m≤k} a_km`` (Eq. 4);
* ``token_inter[t]``: the attention mass token ``t`` puts outside its segment, averaged over layers (the score
  Eq. 14 ranks tokens by when picking which to recompute).

They are written into the blob's ``extra`` header together with the earlier segments' keys and lengths (``S_old``),
so :mod:`.cachecraft` can price a reuse without a check layer. Cache-Craft paper: https://arxiv.org/abs/2502.15734.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_DIGITS = 6


@dataclass
class _Target:
    start: int
    end: int
    earlier: list[tuple[int, int]]
    inter: list[list[float]] = field(default_factory=list)
    intra: list[float] = field(default_factory=list)
    token_inter: torch.Tensor | None = None
    layers: int = 0


class SegmentStatsObserver:
    """Attention observer (see :func:`infercache.reuse.attention.hooked_attention`) for segments computed fresh.

    ``targets``: ``{segment index: (start, end)}``; ``bounds``: ``(start, end)`` of every segment in prompt order.
    Only tokens computed at every layer can be observed (fresh segments are).
    """

    def __init__(self, targets: dict[int, tuple[int, int]], bounds: list[tuple[int, int]]) -> None:
        self.targets = {index: _Target(start, end, [b for b in bounds[:index]]) for index, (start, end) in
                        targets.items()}
        self.rows: torch.Tensor | None = None

    def set_rows(self, rows: torch.Tensor) -> None:
        self.rows = rows

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kwargs: dict[str, Any]) -> None:
        rows = self.rows if self.rows is not None else torch.arange(query.shape[2])
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        kv_heads = key.shape[1]
        groups = query.shape[1] // kv_heads
        for target in self.targets.values():
            inside = (rows >= target.start) & (rows < target.end)
            if not bool(inside.any()):
                continue
            local = inside.nonzero().flatten()
            tokens = rows[local].to("cpu")
            n = local.numel()
            # queries grouped by their KV head: [H_kv, groups * n, D] against that head's keys [H_kv, D, end]
            q = query[0][:, local].float().reshape(kv_heads, groups * n, -1)
            scores = torch.bmm(q, key[0, :, : target.end].float().transpose(1, 2)).mul_(scaling)
            hidden = torch.arange(target.start, target.end)[None, :] > tokens[:, None]  # causal, inside the segment
            scores[..., target.start:].masked_fill_(hidden.repeat(groups, 1).to(q.device), float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            heads = kv_heads * groups
            target.inter.append([float(probs[..., s:e].sum()) / heads for s, e in target.earlier])
            target.intra.append(float(probs[..., target.start:].sum()) / heads)
            outside = probs[..., : target.start].sum(-1).reshape(heads, n).mean(0).to("cpu")
            full = torch.zeros(target.end - target.start)
            full[tokens - target.start] = outside
            target.token_inter = full if target.token_inter is None else target.token_inter + full
            target.layers += 1

    def stats(self, index: int) -> dict[str, Any] | None:
        """JSON-ready statistics of target segment ``index`` (``None`` if it was not observed at every layer)."""
        target = self.targets.get(index)
        if target is None or target.layers == 0 or target.token_inter is None:
            return None
        token_inter = (target.token_inter / target.layers).tolist()
        return {
            "layers": target.layers,
            "inter": [[round(x, _DIGITS) for x in row] for row in target.inter],
            "intra": [round(x, _DIGITS) for x in target.intra],
            "token_inter": [round(x, _DIGITS) for x in token_inter],
        }
