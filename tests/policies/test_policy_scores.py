"""Planted patterns: each scorer keeps what its idea says it should keep (hand-built tensors)."""

import pytest
import torch

from infercache.cache.selection import protect, select
from infercache.policies import POLICIES, ScoreContext, get_policy
from infercache.policies.pyramidkv import pyramid_capacity
from infercache.policies.snapkv import pool_scores

B, HKV, G, L, D = 1, 2, 2, 64, 16
NEEDLE = 23


def _ctx(policy_window=32, seed=0, phase="prefill", **over):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, HKV, L, D, generator=g) * 0.1
    values = torch.randn(B, HKV, L, D, generator=g)
    queries = torch.randn(B, HKV * G, L, D, generator=g) * 0.1
    # Plant the needle: the last 32 queries all point at key NEEDLE (in every KV head).
    direction = torch.randn(D, generator=g)
    keys[:, :, NEEDLE] = direction * 3
    queries[:, :, -policy_window:] += direction * 3
    positions = torch.arange(L)[None]
    ctx = ScoreContext(
        layer_idx=3, num_layers=8, keys=keys, values=values, valid=torch.ones(B, HKV, L, dtype=torch.bool),
        queries=queries, scaling=D**-0.5, phase=phase, positions=positions, query_positions=positions,
        rotary=lambda pos: (torch.ones(pos.shape[0], pos.shape[1], D), torch.zeros(pos.shape[0], pos.shape[1], D)),
    )
    for k, v in over.items():
        setattr(ctx, k, v)
    return ctx


def _kept(policy, ctx, capacity=8):
    scores = policy.score(ctx)
    assert scores.shape == (B, HKV, L)
    scores = protect(scores, ctx.valid, last=min(policy.window, L) if ctx.phase == "prefill" else 0)
    keep, counts = select(scores, ctx.valid, torch.full((B, HKV), capacity + min(policy.window, 8)))
    return [set(keep[0, h, : counts[0, h]].tolist()) for h in range(HKV)]


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "h2o", "tova"])
def test_attention_scorers_keep_the_needle_the_queries_look_at(name):
    policy = get_policy(name, window=8) if name in ("snapkv", "pyramidkv", "adakv") else get_policy(name)
    ctx = _ctx()
    for kept in _kept(policy, ctx):
        assert NEEDLE in kept


def test_knorm_keeps_low_norm_keys():
    ctx = _ctx()
    ctx.keys[:, :, 40] = 0.0  # the smallest possible norm
    for kept in _kept(get_policy("knorm"), ctx):
        assert 40 in kept and NEEDLE not in kept  # the planted needle has a large norm


def test_streaming_llm_keeps_sinks_and_recent():
    for kept in _kept(get_policy("streaming_llm"), _ctx(), capacity=12):
        assert kept == set(range(4)) | set(range(L - 8, L))


def test_expected_attention_keeps_the_key_aligned_with_the_mean_query():
    ctx = _ctx(policy_window=L)  # every query points at the needle: it dominates the query mean
    for kept in _kept(get_policy("expected_attention"), ctx):
        assert NEEDLE in kept and set(range(4)) <= kept  # sinks protected


def test_random_is_seeded_and_differs_by_layer():
    a = get_policy("random", seed=1).score(_ctx())
    b = get_policy("random", seed=1).score(_ctx())
    c = get_policy("random", seed=1).score(_ctx(layer_idx=4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tova_uses_one_index_set_per_layer():
    kept = _kept(get_policy("tova"), _ctx())
    assert kept[0] == kept[1]


def test_gqa_reduce_max_differs_from_mean():
    ctx = _ctx()
    ctx.queries[:, 1] *= 0  # one query head of group 0 sees nothing special
    mean = get_policy("snapkv", gqa_reduce="mean", window=8, kernel=1).score(ctx)
    mx = get_policy("snapkv", gqa_reduce="max", window=8, kernel=1).score(ctx)
    assert torch.all(mx >= mean - 1e-6) and not torch.allclose(mx, mean)


def test_max_pool_spreads_votes_to_neighbours():
    s = torch.zeros(1, 1, 20)
    s[..., 10] = 1.0
    out = pool_scores(s, 7, "max")
    assert torch.equal(out[0, 0, 7:14], torch.ones(7)) and out[0, 0, 6] == 0 and out[0, 0, 14] == 0
    avg = pool_scores(s, 5, "avg")
    assert torch.allclose(avg[0, 0, 8:13], torch.full((5,), 0.2))


def test_pyramid_schedule_follows_the_authors_formula():
    caps = [pyramid_capacity(128, 8, 4096, rank, 30, 20) for rank in range(30)]
    assert caps[0] > caps[-1] and caps == sorted(caps, reverse=True)
    assert abs(sum(caps) / 30 - 128) <= 0.5  # the average is the budget (paper's intent)
    # min = (B-w)//beta = 6, max = 2*120 - 6 = 234: first and last layers, window 8 on top
    assert caps[0] == 234 + 8 and caps[29] == 6 + 8
    assert pyramid_capacity(128, 8, 100, 0, 30, 20) == 100  # shorter than the budget: keep all
    assert pyramid_capacity(128, 8, 200, 0, 30, 20) == 128  # shorter than 2(B-w): uniform SnapKV


def test_adakv_gives_more_to_the_head_that_owns_the_top_scores():
    policy = get_policy("adakv", window=4, alpha=0.2)
    scores = torch.zeros(1, 2, 40)
    scores[0, 0, :36] = torch.linspace(1, 2, 36)  # head 0 owns every top score
    ctx = _ctx()
    ctx.valid = torch.ones(1, 2, 40, dtype=torch.bool)
    caps = policy.head_capacities(scores, torch.tensor([14]), ctx)
    # base b = 10 per head: head 0 owns all 20 top entries -> round(20*0.8 + 2) + 4; head 1: 2 + 4
    assert caps.tolist() == [[22, 6]]


def test_every_registered_policy_documents_a_paper_or_purpose():
    for name, cls in POLICIES.items():
        assert cls.__doc__ and len(cls.__doc__.strip()) > 20, name
        module_doc = __import__(cls.__module__, fromlist=["x"]).__doc__
        assert module_doc and (name in ("full", "random") or "arxiv.org" in module_doc), name
