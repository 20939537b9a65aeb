"""``Stream``: feed text or frame embeddings without end, ask questions at any time, in bounded memory.

>>> stream = infercache.stream.open(model, tokenizer, policy="streaming_llm", budget=1024)
>>> stream.feed(text="...")                     # any number of times, any length
>>> stream.feed(embeds=frame, modality="vision", grid=(1, 8, 8))
>>> stream.ask("What happened first?", max_new_tokens=32)
>>> stream.nbytes(); stream.close()

The stream drives the model one forward per chunk: it asks its policy which held entries survive the incoming
chunk, evicts the rest (ReKV offloads them), assigns positions after the survivors, and runs the model with a
:class:`~infercache.stream.cache.StreamCache`. ``budget`` is the number of KV entries held per layer.

Questions are read-only by default: the question and answer tokens are appended for the answer and then removed,
so asking never changes what the stream remembers, and between calls the cache holds at most ``budget`` entries
(while answering, question + answer tokens come on top: transient). ``keep_answer=True`` instead makes room for
them first (evicting like any input) and keeps them, as the StreamingLLM demo does with its chat turns.
"""

from __future__ import annotations

import torch

from ..compress import check_model
from .attention import ATTN_NAME, register
from .cache import StreamCache
from .entries import MODALITIES, TEXT, VISION, Entries
from .errors import StreamBudgetError, StreamClosedError, StreamInputError
from .policies import StreamPolicy, get_policy
from .policies.base import keep_all_but
from .positions import layout, next_position
from .rotary import Rotary

#: How a question is written into the stream unless ``template=`` says otherwise ("chat": the chat template).
DEFAULT_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"


class Stream:
    """An endless input stream over one model with a bounded cache; build it with :func:`open`."""

    def __init__(self, model, tokenizer, policy: str | StreamPolicy = "streaming_llm", budget: int = 2048, *,
                 chunk_size: int | None = None, template: str = DEFAULT_TEMPLATE, **options):
        check_model(model)
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise StreamBudgetError(f"budget must be a positive int (KV entries held per layer), got {budget!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise StreamInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.model, self.tokenizer, self.budget, self.template = model, tokenizer, budget, template
        self.policy = get_policy(policy, **options)
        self.rotary = Rotary(model)
        self.cache = StreamCache(model.config, self.rotary)
        self.closed = False
        self.policy.setup(budget, self)  # last: ReKV opens its store here
        if self.cache.sliding_window and self.policy.local_window_ok(self.cache.sliding_window):
            self.cache.make_local(self.policy.sinks)  # sliding layers hold their sinks and window, not the budget
        self.chunk_size = chunk_size or max(1, min(512, (budget - self.policy.sinks) // 4))
        self.seen = 0  # tokens fed so far (stream indices)
        self.chunks = 0
        self.last_logits: torch.Tensor | None = None  # logits after the last token fed (tests, custom decoding)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        _attach(model)

    # ------------------------------------------------------------------ input
    @torch.no_grad()
    def feed(self, text: str | None = None, *, ids=None, embeds: torch.Tensor | None = None,
             modality: str | None = None, grid: tuple[int, int, int] | None = None) -> int:
        """Append text (tokenized without special tokens), token ``ids``, or input ``embeds`` ``[T, hidden]``.

        ``modality`` is ``"text"`` (default for text/ids) or ``"vision"`` (default for embeds); ``grid=(t, h, w)``
        lays a vision chunk out on M-RoPE's 3-D positions. Text is split into chunks of at most ``chunk_size``;
        a vision chunk (a frame) is fed whole. Returns the number of tokens fed.
        """
        self._check_open()
        if sum(x is not None for x in (text, ids, embeds)) != 1:
            raise StreamInputError("feed takes exactly one of text=, ids=, embeds=")
        modality = modality or ("vision" if embeds is not None else "text")
        if modality not in MODALITIES:
            raise StreamInputError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
        mod = MODALITIES[modality]
        if text is not None:
            if not isinstance(text, str):
                raise StreamInputError(f"text must be a str, got {type(text).__name__}")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
            n = ids.numel()
        else:
            if not isinstance(embeds, torch.Tensor):
                raise StreamInputError(f"embeds must be a torch.Tensor [T, hidden], got {type(embeds).__name__}")
            if embeds.dim() == 3 and embeds.shape[0] == 1:
                embeds = embeds[0]
            hidden = self.model.get_input_embeddings().weight.shape[-1]
            if embeds.dim() != 2 or embeds.shape[-1] != hidden:
                raise StreamInputError(f"embeds must be [T, {hidden}], got {tuple(embeds.shape)}")
            n = embeds.shape[0]
        if grid is not None:
            if embeds is None:
                raise StreamInputError("grid= describes a frame of embeds; text has no grid")
            if len(tuple(grid)) != 3 or int(torch.tensor(grid).prod()) != n:
                raise StreamInputError(f"grid {tuple(grid)} must be (t, h, w) with t*h*w == {n} tokens")
        if n == 0:
            return 0
        limit = self.policy.max_chunk(mod)
        whole = embeds is not None and (grid is not None or mod == VISION)
        if whole and n > limit:
            raise StreamInputError(
                f"a {modality} chunk of {n} tokens does not fit the policy's room for it ({limit}); feed smaller "
                "frames or raise the budget"
            )
        step = n if whole else max(1, min(self.chunk_size, limit))
        for start in range(0, n, step):
            piece_ids = None if ids is None else ids[start : start + step]
            piece_emb = None if embeds is None else embeds[start : start + step]
            self._feed_chunk(piece_ids, piece_emb, mod, grid if whole else None)
        return n

    def _feed_chunk(self, ids, embeds, mod: int, grid) -> None:
        n = ids.numel() if ids is not None else embeds.shape[0]
        self._make_room(n, mod)
        new = Entries.new(self.seen, layout(n, self.rotary.dims, grid) + next_position(self.cache.entries.pos),
                          mod, self.chunks)
        self._forward(new, ids, embeds)
        self.cache.trim()  # local (sliding-window) layers keep only what their next token can see
        self.seen += n
        self.chunks += 1

    def _make_room(self, incoming: int, mod: int) -> None:
        keep = self.policy.select(self.cache.entries, incoming, mod)
        if keep is None:
            return
        drop = keep_all_but(self.cache.held, keep)
        if drop.numel():
            self.policy.evict(self, drop)
        self.cache.keep(keep)
        if self.cache.held + incoming > self.budget:  # a policy bug, never the caller's
            raise RuntimeError(f"{self.policy.name} kept {self.cache.held} entries with {incoming} incoming "
                               f"(budget {self.budget})")

    def _forward(self, new: Entries, ids=None, embeds=None, shift_from: int = 0, shift: int = 0) -> None:
        position_ids = self.cache.begin(new, shift_from=shift_from, shift=shift).to(self.device)
        inputs = {"input_ids": ids[None].to(self.device)} if ids is not None else {
            "inputs_embeds": embeds[None].to(self.device, self.dtype)}
        try:
            out = self.model(**inputs, position_ids=position_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        except BaseException:
            self.cache.abort()
            raise
        self.cache.commit()
        self.last_logits = out.logits[0, -1].float()

    # ------------------------------------------------------------------ questions
    @torch.no_grad()
    def ask(self, question: str, *, max_new_tokens: int = 32, keep_answer: bool = False, prefix: str = "",
            template: str | None = None) -> str:
        """Answer ``question`` greedily from what the stream holds; returns the answer text.

        ``template`` (default: the stream's, ``"\\n\\nQuestion: {question}\\nAnswer:"``; ``"chat"`` uses the
        tokenizer's chat template) writes the question; ``prefix`` starts the answer. The question and answer
        are removed afterwards unless ``keep_answer=True`` (see the module docstring).
        """
        self._check_open()
        if not isinstance(question, str) or not question.strip():
            raise StreamInputError("ask needs a non-empty question string")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise StreamInputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        ids = torch.as_tensor(self.tokenizer(self._render(question, template) + prefix,
                                             add_special_tokens=False)["input_ids"], dtype=torch.long)
        if keep_answer:
            need = ids.numel() + max_new_tokens
            if need > self.policy.max_chunk(TEXT):
                raise StreamInputError(f"with keep_answer=True the question and answer ({need} tokens) must fit the "
                                       f"policy's room for new text ({self.policy.max_chunk(TEXT)})")
            self._make_room(need, TEXT)
        mark, seen = self.cache.held, self.seen
        shift_from, shift = self.policy.begin_ask(self)
        answer: list[int] = []
        try:
            new = Entries.new(seen, layout(ids.numel(), self.rotary.dims) + next_position(self.cache.entries.pos),
                              TEXT, self.chunks)
            self._forward(new, ids, None, shift_from, shift)
            fed = ids.numel()
            eos = self._eos_ids()
            for step in range(max_new_tokens):
                token = int(self.last_logits.argmax())
                if token in eos:
                    break
                answer.append(token)
                if step == max_new_tokens - 1 and not keep_answer:
                    break
                new = Entries.new(seen + fed, layout(1, self.rotary.dims) + next_position(self.cache.entries.pos),
                                  TEXT, self.chunks)
                self._forward(new, torch.tensor([token]), None, shift_from, shift)
                fed += 1
        finally:
            self.policy.end_ask(self)
            if keep_answer:
                self.seen = seen + (self.cache.held - mark)
                self.chunks += 1
                self.cache.trim()
            else:
                self.cache.truncate(mark)
        return self.tokenizer.decode(answer, skip_special_tokens=True).strip()

    def _render(self, question: str, template: str | None) -> str:
        template = self.template if template is None else template
        if template == "chat":
            if not getattr(self.tokenizer, "chat_template", None):
                raise StreamInputError("template='chat' needs a tokenizer with a chat template")
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True)
        if "{question}" not in template:
            raise StreamInputError("a question template must contain '{question}' (or be 'chat')")
        return template.replace("{question}", question)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.tokenizer, "eos_token_id", None),
                       getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(x) for x in source)
        return ids

    # ------------------------------------------------------------------ reports
    @property
    def held_tokens(self) -> int:
        """KV entries held per layer (at most ``budget`` between calls; 0 once closed)."""
        return 0 if self.cache is None else self.cache.held

    def nbytes(self) -> int:
        """Bytes held in RAM by the stream: keys and values of every layer, per-entry metadata, ReKV summaries.

        Blocks offloaded by ReKV live in its store (bounded by the store's own budgets): ``stats()["store_bytes"]``.
        """
        if self.cache is None:
            return 0
        return self.cache.nbytes() + self.policy.nbytes()

    def positions(self) -> torch.Tensor:
        """Current RoPE positions of the held entries (``[N]``, or ``[3, N]`` with M-RoPE)."""
        self._check_open()
        return self.cache.entries.pos.clone()

    def stats(self) -> dict:
        self._check_open()
        pos = self.cache.entries.pos
        return {"policy": self.policy.name, "budget": self.budget, "seen_tokens": self.seen,
                "held_tokens": self.cache.held, "max_position": int(pos.max()) if pos.numel() else -1,
                "nbytes": self.nbytes(), **self.policy.stats()}

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self.closed:
            raise StreamClosedError("this stream is closed; open a new one with infercache.stream.open(...)")

    def close(self) -> None:
        """Free the cache and the policy's store; restore the model's attention implementation. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.policy.close()
        self.cache = None  # drop every tensor
        _detach(self.model)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            if not self.closed:
                self.close()
        except Exception:
            pass


def open(model, tokenizer, policy: str | StreamPolicy = "streaming_llm", budget: int = 2048,  # noqa: A001
         **options) -> Stream:
    """Open a stream over ``model``: ``policy`` is ``"streaming_llm"``, ``"streaming_vlm"``, ``"rekv"`` or a
    :class:`StreamPolicy`; ``budget`` is the number of KV entries held per layer. Other options: ``chunk_size``,
    ``template``, and the policy's own (``sinks``, ``block_size``, ``topk``, ``store``, ``merge_frames``, ...)."""
    return Stream(model, tokenizer, policy, budget, **options)


def _attach(model) -> None:
    """Switch the model to the stream attention function (counted, so several streams may share a model)."""
    register()
    users = getattr(model, "_infercache_stream_users", 0)
    if users == 0:
        model._infercache_stream_previous = model.config._attn_implementation
        if model.config._attn_implementation != ATTN_NAME:
            model.set_attn_implementation(ATTN_NAME)
    model._infercache_stream_users = users + 1


def _detach(model) -> None:
    users = getattr(model, "_infercache_stream_users", 1) - 1
    model._infercache_stream_users = max(users, 0)
    if users <= 0:
        previous = getattr(model, "_infercache_stream_previous", None)
        if previous and previous != ATTN_NAME:
            model.set_attn_implementation(previous)
