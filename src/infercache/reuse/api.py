"""``infercache.reuse.generate``: greedy generation that reuses stored KV, with a report (the public entry point).

>>> from infercache import store, reuse
>>> kv = store.open("memory://")                                                     # doctest: +SKIP
>>> out = reuse.generate(model, tok, segments=[system, doc1, doc2, question], store=kv,
...                      mode="cacheblend", max_new_tokens=32, verify=True)        # doctest: +SKIP
>>> out.text, out.report.ttft_s, out.report.verify.kl_first                          # doctest: +SKIP

See ``docs/reuse.md`` for the modes, what is exact and what is approximate.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..store import BlobStore, KVStore
from ..store import open as open_store
from ..store.keys import DEFAULT_CHUNK_SIZE
from .ape import DEFAULT_SCALE, DEFAULT_TEMPERATURE, ape_prompt
from .cacheblend import DEFAULT_CHECK_LAYER, DEFAULT_RECOMPUTE_RATIO
from .cachecraft import DEFAULT_ALPHA
from .chunk import chunk_prompt
from .decode import eos_ids, greedy, hf_step
from .namespace import namespace_for
from .prefix import prefix_prompt
from .report import ReuseReport, ReuseResult
from .segments import tokenize_segments
from .state import PromptState
from .support import check_chunk_model
from .verify import full_prefill, verify_against_full

Mode = Literal["full", "prefix", "chunk", "cacheblend", "cachecraft", "ape"]
MODES: tuple[str, ...] = ("full", "prefix", "chunk", "cacheblend", "cachecraft", "ape")


def _kv_store(store: Any, model: torch.nn.Module, tokenizer: Any, chunk_size: int, model_id: str | None,
              tenant_salt: str | None, secret: bytes | None) -> tuple[KVStore | None, bool]:
    """A ``KVStore`` for this model from ``store`` (None, URL, tier or KVStore); the flag says whether we opened it."""
    if store is None:
        return None, False
    namespace = namespace_for(model, tokenizer, model_id=model_id, tenant_salt=tenant_salt)
    if isinstance(store, KVStore):
        if store.namespace.digest() != namespace.digest():
            raise ValueError(f"store's namespace ({store.namespace.model_id!r}, {store.namespace.digest()[:12]}...) is "
                             f"not this model's ({namespace.model_id!r}, {namespace.digest()[:12]}...); pass the tier "
                             "(infercache.store.open(url)) and let generate() build the namespace")
        return store, False
    if isinstance(store, str):
        return KVStore(open_store(store), namespace, chunk_size=chunk_size, secret=secret), True
    if isinstance(store, BlobStore):
        return KVStore(store, namespace, chunk_size=chunk_size, secret=secret), False
    raise TypeError(f"store must be None, a URL, a tier from infercache.store.open() or a KVStore; "
                    f"got {type(store).__name__}")


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, segments: Sequence[Any], *, store: Any = None,
             mode: Mode = "prefix", max_new_tokens: int = 32, verify: bool = False,
             chunk_size: int = DEFAULT_CHUNK_SIZE, recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO,
             check_layer: int = DEFAULT_CHECK_LAYER, deviation: str = "value", alpha: float = DEFAULT_ALPHA,
             segment_stats: bool | None = None, ape_temperature: float = DEFAULT_TEMPERATURE,
             ape_scale: float = DEFAULT_SCALE,
             add_bos: bool | None = None, eos_token_id: int | Sequence[int] | None = None,
             model_id: str | None = None, tenant_salt: str | None = None,
             secret: bytes | None = None) -> ReuseResult:
    """Greedy-generate after ``segments`` while reusing KV from ``store``; returns text, ids and a report.

    ``segments``: strings, token-id lists or :class:`~infercache.reuse.Segment` objects, concatenated into the prompt
    (see :mod:`.segments` for BOS and which segments are cached). ``store``: ``None`` (nothing reused or stored), a
    URL for :func:`infercache.store.open` (opened and closed by this call), a tier, or a :class:`KVStore` built for
    this model's :func:`namespace_for`.

    ``mode``:

    * ``"full"``: plain full prefill (the baseline; the store is not used);
    * ``"prefix"``: exact prefix reuse, ``chunk_size``-token chunks (default 256);
    * ``"chunk"``: per-segment reuse at any offset, keys re-rotated, no repair;
    * ``"cacheblend"``: chunk reuse + recompute of the ``recompute_ratio`` (0.15) most deviating tokens from
      ``check_layer`` (1) on, deviation on ``"value"`` (CacheBlend's code) or ``"key"`` (LMCache);
    * ``"cachecraft"``: chunk reuse + Cache-Craft's per-chunk recompute rule with factor ``alpha`` (0.3); the
      attention statistics it needs are recorded when a segment is stored, by default only in this mode
      (``segment_stats=True`` records them in ``chunk`` / ``cacheblend`` too, at the cost of an extra attention pass);
    * ``"ape"``: APE parallel encoding with ``ape_temperature`` / ``ape_scale`` (0.9 / 0.9).

    ``verify=True`` also runs a full prefill (not counted in the mode's timings) and fills ``report.verify``.
    Decoding is greedy for every mode; ``max_new_tokens`` (>= 1) includes the EOS token when one is produced.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    start = time.perf_counter()
    parts = tokenize_segments(tokenizer, segments, add_bos=add_bos,
                              separate_bos=mode in ("chunk", "cacheblend", "cachecraft"))
    device = next(model.parameters()).device
    prompt = torch.tensor([t for p in parts for t in p.ids], device=device)
    rope = None
    if mode in ("chunk", "cacheblend", "cachecraft", "ape"):
        rope = check_chunk_model(model, mode, prompt.numel() + max_new_tokens)
    kv_store, opened = (None, False) if mode == "full" else _kv_store(store, model, tokenizer, chunk_size, model_id,
                                                                      tenant_salt, secret)
    try:
        if mode == "full":
            logits, cache, _ = full_prefill(model, prompt)
            state = PromptState(logits=logits, cache=cache, next_position=prompt.numel(), step=hf_step(model),
                                reused=0, recomputed=0, fresh=prompt.numel())
        elif mode == "prefix":
            state = prefix_prompt(model, prompt, kv_store)
        elif mode == "ape":
            state = ape_prompt(model, parts, kv_store, rope, temperature=ape_temperature, scale=ape_scale)
        else:
            state = chunk_prompt(model, parts, kv_store, rope, mode=mode, recompute_ratio=recompute_ratio,
                                 check_layer=check_layer, deviation=deviation, alpha=alpha,
                                 collect_stats=segment_stats)
        int(state.logits.argmax())  # the first token is known here
        ttft = time.perf_counter() - start
        write_start = time.perf_counter()
        writes = state.write() if state.write is not None else 0
        write_s = time.perf_counter() - write_start
        decode_start = time.perf_counter()
        eos = eos_ids(model, tokenizer, eos_token_id)
        tokens, step_logits = greedy(state.step, state.cache, state.logits, state.next_position, max_new_tokens, eos)
        decode_s = time.perf_counter() - decode_start
    finally:
        if opened and kv_store is not None:
            kv_store.close()
    report = ReuseReport(mode=mode, prompt_tokens=prompt.numel(), reused_tokens=state.reused,
                         recomputed_tokens=state.recomputed, fresh_tokens=state.fresh, new_tokens=len(tokens),
                         ttft_s=ttft, store_read_s=state.read_s, store_write_s=write_s, decode_s=decode_s,
                         store_hits=state.hits, store_misses=state.misses, store_writes=writes,
                         corrupt=state.corrupt, layer_rows=state.layer_rows, details=state.details)
    if verify:
        report.verify = verify_against_full(model, prompt, tokens, step_logits, max_new_tokens=max_new_tokens,
                                            eos=eos)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return ReuseResult(text=text, ids=tokens, prompt_ids=prompt.tolist(), report=report)
