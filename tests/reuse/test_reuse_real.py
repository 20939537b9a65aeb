"""Real-model checks (slow): prefix reuse exact and chunk reuse at new offsets close to a full prefill.

The KL values are printed (``pytest -s``); the bounds are loose on purpose, the benchmark reports the real numbers.
"""

from __future__ import annotations

import pytest
import torch

from infercache import reuse, store
from infercache.models import ModelNotAvailableError, load

torch.set_num_threads(1)

DOCS = [
    "Document: The harbour master of Port Wendel is a woman named Elena Varga. She has kept the harbour for "
    "twenty years and knows every captain by name. Storms come from the west in autumn.\n\n",
    "Document: The oldest tree in the orchard is a pear tree planted by Tomas Reed. Its fruit ripens late, and "
    "the children of the village climb it every summer despite the rules.\n\n",
    "Document: The great bell of the tower was cast from melted cannons and is called Old Mercy. It rings once "
    "at noon and three times when a ship is lost at sea.\n\n",
]
SYSTEM = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "Answer from the documents.\n\n")


def question(text: str) -> str:
    return f"Question: {text}<|im_end|>\n<|im_start|>assistant\n"


def _load(name: str):
    try:
        return load(name)
    except ModelNotAvailableError as exc:  # pragma: no cover - CI has the models
        pytest.skip(str(exc))


@pytest.mark.slow
def test_smollm2_prefix_exact_and_chunk_reuse_close_to_full() -> None:
    model, tok = _load("smollm2-135m")
    tier = store.open("memory://")
    first = [SYSTEM, *DOCS, question("Who is the harbour master?")]
    cold = reuse.generate(model, tok, first, store=tier, mode="prefix", max_new_tokens=10, chunk_size=128)
    warm = reuse.generate(model, tok, first[:-1] + [question("What is the bell called?")], store=tier,
                          mode="prefix", max_new_tokens=10, chunk_size=128, verify=True)
    assert warm.report.reused_tokens >= 128 and warm.report.verify.greedy_identical
    assert warm.report.verify.max_abs_logit_diff < 1e-3
    assert cold.report.store_writes > 0

    reuse.generate(model, tok, first, store=tier, mode="cachecraft", max_new_tokens=1)  # stores the segments
    moved = [SYSTEM, DOCS[2], DOCS[0], DOCS[1], question("What is the bell called?")]
    results = {}
    for mode in ("chunk", "cacheblend", "cachecraft"):
        out = reuse.generate(model, tok, moved, store=tier, mode=mode, max_new_tokens=10, verify=True)
        assert out.report.store_hits == 4 and out.report.fresh_tokens < 25
        results[mode] = out.report.verify
        print(f"smollm2 {mode}: KL first {out.report.verify.kl_first:.4f}, top-1 agreement "
              f"{out.report.verify.top1_agreement:.2f}, reused {out.report.reused_tokens}, "
              f"recomputed {out.report.recomputed_tokens}, text {out.text!r}")
    assert results["chunk"].kl_first < 1.0 and results["chunk"].top1_first
    assert results["cacheblend"].kl_first < 1.0


@pytest.mark.slow
def test_stories260k_chunk_reuse_at_new_offset() -> None:
    model, tok = _load("stories260k")
    tier = store.open("memory://")
    docs = ["Once upon a time there was a little girl named Lily. She liked to play in the park. ",
            "Tom had a big red ball. He threw it high into the sky and laughed. ",
            "The cat sat on the warm mat and looked at the bird. "]
    reuse.generate(model, tok, [*docs, "One day,"], store=tier, mode="chunk", max_new_tokens=1)
    out = reuse.generate(model, tok, [docs[1], docs[2], docs[0], "One day,"], store=tier, mode="chunk",
                         max_new_tokens=12, verify=True)
    print(f"stories260k chunk: KL first {out.report.verify.kl_first:.4f}")
    assert out.report.store_hits == 4 and out.report.verify.kl_first < 1.0  # BOS + 3 documents
