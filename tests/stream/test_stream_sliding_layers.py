"""Gemma-3's sliding-window layers hold only their sinks and window (``sinks + window - 1`` entries between feeds),
not the budget: real memory saved, and the same outputs as a stream whose every layer holds the whole budget."""

import pytest
import torch

import infercache.stream as stream_api

BUDGET = 96
WINDOW = 32  # the tiny gemma3's sliding window; layers 0-4 are sliding, layer 5 is global
SINKS = 4
LOCAL = SINKS + WINDOW - 1


def _entry_bytes(model) -> int:
    """Keys + values of one entry in one layer."""
    c = model.config
    return 2 * c.num_key_value_heads * c.head_dim * next(model.parameters()).element_size()


def _untrimmed(stream):
    """The reference: every layer holds every entry (the behaviour before local layers)."""
    for layer in stream.cache.layers:
        layer.window = None
    return stream


def test_sliding_layers_hold_only_their_window(tiny, make_ids):
    model, tok = tiny("gemma3")
    kinds = [layer.layer_type for layer in stream_api.Stream(model, tok, "streaming_llm", budget=BUDGET).cache.layers]
    assert kinds == ["sliding_attention"] * 5 + ["full_attention"]
    with stream_api.open(model, tok, "streaming_llm", budget=BUDGET, chunk_size=20) as s, \
            _untrimmed(stream_api.open(model, tok, "streaming_llm", budget=BUDGET, chunk_size=20)) as ref:
        ids = make_ids(1000, seed=4)
        for start in range(0, 1000, 100):
            s.feed(ids=ids[start : start + 100])
            ref.feed(ids=ids[start : start + 100])
            lengths = [layer.get_seq_length() for layer in s.cache.layers]
            assert lengths == [LOCAL] * 5 + [s.held_tokens]
        assert s.held_tokens == BUDGET
        meta = s.cache.entries.nbytes()
        assert s.nbytes() == (5 * LOCAL + BUDGET) * _entry_bytes(model) + meta
        assert ref.nbytes() == 6 * BUDGET * _entry_bytes(model) + meta
        assert s.nbytes() < 0.5 * ref.nbytes()  # 271 of 576 layer-entries
        # a local layer holds the sinks (stream tokens 0-3) and the newest window - 1 entries
        layer = s.cache.layers[0]
        assert layer.head == SINKS and layer.rows(BUDGET).tolist() == list(range(SINKS)) + list(range(65, 96))
        # the memory is really released: no layer keeps a view on a larger tensor
        for layer in s.cache.layers[:5]:
            assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * layer.keys.element_size()
        torch.testing.assert_close(s.last_logits, ref.last_logits, atol=1e-5, rtol=1e-5)
        assert s.ask("Q?", max_new_tokens=6) == ref.ask("Q?", max_new_tokens=6)
        assert [layer.get_seq_length() for layer in s.cache.layers] == [LOCAL] * 5 + [BUDGET]  # read-only


@pytest.mark.parametrize("policy,options", [
    ("streaming_llm", {"sinks": 0}),
    ("streaming_llm", {"chunk_size": 70}),  # 96 - 4 - 70 = 22 < 31 recent entries: the sinks come into the window
    ("streaming_vlm", {}),  # typed cuts can bring old entries back into the window: its sliding layers hold all
    ("rekv", {"block_size": 16, "topk": 3, "store": "memory://"}),
    ("rekv", {"block_size": 16, "topk": 3, "store": "memory://", "merge_frames": True, "merge_threshold": 0.5}),
])
def test_local_layers_give_the_same_outputs_as_full_layers(tiny, make_ids, policy, options):
    model, tok = tiny("gemma3")
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(8, model.config.hidden_size, generator=g)
    options = {"chunk_size": 20, **options}
    with stream_api.open(model, tok, policy, budget=BUDGET, **options) as s, \
            _untrimmed(stream_api.open(model, tok, policy, budget=BUDGET, **options)) as ref:
        local = [layer.window is not None for layer in s.cache.layers]
        assert local == ([False] * 6 if policy == "streaming_vlm" else [True] * 5 + [False])
        for i in range(12):
            for stream in (s, ref):
                stream.feed(ids=make_ids(90, seed=i))
                stream.feed(embeds=frame + 0.01 * i, modality="vision")
            torch.testing.assert_close(s.last_logits, ref.last_logits, atol=1e-5, rtol=1e-5)
        assert s.nbytes() < ref.nbytes() or policy == "streaming_vlm"
        answer, ref_answer = s.ask("what?", max_new_tokens=5), ref.ask("what?", max_new_tokens=5)
        if not options.get("merge_frames"):  # merging decides on the first *stored* layer's keys: 5 here, 0 there
            assert answer == ref_answer
        if policy == "rekv":
            # only the global layer was offloaded and retrieved; the store holds 1/6 of the reference's blobs
            assert set(s.policy.last_fetched) == {5}
            assert len(s.policy.archive.tier.keys()) * 6 == len(ref.policy.archive.tier.keys())
            if options.get("merge_frames"):
                assert s.stats()["merged_tokens"] > 0
            else:
                assert s.policy.last_fetched[5] == ref.policy.last_fetched[5]


def test_keep_answer_trims_and_a_window_wider_than_the_budget_is_not_local(tiny, make_ids):
    model, tok = tiny("gemma3")
    with stream_api.open(model, tok, "streaming_llm", budget=BUDGET) as s:
        s.feed(ids=make_ids(300))
        s.ask("Q?", max_new_tokens=4, keep_answer=True)
        assert [layer.get_seq_length() for layer in s.cache.layers][:5] == [LOCAL] * 5
    with stream_api.open(model, tok, "streaming_llm", budget=24) as s:  # window 32 > budget: every layer holds all
        s.feed(ids=make_ids(300))
        assert [layer.get_seq_length() for layer in s.cache.layers] == [24] * 6
