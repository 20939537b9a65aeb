"""``infercache.stream``: bounded memory for endless text and video streams.

>>> stream = infercache.stream.open(model, tokenizer, policy="rekv", budget=1024)
>>> stream.feed(text=chunk)                                   # as often as input arrives
>>> stream.feed(embeds=frame_tokens, modality="vision")       # frame embeddings (e.g. a vision tower's output)
>>> stream.ask("What was the pass key?", max_new_tokens=16)   # any time; read-only unless keep_answer=True
>>> stream.nbytes(); stream.stats(); stream.close()

Policies: ``streaming_llm`` (StreamingLLM, https://arxiv.org/abs/2309.17453), ``streaming_vlm`` (StreamingVLM,
https://arxiv.org/abs/2510.09608), ``rekv`` (ReKV, https://arxiv.org/abs/2503.00540, with optional V-Rex-style
frame merging, https://arxiv.org/abs/2512.12284). Keys are held before RoPE and re-positioned contiguously inside
the cache (1-D, or 3-D for M-RoPE). See ``docs/stream.md``.
"""

from .cache import StreamCache
from .errors import StreamBudgetError, StreamClosedError, StreamError, StreamInputError, UnknownStreamPolicyError
from .policies import POLICIES, ReKV, StreamingLLM, StreamingVLM, StreamPolicy, get_policy
from .stream import DEFAULT_TEMPLATE, Stream, open  # noqa: A004

__all__ = [
    "DEFAULT_TEMPLATE", "POLICIES", "ReKV", "Stream", "StreamBudgetError", "StreamCache", "StreamClosedError",
    "StreamError", "StreamInputError", "StreamPolicy", "StreamingLLM", "StreamingVLM", "UnknownStreamPolicyError",
    "get_policy", "open", "policies",
]


def policies() -> list[str]:
    """Names accepted by :func:`open`."""
    return list(POLICIES)
