"""Chunk reuse, CacheBlend and Cache-Craft on tiny models (mechanics and exactness limits)."""

from __future__ import annotations

import pytest
import torch

from infercache import reuse
from infercache.reuse import Segment, namespace_for
from infercache.reuse.attention import hooked_attention
from infercache.reuse.attnstats import SegmentStatsObserver
from infercache.reuse.cachecraft import fix_plan, order_penalty, pick_tokens
from infercache.reuse.chunk import chunk_prompt
from infercache.reuse.rope import rope_info
from infercache.reuse.segments import tokenize_segments
from infercache.store import KVStore


def test_segments_hit_at_new_offsets(llama, memory_store, rag) -> None:
    model, tok = llama
    cold = reuse.generate(model, tok, rag(), store=memory_store, mode="chunk", max_new_tokens=4)
    assert (cold.report.store_hits, cold.report.store_misses, cold.report.store_writes) == (0, 4, 4)
    out = reuse.generate(model, tok, rag((2, 0, 1), "Q: which box?\nA:"), store=memory_store, mode="chunk",
                         max_new_tokens=6, verify=True)
    rep = out.report
    question = len(tok("Q: which box?\nA:").input_ids)
    assert (rep.store_hits, rep.store_misses, rep.store_writes) == (4, 0, 0)
    assert (rep.fresh_tokens, rep.recomputed_tokens) == (question, 0)
    assert rep.reused_tokens == rep.prompt_tokens - question
    assert rep.layer_rows == [question] * model.config.num_hidden_layers
    assert 0 < rep.verify.kl_first < 0.1 and rep.verify.full_ttft_s > 0


def test_same_context_reuse_matches_full_prefill(llama, memory_store, rag) -> None:
    """A segment reused after the same segments at the same offset is exact up to float rounding."""
    model, tok = llama
    reuse.generate(model, tok, rag(), store=memory_store, mode="chunk", max_new_tokens=1)
    out = reuse.generate(model, tok, rag(question="Q: new?"), store=memory_store, mode="chunk", max_new_tokens=8,
                         verify=True)
    assert out.report.store_hits == 4 and out.report.verify.greedy_identical
    assert out.report.verify.max_abs_logit_diff < 1e-5


def test_segment_flags_and_last_token(llama, memory_store) -> None:
    model, tok = llama
    segments = [Segment("A fixed preamble. "), Segment("Not cached. ", cache=False), Segment("tail", cache=True)]
    reuse.generate(model, tok, segments, store=memory_store, mode="chunk", max_new_tokens=1)
    out = reuse.generate(model, tok, segments, store=memory_store, mode="chunk", max_new_tokens=3, verify=True)
    assert (out.report.store_hits, out.report.store_misses) == (2, 0)
    assert out.report.fresh_tokens == len(tok("Not cached. ").input_ids) + 1, "the last token is always computed"
    assert out.report.verify.greedy_identical


def _state(model, tok, store_tier, segments, **kwargs):
    parts = tokenize_segments(tok, segments)
    return chunk_prompt(model, parts, KVStore(store_tier, namespace_for(model, tok)), rope_info(model), **kwargs)


def test_cacheblend_ratio_one_is_full_prefill_and_zero_is_chunk_reuse(llama, memory_store, rag) -> None:
    model, tok = llama
    reuse.generate(model, tok, rag(), store=memory_store, mode="chunk", max_new_tokens=1)
    moved = rag((1, 2, 0))
    everything = reuse.generate(model, tok, moved, store=memory_store, mode="cacheblend", recompute_ratio=1.0,
                                max_new_tokens=8, verify=True)
    rep = everything.report
    assert rep.verify.max_abs_logit_diff == 0.0 and rep.verify.greedy_identical and rep.verify.kl_first == 0.0
    assert rep.reused_tokens == 0 and rep.recomputed_tokens == rep.prompt_tokens - rep.fresh_tokens
    chunk = _state(model, tok, memory_store, moved, mode="chunk")
    blend0 = _state(model, tok, memory_store, moved, mode="cacheblend", recompute_ratio=0.0)
    assert blend0.recomputed == 0 and blend0.layer_rows[2:] == chunk.layer_rows[2:]
    assert torch.allclose(blend0.logits, chunk.logits, rtol=0, atol=1e-5)  # layer-0 KV only differs by rounding
    assert not torch.allclose(blend0.logits, everything_logits(model, moved, tok), atol=1e-4)


def everything_logits(model, segments, tok):
    ids = torch.tensor([t for p in tokenize_segments(tok, segments) for t in p.ids])
    with torch.no_grad():
        return model(ids[None]).logits[0, -1]


def test_cacheblend_selects_the_configured_share(llama, memory_store, rag) -> None:
    model, tok = llama
    reuse.generate(model, tok, rag(), store=memory_store, mode="chunk", max_new_tokens=1)
    state = _state(model, tok, memory_store, rag((2, 1, 0)), mode="cacheblend", recompute_ratio=0.15, check_layer=1)
    loaded = state.reused + state.recomputed
    assert state.recomputed == int(loaded * 0.15)
    layers = model.config.num_hidden_layers
    assert state.layer_rows[:2] == [state.reused + state.recomputed + state.fresh] * 2
    assert state.layer_rows[2:] == [state.recomputed + state.fresh] * (layers - 2)
    with pytest.raises(ValueError, match="recompute_ratio"):
        _state(model, tok, memory_store, rag((2, 1, 0)), mode="cacheblend", recompute_ratio=1.5)


def test_cachecraft_rule() -> None:
    assert order_penalty(["a", "b", "c"], ["a", "b", "c"]) == 0.0
    assert order_penalty(["a", "b", "c"], ["c", "b", "a"]) == 1.0
    assert order_penalty(["a", "b", "c"], ["b", "a", "x", "c"]) == pytest.approx(1 / 3)
    stats = {"inter": [[30.0, 10.0], [20.0, 20.0]], "intra": [60.0, 60.0], "token_inter": [0.1, 0.9, 0.5, 0.2]}
    same = fix_plan(stats, ["a", "b"], [10, 10], ["a", "b"], 100, alpha=0.3)
    assert (same.beta, same.gamma, same.cfo, same.recompute) == (1.0, 0.0, 0.0, 0)
    dropped = fix_plan(stats, ["a", "b"], [10, 10], ["a"], 100, alpha=0.3)
    assert dropped.beta == pytest.approx(50 / 80)
    a, b = (40 / 1000 + 40 / 1000) / 2, 60 / 100**2
    assert dropped.cci == pytest.approx(1 / (1 + torch.exp(torch.tensor(-a / b)).item()))
    assert dropped.cfo == pytest.approx(0.3 * dropped.cci * (1 - 50 / 80))
    assert dropped.recompute == -(-int(dropped.cfo * 100 * 1e6) // 1_000_000)
    swapped = fix_plan(stats, ["a", "b"], [10, 10], ["b", "a"], 100, alpha=0.3)
    assert (swapped.beta, swapped.gamma, swapped.beta_adjusted) == (1.0, 1.0, 0.0)
    assert pick_tokens(stats, 2, 4).tolist() == [1, 2]


def test_attention_stats_match_eager_attention_weights(tiny) -> None:
    model, tok = tiny("qwen2")
    ids = torch.arange(3, 43)
    bounds = [(0, 10), (10, 25), (25, 40)]
    observer = SegmentStatsObserver({1: bounds[1], 2: bounds[2]}, bounds)
    from infercache.reuse.runner import run_prompt

    with hooked_attention(model, observe=observer):
        run_prompt(model, ids, stored=None, rows=torch.arange(40), on_rows=observer.set_rows)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            weights = model(ids[None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    stats = observer.stats(2)
    for layer, probs in enumerate(weights):
        mean = probs[0].mean(0)[25:40]  # [tokens of segment 2, keys]
        assert stats["inter"][layer] == pytest.approx([float(mean[:, 0:10].sum()), float(mean[:, 10:25].sum())],
                                                      abs=1e-4)
        assert stats["intra"][layer] == pytest.approx(float(mean[:, 25:40].sum()), abs=1e-4)
    expected = torch.stack([p[0].mean(0)[25:40, :25].sum(-1) for p in weights]).mean(0)
    assert stats["token_inter"] == pytest.approx(expected.tolist(), abs=1e-4)


def test_cachecraft_recomputes_only_when_the_context_changed(llama, memory_store, rag) -> None:
    model, tok = llama
    cold = reuse.generate(model, tok, rag(), store=memory_store, mode="cachecraft", max_new_tokens=1)
    assert cold.report.store_writes == 4
    same = reuse.generate(model, tok, rag(question="Q: new?"), store=memory_store, mode="cachecraft",
                          max_new_tokens=4, verify=True)
    assert same.report.recomputed_tokens == 0 and same.report.verify.max_abs_logit_diff < 1e-5
    moved = reuse.generate(model, tok, rag((2, 1, 0)), store=memory_store, mode="cachecraft", max_new_tokens=4,
                           verify=True)
    plans = moved.report.details["segments"]
    assert plans[0]["cfo"] == 0.0, "the system prompt keeps its (empty) prefix"
    assert moved.report.recomputed_tokens == sum(p["recompute"] for p in plans) > 0
    assert all(0.0 <= p["cfo"] <= 0.3 for p in plans)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "phi3"])
def test_chunk_modes_run_on_other_architectures(tiny, memory_store, rag, arch) -> None:
    model, tok = tiny(arch)
    reuse.generate(model, tok, rag(), store=memory_store, mode="chunk", max_new_tokens=1)
    for mode in ("chunk", "cacheblend"):
        out = reuse.generate(model, tok, rag((1, 0, 2)), store=memory_store, mode=mode, max_new_tokens=3,
                             verify=True)
        assert out.report.store_hits == 4 and out.report.verify.kl_first < 0.1
    full = reuse.generate(model, tok, rag((1, 0, 2)), store=memory_store, mode="cacheblend", recompute_ratio=1.0,
                          max_new_tokens=3, verify=True)
    assert full.report.verify.max_abs_logit_diff == 0.0


def test_eager_attention_is_supported(memory_store, rag) -> None:
    from infercache.models import load

    model, tok = load("tiny-random-llama", attn_implementation="eager")
    reuse.generate(model, tok, rag(), store=memory_store, mode="chunk", max_new_tokens=1)
    out = reuse.generate(model, tok, rag((1, 0, 2)), store=memory_store, mode="cacheblend", recompute_ratio=1.0,
                         max_new_tokens=3, verify=True)
    assert out.report.verify.max_abs_logit_diff < 1e-5 and out.report.verify.greedy_identical


def test_corrupt_segment_blob_is_recomputed(llama, memory_store, rag) -> None:
    model, tok = llama
    reuse.generate(model, tok, rag(), store=memory_store, mode="chunk", max_new_tokens=1)
    from infercache.store import segment_keys

    parts = tokenize_segments(tok, rag(), separate_bos=True)
    key = segment_keys([p.ids for p in parts], namespace_for(model, tok))[2].key
    blob = bytearray(memory_store.get(key))
    blob[-3] ^= 0x01
    memory_store.put(key, bytes(blob))
    out = reuse.generate(model, tok, rag(question="Q: new?"), store=memory_store, mode="chunk", max_new_tokens=6,
                         verify=True)
    rep = out.report
    assert (rep.corrupt, rep.store_hits, rep.store_misses, rep.store_writes) == (1, 3, 1, 1)
    assert rep.fresh_tokens == len(parts[2].ids) + len(tok("Q: new?").input_ids)
    assert rep.verify.greedy_identical and rep.verify.max_abs_logit_diff < 1e-5
