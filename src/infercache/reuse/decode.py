"""Greedy decoding from a prompt cache (the same loop for every mode, so outputs compare like for like)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

#: ``step(token_id, position, cache) -> logits`` for one new token.
StepFn = Callable[[int, int, object], torch.Tensor]


def cache_from_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A config-free ``DynamicCache`` (full layers) holding ``kv`` (``[1, H, T, D]`` or ``[H, T, D]`` per layer)."""
    layers = [(k if k.dim() == 4 else k[None], v if v.dim() == 4 else v[None]) for k, v in kv]
    return DynamicCache(ddp_cache_data=layers)


def eos_ids(model: torch.nn.Module, tokenizer, eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(x) for x in eos_token_id}


def hf_step(model: torch.nn.Module) -> StepFn:
    """One decode step through the model's own forward."""

    def step(token: int, position: int, cache) -> torch.Tensor:
        device = next(model.parameters()).device
        ids = torch.tensor([[token]], device=device)
        out = model(ids, cache=cache, position_ids=torch.tensor([[position]], device=device), use_cache=True)
        return out.logits[0, -1]

    return step


@torch.no_grad()
def greedy(step: StepFn, cache, first_logits: torch.Tensor, position: int, max_new_tokens: int,
           eos: set[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens (at most ``max_new_tokens``, stopping after an EOS) and the logits that chose each one."""
    tokens: list[int] = []
    logits = [first_logits]
    token = int(first_logits.argmax())
    tokens.append(token)
    while len(tokens) < max_new_tokens and token not in eos:
        next_logits = step(token, position, cache)
        position += 1
        logits.append(next_logits)
        token = int(next_logits.argmax())
        tokens.append(token)
    return tokens, logits
