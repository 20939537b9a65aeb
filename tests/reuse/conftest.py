"""Fixtures for the reuse tests: a tiny model, RAG-like segments and a fresh memory store."""

from __future__ import annotations

import pytest
import torch

from infercache import store

torch.set_num_threads(1)

SYSTEM = "System: answer from the documents.\n"
DOCS = [
    "Doc A. The quick brown fox jumps over the lazy dog near the river bank. " * 2,
    "Doc B. Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do. " * 2,
    "Doc C. Pack my box with five dozen liquor jugs, said the old sailor. " * 2,
]
QUESTION = "Q: what jumps?\nA:"


@pytest.fixture
def llama(tiny):
    return tiny("llama")


@pytest.fixture
def memory_store():
    tier = store.open("memory://")
    yield tier
    tier.close()


@pytest.fixture
def rag():
    """``rag(order=(0, 1, 2), question=...)`` -> [system, documents in that order, question]."""

    def build(order=(0, 1, 2), question: str = QUESTION) -> list[str]:
        return [SYSTEM, *[DOCS[i] for i in order], question]

    return build
