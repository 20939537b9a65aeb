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
