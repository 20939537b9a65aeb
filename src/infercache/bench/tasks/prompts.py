"""Render a :class:`~.base.Sample` into token ids for a model, in either compression protocol.

* ``question_aware``: the whole prompt (context, question, answer prefix) is the part to prefill and
  compress; nothing is appended afterwards.
* ``question_agnostic``: the context part is prefilled and compressed first, then the question part
  (question, end of the user turn, generation prompt, answer prefix) is appended.

Both come from ONE tokenization of the full prompt text, split at the first token that starts at or
after the question, so ``context_ids + question_ids`` is identical in both protocols and equal to the
tokenization of the full prompt.

Formats: ``chat`` (the tokenizer's chat template; the question ends the user turn and the answer prefix
follows the generation prompt) for instruction models such as SmolLM2, and ``completion``
(``context\\n\\nQuestion: ...\\nAnswer: <prefix>``) for base models such as Gemma-3-270M. ``auto`` picks
``chat`` when the tokenizer has a chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Sample

Protocol = Literal["question_aware", "question_agnostic"]
PromptFormat = Literal["auto", "chat", "completion"]
PROTOCOLS: tuple[str, ...] = ("question_aware", "question_agnostic")
FORMATS: tuple[str, ...] = ("auto", "chat", "completion")
QUESTION_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class RenderedPrompt:
    """Token ids of a rendered sample.

    ``context_ids`` is what the engine prefills (and compresses); ``question_ids`` is appended after
    compression (empty under ``question_aware``). ``text`` is the full prompt; the model's answer
    continues it directly (it ends with the answer prefix).
    """

    protocol: str
    format: str
    text: str
    context_ids: list[int]
    question_ids: list[int]
    question_char: int

    @property
    def input_ids(self) -> list[int]:
        """The full prompt: ``context_ids + question_ids``."""
        return self.context_ids + self.question_ids


def resolve_format(tokenizer, prompt_format: PromptFormat = "auto") -> str:
    """``chat`` or ``completion`` for this tokenizer."""
    if prompt_format not in FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose one of {', '.join(FORMATS)}")
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "completion"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
    return prompt_format


def prompt_text(sample: Sample, tokenizer, prompt_format: PromptFormat = "auto") -> tuple[str, int, bool]:
    """The full prompt text, the character offset where the question part starts, and whether the text
    already holds its special tokens (chat templates do)."""
    fmt = resolve_format(tokenizer, prompt_format)
    if fmt == "chat":
        user = sample.context + QUESTION_SEPARATOR + sample.question
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        question_char = rendered.rfind(sample.question)
        if question_char < 0 or rendered.find(sample.context) < 0:
            raise ValueError("the chat template changed the context or question text; cannot split the prompt")
        return rendered + sample.answer_prefix, question_char, True
    head = sample.context + QUESTION_SEPARATOR
    text = f"{head}Question: {sample.question}\nAnswer: {sample.answer_prefix}"
    return text, len(head), False


def render_prompt(
    sample: Sample,
    tokenizer,
    protocol: Protocol = "question_aware",
    prompt_format: PromptFormat = "auto",
) -> RenderedPrompt:
    """Tokenize ``sample`` for ``tokenizer`` and split it for ``protocol`` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    fmt = resolve_format(tokenizer, prompt_format)
    text, question_char, has_specials = prompt_text(sample, tokenizer, fmt)
    encoded = tokenizer(text, add_special_tokens=not has_specials, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = encoded["offset_mapping"]
    split = next(
        (i for i, (start, end) in enumerate(offsets) if start >= question_char and end > start), len(ids)
    )
    if protocol == "question_aware":
        return RenderedPrompt(protocol, fmt, text, ids, [], question_char)
    return RenderedPrompt(protocol, fmt, text, ids[:split], ids[split:], question_char)
