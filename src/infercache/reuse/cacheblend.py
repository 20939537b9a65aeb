"""``mode="cacheblend"``: chunk reuse + selective recompute of the high-KV-deviation tokens (CacheBlend).

Paper: Yao et al., *CacheBlend: Fast Large Language Model Serving for RAG with Cached Knowledge Fusion*, EuroSys 2025,
https://arxiv.org/abs/2405.16444; code: YaoJiayi/CacheBlend (vLLM fork) and LMCache ``v1/compute/blend``.

What we do (LMCache's single-check-layer version of the released code):

1. Stored segment KV is re-rotated to its new positions (:mod:`.rope`); tokens without stored KV are fresh.
2. Every token runs through the layers ``0 .. check_layer`` (default ``1``, the authors' ``check_layers=[1]``).
3. At the check layer the fresh K/V of every reused token is compared with its stored K/V:
   ``dev_t = Σ_{heads, dims} (V_fresh[t] - V_stored[t])²`` (``deviation="value"``, the original code; LMCache uses
   keys: ``deviation="key"``). The ``int(n_reused · recompute_ratio)`` tokens with the largest deviation are kept
   (``recompute_ratio`` default ``0.15``; the original code uses 0.16, LMCache's examples 0.15), plus every fresh
   token (the question always is).
4. From the check layer on only the kept tokens are computed; their fresh K/V is written into the stored KV
   (at the check layer too, for the kept tokens only), and their queries attend to the whole blended KV.

``recompute_ratio=1.0`` recomputes everything and equals a full prefill exactly (same kernels, same masks);
``recompute_ratio=0.0`` equals pure chunk reuse up to float rounding (layer-0 KV depends only on the token and its
position, so recomputing it changes only rounding).

Approximations vs the paper: one check layer instead of gradual filtering over layers; no loading controller that
picks the ratio from storage bandwidth (the ratio is fixed); layers before the check layer are recomputed for all
tokens (as in both codebases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .runner import Selector

#: Authors' defaults (LMCache examples; the original code uses 0.16).
DEFAULT_RECOMPUTE_RATIO = 0.15
DEFAULT_CHECK_LAYER = 1


@dataclass
class BlendSelection:
    """Filled in by the selector: which reused tokens were picked at the check layer, and their deviations."""

    picked: torch.Tensor | None = None
    deviation: torch.Tensor | None = None


def blend_selector(have_stored: torch.Tensor, ratio: float, deviation: str = "value",
                   record: BlendSelection | None = None) -> Selector:
    """The check-layer selector: keep fresh tokens plus the top ``ratio`` of reused tokens by KV deviation."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"recompute_ratio must be in [0, 1], got {ratio!r}")
    if deviation not in ("value", "key"):
        raise ValueError(f"deviation must be 'value' (CacheBlend's code) or 'key' (LMCache), got {deviation!r}")

    def select(layer: int, rows: torch.Tensor, fresh_k: torch.Tensor, fresh_v: torch.Tensor, stored_k: torch.Tensor,
               stored_v: torch.Tensor) -> torch.Tensor:
        mask = have_stored.to(rows.device)[rows]
        reused_local = mask.nonzero().flatten()
        fresh_rows = rows[~mask]
        count = int(reused_local.numel() * ratio)
        if count == 0:
            if record is not None:
                record.picked = rows[:0]
            return fresh_rows
        reused_rows = rows[reused_local]
        new = fresh_v if deviation == "value" else fresh_k
        old = stored_v if deviation == "value" else stored_k
        diff = (new[0][:, reused_local].float() - old[0][:, reused_rows].float()).pow(2).sum(dim=(0, 2))
        picked = reused_rows[diff.topk(count).indices]
        if record is not None:
            record.picked, record.deviation = picked.sort().values, diff
        return torch.cat([fresh_rows, picked]).sort().values

    return select
