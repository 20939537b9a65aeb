"""KV-Direct: recomputed K/V from input checkpoints give the full cache's output (tiny configs, real models)."""

import pytest
import torch
from transformers import DynamicCache

from infercache.cache.capture import remove_input_capture
from infercache.models.weights import stories260k_available
from infercache.cache.kv_direct import KVDirectCache, KVDirectLayer, build_kv_direct_cache, tensor_nbytes

from decode_steps import logits_steps, prompt_ids

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]


def _prompt(n=40, seed=0, batch=1):
    return prompt_ids(n, seed, batch)


def _logits_steps(model, ids, cache, steps=12):
    return logits_steps(model, ids, cache, steps)


def _generate(model, ids, cache, n=64):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache=cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_64_tokens_identical_to_full_cache(tiny, arch):
    model, _ = tiny(arch)
    ids = _prompt()
    ref = _generate(model, ids, DynamicCache(config=model.config))
    cache = build_kv_direct_cache(model, 16)
    assert torch.equal(_generate(model, ids, cache), ref)
    assert all(n == 40 + 63 - 16 for n in cache.report()["checkpointed_tokens"])  # 63 decode forwards


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("checkpoint", ["attn_input", "residual"])
def test_logits_replay_bit_identical_batched_within_fp32_tolerance(tiny, arch, checkpoint):
    model, _ = tiny(arch)
    ids = _prompt()
    ref = _logits_steps(model, ids, DynamicCache(config=model.config))
    for window in (0, 5):
        replay = _logits_steps(model, ids, build_kv_direct_cache(model, window, checkpoint=checkpoint, recompute="replay"))
        assert torch.equal(replay, ref)
        batched = _logits_steps(model, ids, build_kv_direct_cache(model, window, checkpoint=checkpoint))
        torch.testing.assert_close(batched, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_batched_recompute_of_prompt_tokens_is_bit_exact(tiny, arch):
    """Only prompt tokens (first computed in a many-row forward) are checkpointed: same GEMM, same bits."""
    model, _ = tiny(arch)
    ids = _prompt()
    ref = _logits_steps(model, ids, DynamicCache(config=model.config))
    cache = build_kv_direct_cache(model, 30)  # 12 decode steps stay inside the window
    assert torch.equal(_logits_steps(model, ids, cache), ref)
    assert all(n == 40 + 12 - 30 for n in cache.report()["checkpointed_tokens"])


def test_bf16_replay_bit_identical(tiny):
    model, _ = tiny("qwen3")
    model = model.to(torch.bfloat16)
    try:
        ids = _prompt()
        ref = _logits_steps(model, ids, DynamicCache(config=model.config))
        assert torch.equal(_logits_steps(model, ids, build_kv_direct_cache(model, 4, recompute="replay")), ref)
    finally:
        model.float()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_checkpoint_store_holds_only_old_tokens(tiny, arch):
    model, _ = tiny(arch)
    cfg = model.config
    window, prompt, steps = 16, 100, 10
    cache = build_kv_direct_cache(model, window)
    _logits_steps(model, _prompt(prompt), cache, steps=steps)
    seen = prompt + steps  # prefill, then one token per decode forward
    old = seen - window
    direct = [layer for layer in cache.layers if isinstance(layer, KVDirectLayer)]
    assert direct
    for layer in direct:
        assert layer.checkpoints.shape == (1, old, cfg.hidden_size)
        assert layer.keys.shape[-2] == window and layer.values.shape[-2] == window
        assert layer.window_hidden.shape[1] == window
        # what the layer holds, walking its tensors' storages (a slice would keep a bigger storage alive)
        assert tensor_nbytes([layer.checkpoints]) == old * cfg.hidden_size * 4
        assert tensor_nbytes([layer.keys, layer.values]) == window * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    parts = cache.nbytes_breakdown()
    assert parts["checkpoints"] == len(direct) * old * cfg.hidden_size * 4
    assert parts["window_checkpoints"] == len(direct) * window * cfg.hidden_size * 4
    assert parts["positions"] == seen * 8
    assert cache.nbytes() == sum(parts.values())
    if arch == "gemma3":
        assert parts["sliding_kv"] > 0  # sliding layers keep transformers' bounded layer
    else:
        assert parts["sliding_kv"] == 0


def test_left_padded_batch_and_chunked_prefill_match_full_cache(tiny):
    model, tok = tiny("llama")
    enc = tok(["a longer prompt with more bytes in it", "short"], return_tensors="pt", padding=True)
    ref = model.generate(**enc, max_new_tokens=20, do_sample=False)
    got = model.generate(**enc, max_new_tokens=20, do_sample=False, cache=build_kv_direct_cache(model, 6))
    assert torch.equal(ref, got)
    ids = _prompt(60)
    full = DynamicCache(config=model.config)  # same chunking as the KV-Direct run: same kernels
    model(ids[:, :40], cache=full, use_cache=True)
    ref = model(ids[:, 40:], cache=full, use_cache=True).logits
    cache = build_kv_direct_cache(model, 8, recompute="replay")
    model(ids[:, :40], cache=cache, use_cache=True)
    assert torch.equal(model(ids[:, 40:], cache=cache, use_cache=True).logits, ref)


def test_hooks_are_inert_for_other_caches_and_required_for_ours(tiny):
    model, _ = tiny("llama")
    ids = _prompt()
    ref = model(ids).logits
    cache = build_kv_direct_cache(model, 8)
    assert torch.equal(model(ids, cache=DynamicCache(config=model.config)).logits, ref)
    assert torch.equal(model(ids).logits, ref)
    remove_input_capture(model)
    with pytest.raises(RuntimeError, match="captured input"):
        model(ids, cache=cache, use_cache=True)
    cache = build_kv_direct_cache(model, 8)  # re-installs
    assert torch.equal(model(ids, cache=cache, use_cache=True).logits, ref)


def test_option_errors(tiny):
    model, _ = tiny("llama")
    for bad in (-1, 0.5, True):
        with pytest.raises(ValueError, match="window"):
            build_kv_direct_cache(model, bad)
    with pytest.raises(ValueError, match="checkpoint"):
        KVDirectCache(model, 4, checkpoint="kv")
    with pytest.raises(ValueError, match="recompute"):
        KVDirectCache(model, 4, recompute="lazy")
    assert build_kv_direct_cache(model, budget=3).window == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param("stories260k", marks=pytest.mark.skipif(not stories260k_available(),
                                                         reason="the optional shared/models/stories260K folder is absent")),
    "smollm2-135m",
])
def test_real_models_greedy_64_tokens_identical(name):
    from infercache.models import load

    model, tok = load(name)
    ids = tok("Once upon a time, there was a little girl named Lily. She", return_tensors="pt").input_ids
    ref = _generate(model, ids, DynamicCache(config=model.config))
    cache = build_kv_direct_cache(model, 16)
    assert torch.equal(_generate(model, ids, cache), ref)
    assert min(cache.report()["checkpointed_tokens"]) == ids.shape[1] + 63 - 16


def test_works_under_the_infercache_attention_implementation(tiny):
    """compressed_cache() switches the model to 'infercache' attention; KV-Direct layers fall through to sdpa."""
    from infercache.compress import use_infercache_attention

    model, _ = tiny("qwen3")
    ids = _prompt()
    ref = _generate(model, ids, DynamicCache(config=model.config), n=20)
    previous = use_infercache_attention(model)
    try:
        cache = build_kv_direct_cache(model, 8)
        assert torch.equal(_generate(model, ids, cache, n=20), ref)
        assert all(t.shape == (1, 2) and int(t[0, 0]) == 8 for t in cache.lengths())
    finally:
        model.set_attn_implementation(previous)
