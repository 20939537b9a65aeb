"""On a real model (SmolLM2-135M-Instruct): exactness below the window, and ReKV recalling a fact the window lost."""

import pytest
import torch

import infercache.stream as stream_api
from infercache.bench.tasks.haystack import Haystack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from infercache.models import load

    return load("smollm2-135m")


def _filler(tokenizer, n: int) -> list[int]:
    hay = Haystack.load("literary")
    return tokenizer(hay.excerpt(hay.paragraph_starts[3], n), add_special_tokens=False)["input_ids"][:n]


def test_streaming_llm_matches_generate_below_the_window(smollm2):
    model, tok = smollm2
    ids = torch.tensor(_filler(tok, 300))
    question = "Who is speaking?"
    with stream_api.open(model, tok, "streaming_llm", budget=512, chunk_size=96) as s:
        s.feed(ids=ids[:150])
        s.feed(ids=ids[150:])
        answer = s.ask(question, max_new_tokens=12)
    prompt = tok(stream_api.DEFAULT_TEMPLATE.format(question=question), add_special_tokens=False,
                 return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(torch.cat([ids[None], prompt], 1), max_new_tokens=12, do_sample=False)
    assert answer == tok.decode(out[0, 300 + prompt.shape[1]:], skip_special_tokens=True).strip()


def test_rekv_recalls_a_fact_the_window_evicted(smollm2):
    model, tok = smollm2
    filler = _filler(tok, 1600)
    fact = tok("\n\nThe secret colour is turquoise. Remember it. The secret colour is turquoise.\n\n",
               add_special_tokens=False)["input_ids"]
    ids = torch.tensor(filler[:100] + fact + filler[100:1400])
    answers = {}
    for policy in ("streaming_llm", "rekv"):
        with stream_api.open(model, tok, policy, budget=384) as s:
            s.feed(ids=ids)
            answers[policy] = s.ask("What is the secret colour?", max_new_tokens=4, prefix=" The secret colour is")
            if policy == "rekv":
                fetched = s.policy.last_fetched
                hits = sum(any(b <= 104 < b + 32 for b in blocks) for blocks in fetched.values())
    assert "turquoise" in answers["rekv"].lower()
    assert "turquoise" not in answers["streaming_llm"].lower()  # the fact left the window 1,300 tokens ago
    assert hits >= len(fetched) // 2  # most layers retrieved the block holding the fact


def test_gemma3_local_layers_match_full_layers_and_save_memory():
    """Gemma-3-270M (15 sliding-window layers of 512, 3 global): sliding layers that hold only their sinks and window
    give the same logits and answer as layers that hold the whole budget, in about a third of the memory."""
    from infercache.models import load

    model, tok = load("gemma3-270m")
    ids = torch.tensor(_filler(tok, 1700))
    with stream_api.open(model, tok, "streaming_llm", budget=1024, chunk_size=256) as s, \
            stream_api.open(model, tok, "streaming_llm", budget=1024, chunk_size=256) as ref:
        for layer in ref.cache.layers:
            layer.window = None  # the reference: every layer holds the budget
        assert sum(layer.window == 512 for layer in s.cache.layers) == 15
        for start in range(0, ids.numel(), 425):
            s.feed(ids=ids[start : start + 425])
            ref.feed(ids=ids[start : start + 425])
        assert s.held_tokens == ref.held_tokens == 1024
        lengths = {layer.get_seq_length() for layer in s.cache.layers}
        assert lengths == {4 + 511, 1024}
        torch.testing.assert_close(s.last_logits, ref.last_logits, atol=2e-4, rtol=1e-4)
        assert s.ask("Who is speaking?", max_new_tokens=8) == ref.ask("Who is speaking?", max_new_tokens=8)
        per_entry = 2 * 1 * 256 * 4  # keys + values, 1 KV head of 256, fp32
        meta = s.cache.entries.nbytes()
        assert s.nbytes() == (15 * 515 + 3 * 1024) * per_entry + meta
        assert ref.nbytes() == 18 * 1024 * per_entry + meta
