"""Clear errors for bad input."""

import pytest
import torch

import infercache.stream as stream_api
from infercache import UnsupportedModelError
from infercache.stream import (StreamBudgetError, StreamClosedError, StreamInputError, UnknownStreamPolicyError)


def test_unknown_policy_and_option(tiny):
    model, tok = tiny("llama")
    before = model.config._attn_implementation
    with pytest.raises(UnknownStreamPolicyError, match="available: streaming_llm, streaming_vlm, rekv"):
        stream_api.open(model, tok, "h2o", budget=64)
    with pytest.raises(TypeError, match="does not take option"):
        stream_api.open(model, tok, "streaming_llm", budget=64, topk=3)
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("policy,budget,options,match", [
    ("streaming_llm", 4, {}, "larger than the 4 sink tokens"),
    ("streaming_llm", 2, {"sinks": 8}, "larger than the 8 sink"),
    ("rekv", 20, {"block_size": 32}, "at least one block"),
    ("streaming_vlm", 64, {"vision": 60}, "exceeds the budget"),
    ("streaming_llm", 0, {}, "positive int"),
    ("streaming_llm", 1.5, {}, "positive int"),
])
def test_budget_errors(tiny, policy, budget, options, match):
    model, tok = tiny("llama")
    with pytest.raises(StreamBudgetError, match=match):
        stream_api.open(model, tok, policy, budget=budget, **options)


def test_closed_stream(tiny):
    model, tok = tiny("llama")
    before = model.config._attn_implementation
    s = stream_api.open(model, tok, "streaming_llm", budget=64)
    assert model.config._attn_implementation == "infercache_stream"
    s.feed(text="hello")
    s.close()
    s.close()  # idempotent
    assert model.config._attn_implementation == before and s.nbytes() == 0  # restored
    with pytest.raises(StreamClosedError, match="closed"):
        s.ask("what?")
    with pytest.raises(StreamClosedError):
        s.feed(text="more")


def test_bad_input(tiny):
    model, tok = tiny("llama")
    with stream_api.open(model, tok, "streaming_llm", budget=64) as s:
        with pytest.raises(StreamInputError, match="exactly one of"):
            s.feed(text="a", embeds=torch.zeros(2, 64))
        with pytest.raises(StreamInputError, match="exactly one of"):
            s.feed()
        with pytest.raises(StreamInputError, match="modality"):
            s.feed(text="a", modality="audio")
        with pytest.raises(StreamInputError, match=r"\[T, 64\]"):
            s.feed(embeds=torch.zeros(3, 32))
        with pytest.raises(StreamInputError, match="t\\*h\\*w"):
            s.feed(embeds=torch.zeros(6, 64), grid=(1, 2, 2))
        with pytest.raises(StreamInputError, match="does not fit"):
            s.feed(embeds=torch.zeros(61, 64), modality="vision")
        with pytest.raises(StreamInputError, match="non-empty question"):
            s.ask("  ")
        with pytest.raises(StreamInputError, match="max_new_tokens"):
            s.ask("what?", max_new_tokens=0)
        with pytest.raises(StreamInputError, match="must contain"):
            s.ask("what?", template="no placeholder")
        with pytest.raises(StreamInputError, match="keep_answer"):
            s.ask("what?", max_new_tokens=100, keep_answer=True)
        assert s.feed(text="") == 0 and s.held_tokens == 0


def test_model_without_rope_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).eval()
    with pytest.raises(UnsupportedModelError, match="RoPE"):
        stream_api.open(model, None, "streaming_llm", budget=32)


def test_a_failed_forward_leaves_the_stream_usable(tiny, make_ids):
    model, tok = tiny("llama")
    with stream_api.open(model, tok, "streaming_llm", budget=64) as s:
        s.feed(ids=make_ids(20))
        def boom(*args):
            raise RuntimeError("boom")

        hook = model.model.layers[1].register_forward_pre_hook(boom)  # layer 0 has updated, layer 1 never does
        try:
            with pytest.raises(RuntimeError, match="boom"):
                s.feed(ids=make_ids(7, 2))
        finally:
            hook.remove()
        assert s.held_tokens == 20 and all(layer.get_seq_length() == 20 for layer in s.cache.layers)
        s.feed(ids=make_ids(5, 1))
        assert s.held_tokens == 25 and all(layer.get_seq_length() == 25 for layer in s.cache.layers)
