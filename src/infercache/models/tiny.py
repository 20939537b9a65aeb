"""Tiny random-init configs for every supported architecture (mechanics tests only, never quality).

Each config is small enough to run a forward in milliseconds on one CPU thread, but keeps what makes
its family different for a KV cache: GQA groups, Qwen3's q/k-norm, Phi3's fused qkv projection,
Mistral's and Gemma3's sliding-window layers (Gemma3 with its 5:1 local:global pattern).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

BYTE_SPECIALS = ["<pad>", "<s>", "</s>"]
TINY_VOCAB = 256 + len(BYTE_SPECIALS)

_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", num_hidden_layers=3, **_COMMON),
    "qwen2": dict(model_type="qwen2", num_hidden_layers=3, **_COMMON),
    "qwen3": dict(model_type="qwen3", num_hidden_layers=3, **_COMMON),
    "mistral": dict(model_type="mistral", num_hidden_layers=3, sliding_window=None, **_COMMON),
    "phi3": dict(model_type="phi3", num_hidden_layers=3, **{k: v for k, v in _COMMON.items() if k != "head_dim"}),
    "gemma3": dict(
        model_type="gemma3_text",
        num_hidden_layers=6,
        sliding_window=32,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        query_pre_attn_scalar=16,
        **{**_COMMON, "num_key_value_heads": 1, "tie_word_embeddings": True},
    ),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + pad/bos/eos) built in code, so tiny models need no download."""
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    for byte in range(256):
        vocab[_BYTE_TO_UNICODE[byte]] = len(BYTE_SPECIALS) + byte
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the one ByteLevel pre-tokenizers use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_TO_UNICODE = _bytes_to_unicode()


def build_tiny(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build ``tiny-random-<arch>``: a random-init model (seeded) and the byte tokenizer."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {arch!r}; available: {', '.join(TINY_CONFIGS)}")
    cfg = dict(TINY_CONFIGS[arch])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model, byte_tokenizer()
