"""Needle-in-a-haystack tasks (RULER style): passkey, multi-key, multi-value and multi-query retrieval.

Needles carry numbers (``value_digits`` digits, 5 by default where RULER uses 7: the reference models
are small). The literary filler has no digits, so the needle's number is the only one in the context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .base import Sample, Task
from .context import build_context
from .haystack import Needle
from .vocab import key_phrases, numbers

MAGIC_PREAMBLE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)


def _other_depths(rng: random.Random, count: int) -> list[float]:
    """Depths for the needles the question is not about: spread at random over the haystack."""
    return [rng.random() for _ in range(count)]


@dataclass
class NiahSingle(Task):
    """Passkey retrieval: one number hidden in the haystack; the question asks for it."""

    filler: str = "literary"
    value_digits: int = 5

    name = "niah_single"
    max_new_tokens = 12

    def make_sample(self, tokenizer, length_tokens, rng, depth) -> Sample:
        (value,) = numbers(rng, 1, self.value_digits)
        needle = Needle(f"The pass key is {value}. Remember it. {value} is the pass key.", depth)
        built = build_context(
            tokenizer, length_tokens, [needle], filler=self.filler, rng=rng,
            preamble="There is an important pass key hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about the pass key afterwards.",
        )
        return self._sample(
            context=built.text, question="What is the pass key number?", answers=[value],
            answer_prefix="The pass key number is", length_tokens=length_tokens, context_tokens=built.n_tokens,
            depth=depth, metadata={"needle_depths": built.needle_depths, "filler": self.filler},
        )


@dataclass
class NiahMultiKey(Task):
    """Several ``key: number`` needles; the question names one key (the others are distractors)."""

    filler: str = "literary"
    value_digits: int = 5
    n_keys: int = 4

    name = "niah_multikey"
    max_new_tokens = 12

    def make_sample(self, tokenizer, length_tokens, rng, depth) -> Sample:
        keys = key_phrases(rng, self.n_keys)
        values = numbers(rng, self.n_keys, self.value_digits)
        depths = [depth, *_other_depths(rng, self.n_keys - 1)]
        needles = [Needle(f"The special magic number for {k} is: {v}.", d) for k, v, d in zip(keys, values, depths)]
        built = build_context(tokenizer, length_tokens, needles, preamble=MAGIC_PREAMBLE, filler=self.filler, rng=rng)
        key = keys[0]
        return self._sample(
            context=built.text,
            question=f"What is the special magic number for {key} mentioned in the provided text?",
            answers=[values[0]],
            answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
            length_tokens=length_tokens, context_tokens=built.n_tokens, depth=depth,
            metadata={"needle_depths": built.needle_depths, "keys": keys, "values": values, "filler": self.filler},
        )


@dataclass
class NiahMultiValue(Task):
    """One key with several numbers hidden at different places; the answer is all of them (recall)."""

    filler: str = "literary"
    value_digits: int = 5
    n_values: int = 4

    name = "niah_multivalue"
    scoring = "recall"
    max_new_tokens = 40

    def make_sample(self, tokenizer, length_tokens, rng, depth) -> Sample:
        (key,) = key_phrases(rng, 1)
        values = numbers(rng, self.n_values, self.value_digits)
        depths = [depth, *_other_depths(rng, self.n_values - 1)]
        needles = [Needle(f"One of the special magic numbers for {key} is: {v}.", d) for v, d in zip(values, depths)]
        built = build_context(tokenizer, length_tokens, needles, preamble=MAGIC_PREAMBLE, filler=self.filler, rng=rng)
        return self._sample(
            context=built.text,
            question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
            answers=values,
            answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
            length_tokens=length_tokens, context_tokens=built.n_tokens, depth=depth,
            metadata={"needle_depths": built.needle_depths, "key": key, "filler": self.filler},
        )


@dataclass
class NiahMultiQuery(Task):
    """Several ``key: number`` needles; the question asks for ``n_queries`` of them at once (recall)."""

    filler: str = "literary"
    value_digits: int = 5
    n_keys: int = 4
    n_queries: int = 2

    name = "niah_multiquery"
    scoring = "recall"
    max_new_tokens = 30

    def make_sample(self, tokenizer, length_tokens, rng, depth) -> Sample:
        if not 1 <= self.n_queries <= self.n_keys:
            raise ValueError(f"n_queries must be within [1, n_keys={self.n_keys}], got {self.n_queries}")
        keys = key_phrases(rng, self.n_keys)
        values = numbers(rng, self.n_keys, self.value_digits)
        depths = [depth, *_other_depths(rng, self.n_keys - 1)]
        needles = [Needle(f"The special magic number for {k} is: {v}.", d) for k, v, d in zip(keys, values, depths)]
        built = build_context(tokenizer, length_tokens, needles, preamble=MAGIC_PREAMBLE, filler=self.filler, rng=rng)
        asked = keys[: self.n_queries]
        listed = _join_and(asked)
        return self._sample(
            context=built.text,
            question=f"What are all the special magic numbers for {listed} mentioned in the provided text?",
            answers=values[: self.n_queries],
            answer_prefix=f"The special magic numbers for {listed} mentioned in the provided text are",
            length_tokens=length_tokens, context_tokens=built.n_tokens, depth=depth,
            metadata={"needle_depths": built.needle_depths, "keys": keys, "values": values, "filler": self.filler},
        )


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
