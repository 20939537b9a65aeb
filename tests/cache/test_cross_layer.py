"""Cross-layer KV sharing (inference) and the random-routing training wrapper."""

import pytest
import torch
from transformers import DynamicCache

from infercache.cache.cross_layer import (
    CrossLayerCache,
    PatternError,
    SharedLayer,
    build_cross_layer_cache,
    resolve_pattern,
    sharing_quality,
)
from infercache.models.weights import stories260k_available
from infercache.training import RoutingCache, StochasticKVRouting

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]
FULL = "full_attention"
SLIDE = "sliding_attention"


def _prompt(n=40, seed=0):
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- patterns


def test_pattern_forms_resolve_to_donors():
    types = [FULL] * 6
    assert resolve_pattern("none", types) == [0, 1, 2, 3, 4, 5]
    assert resolve_pattern("every_other", types) == [0, 0, 2, 2, 4, 4]
    assert resolve_pattern("all", types) == [0] * 6
    assert resolve_pattern({3: 2, 5: 1}, types) == [0, 1, 2, 1, 4, 4]
    assert resolve_pattern([0, 0, 1, 3, 3, 2], types) == [0, 0, 0, 3, 3, 0]  # chains followed to the holder
    gemma = [SLIDE] * 5 + [FULL] + [SLIDE] * 5 + [FULL]
    donors = resolve_pattern("every_other", gemma)
    assert donors[11] == 5 and donors[5] == 5  # full layers share with full layers only
    assert donors[1] == 0 and donors[6] == 4


@pytest.mark.parametrize(
    "pattern, kwargs, match",
    [
        ({1: 0}, {}, "k must be an int >= 1"),
        ({2: -1}, {}, "k must be an int >= 1"),
        ("every_other", {"k": 0}, "k must be an int >= 1"),
        ("every_other", {"k": -2}, "k must be an int >= 1"),
        ([0, 2, 2, 3], {}, "later layer 2"),
        ({1: 2}, {}, "before the first layer"),
        ([0, 1, 2], {}, "3 donors given for 4 layers"),
        ("half", {}, "unknown pattern"),
        ({7: 1}, {}, "not a layer index"),
    ],
)
def test_pattern_validation_errors(pattern, kwargs, match):
    with pytest.raises(PatternError, match=match):
        resolve_pattern(pattern, [FULL] * 4, **kwargs)


def test_pattern_across_layer_types_is_refused(tiny):
    model, _ = tiny("gemma3")  # layers 0-4 sliding, 5 full
    with pytest.raises(PatternError, match="different mask and RoPE"):
        build_cross_layer_cache(model, {5: 1})


# ---------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("arch", ARCHS)
def test_no_sharing_is_bit_identical_and_sharing_generates(tiny, arch):
    model, _ = tiny(arch)
    ids = _prompt()
    ref = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, cache=DynamicCache(config=model.config))
    same = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, cache=build_cross_layer_cache(model, "none"))
    assert torch.equal(ref, same)
    # incremental decoding with a sharing cache equals the teacher-forced sharing forward
    cache = build_cross_layer_cache(model, "all" if arch != "gemma3" else "every_other")
    out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, cache=cache)
    assert cache.get_seq_length() == 40 + 19
    forced = model(out, cache=build_cross_layer_cache(model, cache.donors), use_cache=True).logits[0, 39:-1].argmax(-1)
    assert torch.equal(forced, out[0, 40:])


def test_shared_layer_equals_feeding_the_donors_projections(tiny):
    """Oracle on Llama (no k_norm): replacing layer 1's k/v projections by layer 0's gives the same logits."""
    model, _ = tiny("llama")
    ids = _prompt()
    layers, captured = model.model.layers, {}
    hooks = [
        layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
        layers[0].self_attn.v_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("v", o)),
        layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, o: captured["k"]),
        layers[1].self_attn.v_proj.register_forward_hook(lambda m, i, o: captured["v"]),
    ]
    try:
        oracle = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    got = model(ids, cache=build_cross_layer_cache(model, {1: 1}), use_cache=True).logits
    assert torch.equal(oracle, got)
    assert not torch.equal(got, model(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sharing_layers_hold_zero_bytes(tiny, arch):
    model, _ = tiny(arch)
    cfg = model.config
    ids = _prompt(100)
    full = DynamicCache(config=cfg)
    model(ids, cache=full, use_cache=True)
    cache = build_cross_layer_cache(model, "every_other")
    model(ids, cache=cache, use_cache=True)
    per_layer = cache.layer_nbytes()
    for idx, layer in enumerate(cache.layers):
        if cache.donors[idx] != idx:
            assert isinstance(layer, SharedLayer)
            assert per_layer[idx] == 0
            assert layer.keys is None and layer.values is None
        else:
            assert per_layer[idx] == full.layers[idx].keys.untyped_storage().nbytes() * 2
    assert cache.nbytes() == sum(per_layer)
    assert not cache._returned  # no donor tensor is kept past the forward by the sharing bookkeeping
    if arch == "llama":  # 1 of 3 layers shares
        assert cache.nbytes() == 2 * 100 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4


def test_sharing_quality_reports(tiny):
    model, _ = tiny("llama")
    row = sharing_quality(model, _prompt(64), "every_other")
    assert row["nbytes_shared"] * 3 == row["nbytes_full"] * 2
    assert row["kl"] > 0 and 0 <= row["top1_agreement"] <= 1
    none = sharing_quality(model, _prompt(64), "none")
    assert none["kl"] == 0 and none["ppl_full"] == none["ppl_shared"]


# ------------------------------------------------------------------------------------------- training


def test_routing_is_random_but_deterministic_under_a_seed(tiny):
    model, _ = tiny("llama")
    first = StochasticKVRouting(model, p=0.5, seed=7).sample_route()
    r1, r2, r3 = (StochasticKVRouting(model, p=0.5, seed=s) for s in (7, 7, 8))
    seq1 = [tuple(r1.sample_route()) for _ in range(30)]
    seq2 = [tuple(r2.sample_route()) for _ in range(30)]
    seq3 = [tuple(r3.sample_route()) for _ in range(30)]
    assert seq1 == seq2 and seq1[0] == tuple(first)
    assert seq1 != seq3
    assert len(set(seq1)) > 2  # routes change between forwards
    for route in seq1:
        assert route[0] == 0 and all(d in (i, i - 1) for i, d in enumerate(route))
    shares = sum(d != i for route in seq1 for i, d in enumerate(route)) / (30 * 2)
    assert 0.25 < shares < 0.75
    r1.reseed()
    assert [tuple(r1.sample_route()) for _ in range(30)] == seq1
    assert StochasticKVRouting(model, p=0.0).sample_route() == [0, 1, 2]
    assert StochasticKVRouting(model, p=1.0).sample_route() == [0, 0, 1]
    far = StochasticKVRouting(model, p=1.0, max_distance=None, seed=3)
    assert {tuple(far.sample_route()) for _ in range(40)} == {(0, 0, 0), (0, 0, 1)}


def test_routing_respects_layer_types(tiny):
    model, _ = tiny("gemma3")
    routed = StochasticKVRouting(model, p=1.0, max_distance=None)
    for _ in range(20):
        route = routed.sample_route()
        assert route[5] == 5  # the only full-attention layer has no same-type predecessor
        assert all(route[i] < i for i in range(1, 5))


def test_training_forward_routes_gradients_to_the_donor(tiny):
    model, _ = tiny("llama")
    ids = _prompt(24)
    routed = StochasticKVRouting(model, p=0.5, seed=0).train()
    seen = set()
    try:
        for _ in range(12):
            model.zero_grad(set_to_none=True)
            routed(input_ids=ids, labels=ids).loss.backward()
            route = routed.last_route
            seen.add(tuple(route))
            for idx, layer in enumerate(model.model.layers):
                grad = layer.self_attn.k_proj.weight.grad
                used = idx in route  # some layer attends with this layer's own keys
                assert (grad is not None and bool(grad.abs().sum() > 0)) == used, (route, idx)
            forced = model(ids, cache=RoutingCache(model.config, route), use_cache=True).logits
            shared = model(ids, cache=build_cross_layer_cache(model, route), use_cache=True).logits
            if all(route[d] == d for d in route):  # no chain: inference sharing is the same computation
                assert torch.equal(forced, shared)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    assert len(seen) > 1
    routed.eval()
    assert torch.equal(routed(input_ids=ids).logits, model(input_ids=ids).logits)


def test_routing_options_and_cache_validation(tiny):
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match="p must be"):
        StochasticKVRouting(model, p=1.5)
    with pytest.raises(ValueError, match="max_distance"):
        StochasticKVRouting(model, max_distance=0)
    with pytest.raises(ValueError, match="cannot route to layer 2"):
        RoutingCache(model.config, [0, 2, 2])
    with pytest.raises(ValueError, match="entries"):
        RoutingCache(model.config, [0, 0])


@pytest.mark.slow
@pytest.mark.skipif(not stories260k_available(), reason="the optional shared/models/stories260K folder is absent")
def test_stories260k_sharing_degrades_without_training():
    from infercache.models import load

    model, tok = load("stories260k")
    ids = tok("Once upon a time, there was a little girl named Lily. She loved to play outside with her friends. "
              "One day, she saw a big red ball in the park.", return_tensors="pt").input_ids
    row = sharing_quality(model, ids, "every_other")
    assert row["sharing_fraction"] == pytest.approx(0.4)  # 2 of 5 layers
    assert row["nbytes_shared"] * 5 == row["nbytes_full"] * 3
    assert row["ppl_shared"] > row["ppl_full"] and row["kl"] > 0.05
    assert isinstance(build_cross_layer_cache(model), CrossLayerCache)


def test_works_under_the_infercache_attention_implementation(tiny):
    from infercache.compress import use_infercache_attention

    model, _ = tiny("mistral")
    ids = _prompt()
    ref = model(ids, cache=build_cross_layer_cache(model, "every_other"), use_cache=True).logits
    previous = use_infercache_attention(model)
    try:
        cache = build_cross_layer_cache(model, "every_other")
        assert torch.equal(model(ids, cache=cache, use_cache=True).logits, ref)
        assert [int(t[0, 0]) for t in cache.lengths()] == [40, 0, 40]
    finally:
        model.set_attn_implementation(previous)
