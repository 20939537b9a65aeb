"""``verify=True``: run the full prefill too and measure how far a reuse mode's next-token distributions are from it."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .decode import greedy, hf_step
from .report import VerifyReport


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(softmax(reference) || softmax(other)) in nats, computed in float64."""
    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(other.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0.0))


@torch.no_grad()
def full_prefill(model: torch.nn.Module, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache, float]:
    """One-shot prefill of the whole prompt with a standard ``DynamicCache``: last logits, cache, seconds."""
    start = time.perf_counter()
    cache = DynamicCache(config=model.config)
    logits = model(prompt_ids[None], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    return logits, cache, time.perf_counter() - start


@torch.no_grad()
def verify_against_full(model: torch.nn.Module, prompt_ids: torch.Tensor, tokens: Sequence[int],
                        step_logits: Sequence[torch.Tensor], *, max_new_tokens: int, eos: set[int]) -> VerifyReport:
    """Compare a mode's generated ``tokens`` and the ``step_logits`` that chose them with a full prefill."""
    logits, cache, seconds = full_prefill(model, prompt_ids)
    reference = [logits]
    if len(tokens) > 1:  # teacher-forced on the mode's tokens: what the full model predicts after the same history
        forced = copy.deepcopy(cache)
        ids = torch.tensor([list(tokens[:-1])], device=prompt_ids.device)
        reference += list(model(ids, cache=forced, use_cache=True).logits[0])
    full_ids, _ = greedy(hf_step(model), cache, logits, prompt_ids.numel(), max_new_tokens, eos)
    kls = [kl_divergence(ref, mine) for ref, mine in zip(reference, step_logits)]
    top1 = [int(ref.argmax()) == int(mine.argmax()) for ref, mine in zip(reference, step_logits)]
    compared = min(len(full_ids), len(tokens))
    same = [full_ids[i] == tokens[i] for i in range(compared)]
    divergence = next((i for i, ok in enumerate(same) if not ok), None)
    if divergence is None and len(full_ids) != len(tokens):
        divergence = compared
    return VerifyReport(
        kl_first=kls[0], top1_first=top1[0], kl_mean=sum(kls) / len(kls), top1_agreement=sum(top1) / len(top1),
        greedy_match=sum(same) / max(len(full_ids), len(tokens), 1), greedy_identical=divergence is None,
        first_divergence=divergence, max_abs_logit_diff=float((logits - step_logits[0]).abs().max()),
        full_ttft_s=seconds, full_ids=list(full_ids))
