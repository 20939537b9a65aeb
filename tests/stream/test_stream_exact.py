"""Exactness: a stream that has not evicted is the plain model; re-rotated keys equal keys made at those positions."""

import pytest
import torch
from transformers import DynamicCache

import infercache.stream as stream_api
from infercache.stream.rotary import apply_rope


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3"])
def test_streaming_llm_is_the_plain_model_below_the_window(tiny, make_ids, arch):
    model, tok = tiny(arch)
    ids = make_ids(100)
    question = tok("Q?", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        ref_logits = model(ids[None]).logits[0, -1]
        ref = model.generate(torch.cat([ids[None], question], 1), max_new_tokens=6, do_sample=False)
    before = model.config._attn_implementation
    with stream_api.open(model, tok, "streaming_llm", budget=256, chunk_size=17) as s:
        s.feed(ids=ids[:60])
        s.feed(ids=ids[60:])
        torch.testing.assert_close(s.last_logits, ref_logits, atol=1e-5, rtol=1e-5)
        answer = s.ask("Q?", max_new_tokens=6, template="{question}")
        assert s.held_tokens == 100  # read-only question
    # gemma3's 32-token sliding window is applied by the stream's mask (100 tokens > 32)
    assert answer == tok.decode(ref[0, 100 + question.shape[1]:], skip_special_tokens=True).strip()
    assert model.config._attn_implementation == before  # restored on close


def test_m_rope_stream_is_the_plain_model(qwen2vl, make_ids):
    model, tok = qwen2vl
    t1, t2 = make_ids(5), make_ids(3, 1)
    frame = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([t1, torch.full((24,), 290), t2])[None]
    types = torch.cat([torch.zeros(5), torch.ones(24), torch.zeros(3)]).long()[None]
    pos, _ = model.model.get_rope_index(ids, types, image_grid_thw=torch.tensor([[1, 4, 6]]))
    embeds = model.get_input_embeddings()(ids).detach().clone()
    embeds[0, 5:29] = frame
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, position_ids=pos).logits[0, -1]
    with stream_api.open(model, tok, "streaming_vlm", budget=128) as s:
        s.feed(ids=t1)
        s.feed(embeds=frame, grid=(1, 4, 6))
        s.feed(ids=t2)
        assert torch.equal(s.positions(), pos[:, 0])
        torch.testing.assert_close(s.last_logits, ref, atol=1e-5, rtol=1e-5)


def _layer0_keys_at(model, ids, positions):
    """Post-RoPE first-layer keys of ``ids`` made by the model at ``positions`` (a fresh forward)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[None], position_ids=positions, cache=cache, use_cache=True)
    return cache.layers[0].keys


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rerotated_keys_after_eviction_equal_keys_made_there(tiny, make_ids, arch):
    """First-layer keys depend on the token alone, so after eviction and re-positioning the keys the stream
    attends with must be exactly what the model makes for the kept tokens at positions 0..N-1."""
    model, tok = tiny(arch)
    ids = make_ids(700)
    with stream_api.open(model, tok, "streaming_llm", budget=64) as s:
        s.feed(ids=ids)
        entries = s.cache.entries
        assert torch.equal(entries.pos, torch.arange(64))
        assert entries.index[:4].tolist() == [0, 1, 2, 3]
        layer = s.cache.layers[0]
        cos, sin = s.rotary.cos_sin(entries.pos)
        ours = apply_rope(layer.keys, cos, sin)
        expected = _layer0_keys_at(model, ids[entries.index], torch.arange(64)[None])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_rerotated_m_rope_keys_after_eviction(qwen2vl, make_ids):
    model, tok = qwen2vl
    g = torch.Generator().manual_seed(1)
    with stream_api.open(model, tok, "streaming_vlm", budget=96) as s:
        for i in range(12):
            s.feed(embeds=torch.randn(16, 64, generator=g), grid=(1, 4, 4))
            s.feed(ids=make_ids(5, i))
        entries = s.cache.entries
        assert int(entries.pos.max()) < s.held_tokens <= 96
        cos, sin = s.rotary.cos_sin(entries.pos)
        ours = apply_rope(s.cache.layers[0].keys, cos, sin)
        # the model's own first-layer keys for the pre-RoPE keys we hold, rotated by its attention at those positions
        attn = model.model.language_model.layers[0].self_attn
        pre = s.cache.layers[0].keys
        full_cos, full_sin = model.model.language_model.rotary_emb(pre, entries.pos[:, None])
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

        _, expected = apply_rotary_pos_emb(pre, pre, full_cos, full_sin)
        assert attn.layer_idx == 0
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_question_is_read_only_and_keep_answer_keeps_it(tiny, make_ids):
    model, tok = tiny("llama")
    ids = make_ids(300)
    with stream_api.open(model, tok, "streaming_llm", budget=128) as a, \
            stream_api.open(model, tok, "streaming_llm", budget=128) as b:
        a.feed(ids=ids[:200])
        b.feed(ids=ids[:200])
        a.ask("what?", max_new_tokens=5)
        a.feed(ids=ids[200:])
        b.feed(ids=ids[200:])
        torch.testing.assert_close(a.last_logits, b.last_logits, atol=0, rtol=0)
        held = b.held_tokens
        b.ask("what?", max_new_tokens=5, keep_answer=True)
        assert b.held_tokens <= 128 and b.seen > 300 and held <= 128
        assert torch.equal(b.positions(), torch.arange(b.held_tokens))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("policy,options", [
    ("streaming_llm", {}),
    ("streaming_llm", {"sinks": 0}),
    ("streaming_vlm", {}),  # text-only: sinks + older-text sink + older-text window + recent text (not contiguous)
    ("rekv", {"block_size": 16, "store": "memory://"}),
])
def test_after_eviction_the_stream_is_a_fresh_forward_over_the_kept_tokens(one_layer, make_ids, arch, policy,
                                                                            options):
    """With one layer, keys and values depend on the token alone: after evicting and re-positioning, the stream's
    logits (and greedy answers) must be those of a fresh forward over the kept tokens at positions ``0..N-1``
    (gemma3: a 32-token sliding window, applied by the stream's mask and by transformers' own)."""
    model, tok = one_layer(arch)
    ids = make_ids(1000, seed=3)
    with stream_api.open(model, tok, policy, budget=96, chunk_size=20, **options) as s:
        s.feed(ids=ids)
        kept = s.cache.entries.index.clone()  # the last chunk attended over exactly these (evictions come before)
        logits = s.last_logits.clone()
        answer = None if policy == "rekv" else s.ask("Q?", max_new_tokens=6, template="{question}")
    assert 0 < kept.numel() <= 96 and int(kept[-1]) == 999  # most of the stream was evicted
    assert int(kept[0]) == (904 if options.get("sinks") == 0 else 0)  # sinks kept, re-positioned next to the window
    if policy == "streaming_vlm":
        assert not torch.equal(kept, torch.arange(int(kept[0]), 1000)[-kept.numel():])  # gaps inside
    fresh = ids[kept][None]
    with torch.no_grad():
        ref = model(fresh, position_ids=torch.arange(kept.numel())[None]).logits[0, -1]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    if answer is not None:
        question = tok("Q?", add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(torch.cat([fresh, question], 1), max_new_tokens=6, do_sample=False)
        assert answer == tok.decode(out[0, fresh.shape[1] + question.shape[1]:], skip_special_tokens=True).strip()
