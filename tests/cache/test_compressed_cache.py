"""Invariants of the compressed cache on tiny random-init models (mechanics, not quality)."""

import pytest
import torch
from transformers import DynamicCache

import infercache
from infercache.cache.compressed_cache import CompressedLayer
from infercache.policies import POLICIES

from decode_steps import logits_steps, prompt_ids

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]
EVICTING = {"streaming_llm", "h2o", "tova", "retention_gates"}
# Options a method needs on random-init models (retention gates: no trained gates exist for them).
OPTIONS = {"retention_gates": {"gates": "untrained"}}


def _prompt(n=80, seed=0, batch=1):
    return prompt_ids(n, seed, batch)


def _logits_steps(model, ids, cache, steps=6):
    return logits_steps(model, ids, cache, steps)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(POLICIES))
def test_budget_at_or_above_length_is_bit_identical(tiny, arch, method):
    model, _ = tiny(arch)
    ids = _prompt()
    ref = _logits_steps(model, ids, DynamicCache(config=model.config))
    # Evicting methods keep their budget while decoding, so "above the length" counts the generated tokens.
    budget = 200 if method in EVICTING else 1.0
    got = _logits_steps(model, ids, infercache.compressed_cache(model, method, budget=budget, **OPTIONS.get(method, {})))
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["snapkv", "h2o", "knorm", "expected_attention", "streaming_llm", "tova"])
def test_nbytes_matches_kept_entries(tiny, arch, method):
    model, _ = tiny(arch)
    cfg = model.config
    ids = _prompt(100)
    cache = infercache.compressed_cache(model, method, budget=30, page_size=8)
    model(ids, cache=cache, use_cache=True)
    expected = 0
    for idx, layer in enumerate(cache.layers):
        if isinstance(layer, CompressedLayer):
            lengths = layer.lengths()
            skipped = idx in cache.policy.skip_layers
            assert torch.all(lengths == (100 if skipped else 30)), (idx, lengths)
            pages = (lengths + 7) // 8
            expected += int(pages.sum()) * 8 * cfg.head_dim * 2 * 4
        else:  # sliding-window layer: transformers' bounded layer, untouched
            expected += layer.keys.numel() * 4 * 2
    assert cache.nbytes() == expected
    walked = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in ((layer.store.pools["k"], layer.store.pools["v"]) if isinstance(layer, CompressedLayer) else (layer.keys, layer.values))
    )
    assert walked == cache.nbytes()


def test_per_head_lengths_really_differ_and_save_memory(tiny):
    model, _ = tiny("llama")
    ids = _prompt(120, seed=3)
    cache = infercache.compressed_cache(model, "adakv", budget=40, window=8, page_size=1)
    model(ids, cache=cache, use_cache=True)
    lengths = [t for t in cache.lengths() if t is not None]
    assert any(len(set(t.flatten().tolist())) > 1 for t in lengths), lengths
    kept = sum(int(t.sum()) for t in lengths)
    assert cache.nbytes() == kept * model.config.head_dim * 2 * 4  # page 1: no slack at all
    full = DynamicCache(config=model.config)
    model(ids, cache=full, use_cache=True)
    full_bytes = sum(layer.keys.numel() * 4 * 2 for layer in full.layers)
    assert cache.nbytes() < 0.4 * full_bytes


@pytest.mark.parametrize("method", ["pyramidkv", "adakv"])
def test_ragged_cache_survives_multi_token_forward(tiny, method):
    """The kvpress failure: after per-layer/per-head compression, a multi-token forward must work and agree
    with feeding the same tokens one by one."""
    model, _ = tiny("llama")
    ids = _prompt(120, seed=5)
    question = _prompt(9, seed=6)
    chunked = infercache.compressed_cache(model, method, budget=40, window=8)
    model(ids, cache=chunked, use_cache=True)
    layer_lengths = {tuple(t.flatten().tolist()) for t in chunked.lengths() if t is not None}
    assert len(layer_lengths) > 1 or method == "adakv"
    out_chunk = model(question, cache=chunked, use_cache=True).logits
    stepwise = infercache.compressed_cache(model, method, budget=40, window=8)
    model(ids, cache=stepwise, use_cache=True)
    rows = [model(question[:, i : i + 1], cache=stepwise, use_cache=True).logits for i in range(question.shape[1])]
    torch.testing.assert_close(out_chunk, torch.cat(rows, 1), rtol=1e-4, atol=1e-5)


def test_ragged_attention_matches_naive_per_head_attention():
    from infercache.cache.attention import ragged_attention

    g = torch.Generator().manual_seed(0)
    b, hkv, grp, q, d = 2, 2, 3, 4, 8
    old = torch.tensor([[5, 9], [1, 12]])
    length = int((old + q).max())
    query = torch.randn(b, hkv * grp, q, d, generator=g)
    key = torch.randn(b, hkv, length, d, generator=g)
    value = torch.randn(b, hkv, length, d, generator=g)
    module = torch.nn.Module()
    module.num_key_value_groups = grp
    out, _ = ragged_attention(module, query, key, value, old, 0.0, d**-0.5)
    for i in range(b):
        for h in range(hkv * grp):
            kv = h // grp
            for t in range(q):
                n = int(old[i, kv]) + t + 1
                w = torch.softmax(query[i, h, t] @ key[i, kv, :n].T * d**-0.5, -1)
                torch.testing.assert_close(out[i, t, h], w @ value[i, kv, :n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,opts", [("h2o", {}), ("streaming_llm", {}), ("tova", {}), ("snapkv", {"decode_budget": 48})])
def test_decode_budget_stays_bounded(tiny, method, opts):
    model, _ = tiny("llama")
    ids = _prompt(60)
    cache = infercache.compressed_cache(model, method, budget=40 if not opts else 0.5, **opts)
    out = model.generate(ids, max_new_tokens=500, min_new_tokens=500, do_sample=False, cache=cache)
    assert out.shape[1] == 560
    bound = opts.get("decode_budget", 40)
    every = cache.engine.compress_every
    for t in cache.lengths():
        assert int(t.max()) <= bound + every - 1
    assert cache.get_seq_length() == 559  # tokens seen, not kept: positions continue correctly


@pytest.mark.parametrize("method", ["snapkv", "h2o", "adakv", "streaming_llm"])
def test_batched_equals_one_by_one(tiny, method):
    model, tok = tiny("llama")
    prompts = [_prompt(70, seed=1)[0], _prompt(95, seed=2)[0]]
    singles = []
    for p in prompts:
        cache = infercache.compressed_cache(model, method, budget=0.4)
        singles.append(model.generate(p[None], max_new_tokens=12, do_sample=False, cache=cache)[0, len(p) :])
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    cache = infercache.compressed_cache(model, method, budget=0.4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache=cache)
    for i in range(2):
        assert torch.equal(out[i, width:], singles[i])
    lengths = [t for t in cache.lengths() if t is not None][0]
    assert lengths[0, 0] != lengths[1, 0]  # per-sequence budgets on real tokens only (padding dropped)


def test_compress_context_manager_restores_model(tiny):
    model, _ = tiny("qwen2")
    ids = _prompt(50)
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    before = model.config._attn_implementation
    with infercache.compress(model, "snapkv", budget=20) as handle:
        model.generate(ids, max_new_tokens=5, do_sample=False)
    assert handle.last_cache is not None and handle.last_cache.nbytes() > 0
    assert all(int(t.max()) <= 20 + 5 for t in handle.last_cache.lengths() if t is not None)
    assert model.config._attn_implementation == before
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), ref)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 0}, "budget must be >= 1"),
        ({"budget": -3}, "budget must be >= 1"),
        ({"budget": 0.0}, r"\(0, 1\]"),
        ({"budget": 1.5}, r"\(0, 1\]"),
        ({"budget": True}, "ratio in"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"method": "snapkv", "pooling": "median"}, None),
        ({"method": "snapkv", "bogus": 1}, "bad option"),
    ],
)
def test_bad_input_gives_clear_errors(tiny, kwargs, match):
    model, _ = tiny("llama")
    args = {"method": "snapkv", "budget": 0.5, **kwargs}
    if match is None:  # invalid pooling is caught when scoring
        cache = infercache.compressed_cache(model, args.pop("method"), **args)
        with pytest.raises(ValueError, match="pooling"):
            model(_prompt(80), cache=cache, use_cache=True)
        return
    with pytest.raises(ValueError, match=match):
        infercache.compressed_cache(model, args.pop("method"), **args)


def test_unsupported_architecture_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50))
    with pytest.raises(infercache.UnsupportedModelError, match="encoder-decoder"):
        infercache.compressed_cache(model, "snapkv", budget=0.5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_protocols_at_full_budget_match_plain_generate(tiny, arch):
    model, _ = tiny(arch)
    context, question = _prompt(90, seed=7), _prompt(12, seed=8)
    ref = model.generate(torch.cat([context, question], -1), max_new_tokens=10, do_sample=False)
    for protocol in infercache.PROTOCOLS:
        out, cache = infercache.generate(model, context, question, method="snapkv", budget=1.0,
                                         protocol=protocol, max_new_tokens=10)
        assert torch.equal(out, ref), protocol
        assert cache.get_seq_length() == 90 + 12 + 9


def test_question_agnostic_compresses_before_the_question(tiny):
    model, _ = tiny("llama")
    context, question = _prompt(100, seed=7), _prompt(10, seed=8)
    _, agnostic = infercache.generate(model, context, question, method="snapkv", budget=40, window=8,
                                      protocol="question_agnostic", max_new_tokens=3)
    _, aware = infercache.generate(model, context, question, method="snapkv", budget=40, window=8,
                                   protocol="question_aware", max_new_tokens=3)
    # agnostic: 40 kept from the context, then the 10 question tokens and 2 fed-back tokens appended
    assert all(int(t.max()) == 40 + 10 + 2 for t in agnostic.lengths() if t is not None)
    assert all(int(t.max()) == 40 + 2 for t in aware.lengths() if t is not None)
    with pytest.raises(ValueError, match="protocol"):
        infercache.generate(model, context, question, protocol="oracle")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["snapkv", "h2o", "adakv", "expected_attention"])
def test_half_precision_storage_and_identity(method, dtype):
    from infercache.models import load

    model, _ = load("tiny-random-llama", dtype=dtype)
    ids = _prompt(64)
    budget = 200 if method in EVICTING else 1.0
    ref = _logits_steps(model, ids, DynamicCache(config=model.config), steps=3)
    got = _logits_steps(model, ids, infercache.compressed_cache(model, method, budget=budget), steps=3)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    cache = infercache.compressed_cache(model, method, budget=24, page_size=8)
    model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
    layer = cache.layers[0]
    assert layer.store.pools["k"].dtype == dtype
    kept = sum(int(((t + 7) // 8).sum()) * 8 for t in cache.lengths())
    assert cache.nbytes() == kept * model.config.head_dim * 2 * 2


@pytest.mark.parametrize("method,budget,opts", [("kv_direct", 16, {}), ("cross_layer", 0.5, {"pattern": "every_other"})])
def test_cache_modes_are_reachable_through_the_public_api(tiny, method, budget, opts):
    model, _ = tiny("llama")
    assert method in infercache.methods()
    cache = infercache.compressed_cache(model, method, budget=budget, **opts)
    out = model.generate(_prompt(40), max_new_tokens=5, do_sample=False, cache=cache)
    assert out.shape[1] == 45 and cache.nbytes() > 0
    if method == "kv_direct":
        ref = model.generate(_prompt(40), max_new_tokens=5, do_sample=False)
        assert torch.equal(out, ref)  # exact: recomputed K/V


def test_kv_direct_rejects_a_ratio_budget(tiny):
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match="window"):
        infercache.compressed_cache(model, "kv_direct", budget=0.5)
