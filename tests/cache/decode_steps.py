"""Helpers shared by the cache tests: seeded random prompts and step-by-step greedy decoding logits."""

import torch


def prompt_ids(n: int = 40, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Seeded random token ids in the tiny byte vocabulary (no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, n), generator=g)


def logits_steps(model, ids: torch.Tensor, cache, steps: int) -> torch.Tensor:
    """Prefill logits, then ``steps`` greedy decode steps by explicit forwards: ``[steps + 1, B, V]``."""
    out = model(ids, cache=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(nxt, cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits)
