"""namespace_for: what goes into the store namespace, caching of the hashes, and what changes the digest."""

from __future__ import annotations

import torch

from infercache.models import load
from infercache.reuse import namespace_for, tokenizer_hash, weights_hash


def test_namespace_fields(llama) -> None:
    model, tok = llama
    ns = namespace_for(model, tok)
    cfg = model.config
    assert ns.model_id == "llama:LlamaForCausalLM"  # tiny models have no name_or_path
    assert (ns.dtype, ns.num_layers, ns.num_kv_heads, ns.head_dim) == ("float32", cfg.num_hidden_layers,
                                                                         cfg.num_key_value_heads, cfg.head_dim)
    assert ns.rope["rope_parameters"] == {"rope_theta": 10000, "rope_type": "default"}
    assert ns.rope["model_type"] == "llama"
    assert len(ns.weights_hash) == 64 and len(ns.tokenizer_hash) == 64
    assert namespace_for(model, tok).digest() == ns.digest(), "stable"
    assert namespace_for(model, tok, model_id="other").digest() != ns.digest()
    assert namespace_for(model, tok, tenant_salt="t1").digest() != ns.digest()


def test_weights_hash_is_cached_and_follows_in_place_changes(llama) -> None:
    model, _ = llama
    first = weights_hash(model)
    assert model._infercache_weights_hash[1] == first and weights_hash(model) == first
    param = next(model.parameters())  # the embedding: always among the hashed tensors
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    try:
        assert weights_hash(model) != first
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert weights_hash(model) == first, "same bytes again (after a recompute: the version counter moved)"


def test_other_models_dtypes_and_tokenizers_get_other_namespaces(llama, tiny) -> None:
    model, tok = llama
    base = namespace_for(model, tok).digest()
    qwen, qtok = tiny("qwen2")
    assert namespace_for(qwen, qtok).digest() != base
    half, htok = load("tiny-random-llama", dtype="bfloat16")
    assert namespace_for(half, htok).dtype == "bfloat16" and namespace_for(half, htok).digest() != base
    gemma, gtok = tiny("gemma3")
    attention = namespace_for(gemma, gtok).rope["attention"]
    assert attention["sliding_window"] == 32 and "sliding_attention" in attention["layer_types"]
    grown = load("tiny-random-llama")[1]
    grown.add_tokens(["<extra>"])
    assert tokenizer_hash(grown) != tokenizer_hash(tok)
