"""The ``compress`` pillar's public API: ``methods()``, ``compressed_cache(...)``, ``compress(...)``.

>>> cache = infercache.compressed_cache(model, "snapkv", budget=0.25)
>>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
>>> cache.nbytes(), cache.lengths()

>>> with infercache.compress(model, "h2o", budget=256):
...     out = model.generate(**inputs, max_new_tokens=64)
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from .cache.attention import ATTN_NAME, register
from .cache.budget import Budget
from .cache.compressed_cache import CompressedCache, full_attention_layers
from .cache.engine import CompressionEngine
from .policies import POLICIES, Policy, get_policy

ENGINE_OPTIONS = ("page_size", "sink_tokens", "recent_tokens", "decode_budget", "compress_every")


def _kv_direct(model, budget, **options):
    from .cache.kv_direct import build_kv_direct_cache

    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError("kv_direct: budget is the window of recent tokens whose K/V are kept, an int >= 0")
    return build_kv_direct_cache(model, budget=budget, **options)


def _cross_layer(model, budget, **options):
    from .cache.cross_layer import build_cross_layer_cache

    return build_cross_layer_cache(model, options.pop("pattern", "every_other"), **options)


# Cache modes that are not scoring policies: they recompute (KV-Direct) or share (cross-layer) instead.
CACHE_MODES = {"kv_direct": _kv_direct, "cross_layer": _cross_layer}


def methods() -> list[str]:
    """Names accepted by :func:`compressed_cache` (:func:`compress` takes the same)."""
    return list(POLICIES) + list(CACHE_MODES)


class UnsupportedModelError(ValueError):
    """Raised for a model the compressed cache cannot serve (encoder-decoder, no per-layer attention, ...)."""


def check_model(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise UnsupportedModelError("infercache needs a Hugging Face transformers model (with a .config)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; infercache compresses decoder-only causal LMs"
        )
    if not any(hasattr(m, "layer_idx") and hasattr(m, "config") for m in model.modules()):
        raise UnsupportedModelError(f"{type(model).__name__} has no attention modules with a layer_idx")


def _rotary(model):
    """``rotary(layer_idx, positions [B, T]) -> (cos, sin)`` from the model's own rotary embedding."""
    emb = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if emb is None:
        return None
    takes_type = "layer_type" in inspect.signature(emb.forward).parameters
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)

    def rotary(layer_idx: int, positions: torch.Tensor):
        dummy = torch.zeros(1, dtype=torch.float32, device=positions.device)
        if takes_type:
            return emb(dummy, positions, layer_types[layer_idx] if layer_types else "full_attention")
        return emb(dummy, positions)

    return rotary


def use_infercache_attention(model) -> str | None:
    """Switch ``model`` to the ``infercache`` attention function; returns the previous implementation."""
    register()
    previous = model.config._attn_implementation
    if previous != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    return previous


def compressed_cache(model, method: str | Policy = "snapkv", budget: float | int = 0.5, **options) -> CompressedCache:
    """A transformers ``Cache`` that compresses ``model``'s KV cache with ``method`` at ``budget``.

    ``budget``: a float in (0, 1] is the fraction of context tokens kept; an int is the number of tokens kept
    (per KV head; per-layer / per-head methods keep that many on average). Engine options: ``page_size``
    (16), ``sink_tokens`` / ``recent_tokens`` (0: extra protected entries for any scorer), ``decode_budget``
    (bound the cache while decoding; methods that evict while decoding default to their prefill budget),
    ``compress_every`` (re-score every N decode steps). Other options go to the method (e.g. ``window``,
    ``kernel``, ``pooling``, ``gqa_reduce``, ``alpha``, ``scorer``).

    Two methods are cache modes rather than scorers: ``kv_direct`` (``budget`` = int window of recent tokens
    kept as K/V; older tokens are checkpointed and their K/V recomputed exactly; options ``checkpoint``,
    ``recompute``) and ``cross_layer`` (``pattern="every_other"``, ``k``: sharing layers reuse a donor
    layer's cache; ``budget`` is ignored). See docs/recompute-and-share.md.

    The model's attention implementation is switched to ``"infercache"`` (transformers' sdpa for every layer
    the cache does not own, so plain use of the model is unchanged).
    """
    check_model(model)
    if isinstance(method, str) and method in CACHE_MODES:
        try:
            return CACHE_MODES[method](model, budget, **options)
        except TypeError as err:
            raise ValueError(f"bad option for method {method!r}: {err}") from None
    engine_opts = {k: options.pop(k) for k in list(options) if k in ENGINE_OPTIONS}
    policy = get_policy(method, **options)
    parsed = Budget.parse(budget)
    engine = CompressionEngine(
        policy,
        parsed,
        num_layers=model.config.get_text_config(decoder=True).num_hidden_layers,
        compressed_layers=full_attention_layers(model.config),
        rotary=_rotary(model),
        **engine_opts,
    )
    policy.prepare(model)
    if policy.needs_attention_input:
        from .cache.capture import install_input_capture

        install_input_capture(model)
    use_infercache_attention(model)
    return CompressedCache(model.config, engine)


@contextlib.contextmanager
def compress(model, method: str | Policy = "snapkv", budget: float | int = 0.5, **options):
    """Within the block, ``model.generate`` uses a fresh compressed cache per call (unless one is passed).

    Yields a handle whose ``.last_cache`` is the cache of the latest call (for ``nbytes()``/``lengths()``).
    The model's previous attention implementation is restored on exit.
    """
    if not (isinstance(method, str) and method in CACHE_MODES):
        get_policy(method, **{k: v for k, v in options.items() if k not in ENGINE_OPTIONS})  # validate early
        Budget.parse(budget)
    previous = use_infercache_attention(model)
    handle = _Handle()
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
            kwargs["cache"] = compressed_cache(model, method, budget, **dict(options))
            handle.last_cache = kwargs["cache"]
        return original(*args, **kwargs)

    model.generate = generate
    try:
        yield handle
    finally:
        del model.generate
        if previous and previous != ATTN_NAME:
            model.set_attn_implementation(previous)


class _Handle:
    last_cache: CompressedCache | None = None


PROTOCOLS = ("question_aware", "question_agnostic")


def generate(model, context_ids, question_ids=None, *, method="snapkv", budget=0.5,
             protocol: str = "question_agnostic", **kwargs):
    """Generate an answer under a labelled compression protocol; returns ``(output_ids, cache)``.

    * ``question_agnostic``: the context alone is prefilled and compressed, then the question is appended
      (a multi-token forward over the compressed cache) and the answer generated. The compression cannot
      see the question, as when one cached document serves many questions (kvpress's protocol).
    * ``question_aware``: context and question are prefilled together and compressed at once, so scorers
      with an observation window see the question (the SnapKV/PyramidKV/AdaKV papers' protocol).

    ``kwargs`` go to ``model.generate`` (``max_new_tokens``, ``attention_mask`` is not supported here: one
    unpadded sequence per call) and to the cache (engine and method options, see :func:`compressed_cache`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    gen_keys = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "eos_token_id",
                "pad_token_id", "stop_strings", "tokenizer"}
    gen_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in gen_keys}
    gen_kwargs.setdefault("do_sample", False)
    cache = compressed_cache(model, method, budget, **kwargs)
    full_ids = context_ids if question_ids is None else torch.cat([context_ids, question_ids], dim=-1)
    if protocol == "question_agnostic" and question_ids is not None:
        with torch.no_grad():
            model(context_ids, cache=cache, use_cache=True)
    with torch.no_grad():
        out = model.generate(full_ids, cache=cache, **gen_kwargs)
    return out, cache
