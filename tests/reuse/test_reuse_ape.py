"""APE: the split attention, its exact special cases, and reuse of parallel encodings from the store."""

from __future__ import annotations

import torch

from infercache import reuse
from infercache.reuse.ape import ape_attention
from infercache.reuse.segments import tokenize_segments


class _Module:
    scaling = 0.25


def test_split_attention_with_t_s_one_is_exact_attention() -> None:
    torch.manual_seed(0)
    query = torch.randn(1, 4, 3, 16)
    key, value = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    out, _ = ape_attention((2, 7), 1.0, 1.0)(_Module(), query, key, value, {"scaling": 0.25})
    k, v = key.repeat_interleave(2, 1), value.repeat_interleave(2, 1)
    mask = torch.arange(12)[None, :] <= (9 + torch.arange(3))[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=0.25)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)
    sharper, _ = ape_attention((2, 7), 0.9, 0.9)(_Module(), query, key, value, {"scaling": 0.25})
    assert not torch.allclose(sharper, out, atol=1e-3)


def test_one_context_with_t_s_one_matches_full_prefill(llama, memory_store) -> None:
    """With one context, APE's positions and attention are the sequential ones: exact up to rounding."""
    model, tok = llama
    segments = ["System prompt. ", "The only document, about a fox and a dog. " * 3, "Q: who?"]
    out = reuse.generate(model, tok, segments, store=memory_store, mode="ape", ape_temperature=1.0, ape_scale=1.0,
                         max_new_tokens=8, verify=True)
    assert out.report.verify.greedy_identical and out.report.verify.max_abs_logit_diff < 1e-5


def test_parallel_encodings_are_stored_and_reused(llama, memory_store, rag) -> None:
    model, tok = llama
    cold = reuse.generate(model, tok, rag(), store=memory_store, mode="ape", max_new_tokens=6, verify=True)
    assert cold.report.store_writes == 4 and cold.report.fresh_tokens == cold.report.prompt_tokens
    parts = tokenize_segments(tok, rag())
    assert cold.report.details["query_position"] == len(parts[0].ids) + max(len(p.ids) for p in parts[1:-1])
    warm = reuse.generate(model, tok, rag(), store=memory_store, mode="ape", max_new_tokens=6, verify=True)
    assert warm.report.store_hits == 4 and warm.report.fresh_tokens == len(tok(rag()[-1]).input_ids)
    assert warm.ids == cold.ids, "a stored parallel encoding is exactly what APE computes"
    assert warm.report.verify.kl_first == cold.report.verify.kl_first
    moved = reuse.generate(model, tok, rag((2, 0, 1)), store=memory_store, mode="ape", max_new_tokens=6)
    assert moved.report.store_hits == 4, "contexts are order-independent in APE"
