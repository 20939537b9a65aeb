"""What :func:`infercache.reuse.generate` returns: the output and a report of what was reused and how close it is."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class VerifyReport:
    """Comparison with a full prefill of the same prompt (``verify=True``).

    * ``kl_first`` / ``top1_first``: KL(full || mode) in nats and argmax agreement of the first generated token.
    * ``kl_mean`` / ``top1_agreement``: the same averaged over every generated step, teacher-forced on the mode's
      own tokens (the full model sees the mode's continuation).
    * ``greedy_match``: fraction of positions where the mode's greedy tokens equal the full prefill's greedy tokens;
      ``greedy_identical``; ``first_divergence`` (index of the first differing token, ``None`` when none).
    * ``max_abs_logit_diff``: largest absolute difference of the first-token logits.
    * ``full_ttft_s``: time to first token of the full prefill (same machine, same call).
    """

    kl_first: float
    top1_first: bool
    kl_mean: float
    top1_agreement: float
    greedy_match: float
    greedy_identical: bool
    first_divergence: int | None
    max_abs_logit_diff: float
    full_ttft_s: float
    full_ids: list[int] = field(default_factory=list)


@dataclass
class ReuseReport:
    """Token accounting and timings of one request.

    Tokens: ``reused`` had stored KV used as is, ``recomputed`` had stored KV but were recomputed (selective
    recompute: CacheBlend from its check layer on, Cache-Craft at every layer), ``fresh`` had no stored KV and were
    computed at every layer. ``prompt_tokens = reused + recomputed + fresh``. ``prefilled`` counts tokens that went
    through every layer (``fresh + recomputed``; CacheBlend also runs *all* tokens through the layers up to its check
    layer, see ``layer_rows``).

    Store: ``store_hits`` / ``store_misses`` are chunks (prefix mode) or segments (chunk modes) looked up for this
    request; ``store_writes`` the blobs written; ``corrupt`` the stored entries rejected (treated as misses).

    Times (seconds, wall clock): ``ttft_s`` from the call until the first token is known (store reads, re-rotation
    and the prompt pass included); ``store_read_s`` is part of it; ``store_write_s`` happens after the first token;
    ``decode_s`` the remaining tokens.
    """

    mode: str
    prompt_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    fresh_tokens: int
    new_tokens: int
    ttft_s: float
    store_read_s: float = 0.0
    store_write_s: float = 0.0
    decode_s: float = 0.0
    store_hits: int = 0
    store_misses: int = 0
    store_writes: int = 0
    corrupt: int = 0
    layer_rows: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    verify: VerifyReport | None = None

    @property
    def prefilled_tokens(self) -> int:
        return self.fresh_tokens + self.recomputed_tokens

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prefilled_tokens"] = self.prefilled_tokens
        return out


@dataclass
class ReuseResult:
    """``text`` and ``ids`` of the generated continuation, the ``prompt_ids`` used, and the :class:`ReuseReport`."""

    text: str
    ids: list[int]
    prompt_ids: list[int]
    report: ReuseReport
