"""KV reuse across requests on Hugging Face models, on top of :mod:`infercache.store`.

>>> from infercache import reuse, store
>>> out = reuse.generate(model, tok, segments=[system, doc, question], store=store.open("memory://"),
...                      mode="prefix", max_new_tokens=32)                    # doctest: +SKIP

Modes: ``full`` (baseline), ``prefix`` (exact), ``chunk``, ``cacheblend``, ``cachecraft``, ``ape`` (approximate).
See ``docs/reuse.md``.
"""

from __future__ import annotations

from .api import MODES, generate
from .errors import ReuseError, UnsupportedModelError, UnsupportedRopeError
from .namespace import namespace_for, tokenizer_hash, weights_hash
from .report import ReuseReport, ReuseResult, VerifyReport
from .rope import SUPPORTED_ROPE_TYPES, check_rotation, rope_info, rotate_keys
from .segments import Segment

__all__ = [
    "MODES", "ReuseError", "ReuseReport", "ReuseResult", "SUPPORTED_ROPE_TYPES", "Segment", "UnsupportedModelError",
    "UnsupportedRopeError", "VerifyReport", "check_rotation", "generate", "namespace_for", "rope_info",
    "rotate_keys", "tokenizer_hash", "weights_hash",
]
