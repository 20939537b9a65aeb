"""RazorAttention, WindowKV, DapQ and Elastic Cache on hand-built patterns and tiny models."""

import math

import pytest
import torch
from transformers import DynamicCache

import infercache
from infercache.cache.attention import ragged_attention
from infercache.policies.dapq import rerotate
from infercache.policies.expected_attention import unrotate
from infercache.policies.razor_heads import profile_heads
from infercache.policies.windowkv import group_budgets


def _ids(n, seed=0):
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def _dense_keys(model, ids):
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache, use_cache=True)
    return cache


# ---------------------------------------------------------------- RazorAttention
def test_razor_keeps_retrieval_heads_whole_and_compensates_the_rest(tiny):
    model, _ = tiny("llama")
    ids = _ids(100)
    profile = {"retrieval_heads": [[0, 1], [2, 0]]}
    cache = infercache.compressed_cache(model, "razor", budget=20, heads=profile, page_size=1)
    model(ids, cache=cache, use_cache=True)
    dense = _dense_keys(model, ids)
    for layer_idx, lengths in enumerate(cache.lengths()):
        for head in range(2):
            expected = 100 if [layer_idx, head] in profile["retrieval_heads"] else 4 + 1 + 20
            assert int(lengths[0, head]) == expected
    store = cache.layers[1].store
    chans, _ = store.gather()
    full_k = dense.layers[1].keys[0, 0]
    torch.testing.assert_close(chans["k"][0, 0, 4], full_k[4:80].mean(0))  # the compensation token
    assert chans["bias"][0, 0, 4] == pytest.approx(math.log(76))
    torch.testing.assert_close(chans["k"][0, 0, 5:], full_k[80:])  # the recent window
    assert chans["bias"][0, 1, 4] == pytest.approx(math.log(76))  # layer 1 head 1: compressed too
    retrieval, _ = cache.layers[0].store.gather()
    assert float(retrieval["bias"][0, 1].abs().sum()) == 0.0  # layer 0 head 1 is a retrieval head: untouched
    torch.testing.assert_close(retrieval["k"][0, 1], dense.layers[0].keys[0, 1])


def test_compensation_bias_equals_repeating_the_token():
    g = torch.Generator().manual_seed(0)
    d, n_rep = 8, 7
    query = torch.randn(1, 2, 1, d, generator=g)
    keys = torch.randn(1, 1, 5, d, generator=g)
    values = torch.randn(1, 1, 5, d, generator=g)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    bias = torch.zeros(1, 1, 5)
    bias[0, 0, 1] = math.log(n_rep)
    out, _ = ragged_attention(module, query, keys, values, torch.tensor([[4]]), 0.0, d**-0.5, bias=bias)
    rep_k = torch.cat([keys[:, :, :1], keys[:, :, 1:2].repeat(1, 1, n_rep, 1), keys[:, :, 2:]], 2)
    rep_v = torch.cat([values[:, :, :1], values[:, :, 1:2].repeat(1, 1, n_rep, 1), values[:, :, 2:]], 2)
    ref = torch.nn.functional.scaled_dot_product_attention(query, rep_k, rep_v, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_head_profile_finds_induction_heads_in_a_planted_model(tiny):
    model, _ = tiny("llama")
    profile = profile_heads(model, segment=32, repeats=3, progress=False)
    n_heads = len(profile["layers"]) * profile["num_kv_heads"]
    assert len(profile["retrieval_heads"]) == math.ceil(0.14 * n_heads) or len(profile["retrieval_heads"]) == math.ceil(0.14 * n_heads) + 1
    ind = torch.tensor(profile["induction"])
    chosen = {tuple(x) for x in profile["retrieval_heads"]}
    best = divmod(int(ind.argmax()), profile["num_kv_heads"])
    assert (profile["layers"][best[0]], best[1]) in chosen


# ---------------------------------------------------------------- WindowKV
def test_windowkv_group_budgets_match_the_authors_examples():
    assert sorted(set(group_budgets(2048, 32, 8, 14)), reverse=True) == [2926, 2341, 1756, 1170]
    assert sorted(set(group_budgets(512, 32, 8, 14)), reverse=True) == [732, 586, 440, 292]
    assert group_budgets(100, 3, 8, 14) == [100, 100, 100]  # one group: no divide-by-zero


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_windowkv_keeps_whole_windows_and_shares_them_within_a_group(tiny, mode):
    model, _ = tiny("llama")
    ids = _ids(160)
    cache = infercache.compressed_cache(model, "windowkv", budget=48, mode=mode, shared_layers=2, page_size=1)
    model(ids, cache=cache, use_cache=True)
    suffix = 32 if mode == "max" else 16
    kept = []
    for layer in cache.layers:
        chans, valid = layer.store.gather()
        kept.append(chans["k"][0, 0, : int(valid[0, 0].sum())])
    dense = _dense_keys(model, ids)
    for layer_idx in range(3):
        full = dense.layers[layer_idx].keys[0, 0]
        match = (kept[layer_idx][:, None, :] == full[None]).all(-1).float().argmax(-1)  # original index of each kept key
        review = match[match < 160 - suffix]
        assert review.numel() % 8 == 0  # whole windows of 8 tokens
        assert torch.equal(review.view(-1, 8), review.view(-1, 8)[:, :1] + torch.arange(8))
        assert torch.equal(match[-suffix:], torch.arange(160 - suffix, 160))
        if layer_idx == 1:  # layer 1 shares layer 0's windows (group of 2)
            assert torch.equal(review, first_review)
        first_review = review if layer_idx == 0 else first_review


def test_windowkv_rejects_unknown_mode(tiny):
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match="mode"):
        infercache.compressed_cache(model, "windowkv", budget=0.5, mode="qa")


# ---------------------------------------------------------------- DapQ
def test_dapq_pseudo_queries_are_rerotated_at_future_positions(tiny):
    model, _ = tiny("llama")
    from infercache.compress import _rotary

    rotary = _rotary(model)
    q = torch.randn(1, 4, 5, 16)
    pos = torch.arange(10, 15)[None]
    cos, sin = rotary(0, pos)
    post = rerotate(q, cos, sin)
    torch.testing.assert_close(unrotate(post, cos, sin), q, rtol=1e-5, atol=1e-6)
    # rotating by p then by delta equals rotating by p + delta (RoPE is additive in position)
    c2, s2 = rotary(0, pos + 7)
    dc, ds = rotary(0, torch.full_like(pos, 7))
    torch.testing.assert_close(rerotate(post, dc, ds), rerotate(q, c2, s2), rtol=1e-4, atol=1e-5)


def test_dapq_keeps_what_the_future_queries_attend_to(tiny):
    from infercache.policies import ScoreContext, get_policy

    g = torch.Generator().manual_seed(0)
    d, length = 16, 64
    keys = torch.randn(1, 1, length, d, generator=g) * 0.1
    direction = torch.randn(d, generator=g)
    keys[0, 0, 17] = direction * 4
    queries = torch.randn(1, 2, length, d, generator=g) * 0.1
    queries[:, :, -8:] += direction * 4
    ident = lambda pos: (torch.ones(*pos.shape, d), torch.zeros(*pos.shape, d))  # noqa: E731 (no rotation)
    ctx = ScoreContext(layer_idx=0, num_layers=1, keys=keys, values=keys, valid=torch.ones(1, 1, length, dtype=torch.bool),
                       queries=queries, scaling=d**-0.5, phase="prefill", query_positions=torch.arange(length)[None],
                       rotary=ident)
    scores = get_policy("dapq", n_pseudo=8, kernel=1).score(ctx)
    assert int(scores[0, 0, : length - 8].argmax()) == 17


# ---------------------------------------------------------------- Elastic Cache
def test_elastic_merges_dropped_entries_into_the_nearest_anchor(tiny):
    from infercache.policies import ScoreContext, get_policy

    length, d = 10, 2
    keys = torch.arange(length, dtype=torch.float32)[:, None].repeat(1, d)[None, None]
    ctx = ScoreContext(layer_idx=0, num_layers=1, keys=keys, values=keys * 10, valid=torch.ones(1, 1, length, dtype=torch.bool),
                       queries=None, scaling=1.0, phase="prefill")
    keep = torch.tensor([[[0, 3, 9]]])
    merged = get_policy("elastic").merge(ctx, keep, torch.tensor([[3]]))
    # dropped 1 -> anchor 0 (nearest); 2 -> 3; 4, 5, 6 -> 3; 7, 8 -> 9
    assert merged["k"][0, 0, 0, 0] == pytest.approx((0 + 1) / 2)
    assert merged["k"][0, 0, 3, 0] == pytest.approx((3 + 2 + 4 + 5 + 6) / 5)
    assert merged["k"][0, 0, 9, 0] == pytest.approx((9 + 7 + 8) / 3)
    assert merged["v"][0, 0, 9, 0] == pytest.approx(10 * (9 + 7 + 8) / 3)


def test_elastic_holds_the_ratio_of_tokens_seen_while_decoding(tiny):
    model, _ = tiny("llama")
    ids = _ids(100)
    cache = infercache.compressed_cache(model, "elastic", budget=0.8)
    out = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, cache=cache)
    assert out.shape[1] == 140
    for lengths in cache.lengths():
        assert int(lengths.max()) <= int(0.8 * 139) + 1
        assert int(lengths.min()) >= int(0.8 * 139) - 1


# ---------------------------------------------------------------- real models
@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["smollm2-135m", "gemma3-270m"])
def test_seed_methods_run_on_real_models(model_name):
    from infercache.models import load

    model, tok = load(model_name)
    text = " ".join(["The grass is green. The sky is blue."] * 60) + " The pass key is 4711. What is the pass key? The pass key is"
    ids = tok(text, return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "4711" in tok.decode(ref[0, ids.shape[1] :])
    for method in ["razor", "windowkv", "dapq", "elastic"]:
        budget = 0.8 if method == "elastic" else 0.25
        cache = infercache.compressed_cache(model, method, budget=budget)
        out = model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
        assert "4711" in tok.decode(out[0, ids.shape[1] :]) or method == "elastic", method
        dense = sum(
            2 * ids.shape[1] * model.config.num_key_value_heads * model.config.head_dim * 4
            for i, t in enumerate(cache.lengths())
            if cache.layers[i].__class__.__name__ == "CompressedLayer"
        )
        held = sum(l.nbytes() for l in cache.layers if l.__class__.__name__ == "CompressedLayer")
        assert held < dense, method
