"""Aggregation tasks (RULER ``cwe`` and ``fwe``): find the most frequent words of a long list or text.

The whole context is the word list (no haystack filler); its length is fitted by the number of items.
Both are scored by recall of the top words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .base import Sample, Task
from .fitting import DEFAULT_TOLERANCE, count_tokens, fit_to_length
from .vocab import coded_words, literary_words

PREAMBLE_SEPARATOR = "\n\n"


def _fit_items(tokenizer, length_tokens: int, head: str, render_items, what: str) -> tuple[str, int, object]:
    """Fit ``head`` + the rendered list to ``length_tokens``; ``render_items(n)`` returns ``(text, info)``."""

    def render(n_items: int):
        text, info = render_items(n_items)
        return head + text, info

    (text, info), n_tokens = fit_to_length(
        render, lambda r: count_tokens(tokenizer, r[0]), length_tokens,
        max_units=length_tokens, tolerance=DEFAULT_TOLERANCE, what=what,
    )
    return text, n_tokens, info


@dataclass
class CommonWords(Task):
    """A numbered list where ``n_common`` words appear many times and all others ``uncommon_freq`` times."""

    n_common: int = 5
    common_share: float = 0.3
    min_common_freq: int = 4
    uncommon_freq: int = 2

    name = "common_words"
    scoring = "recall"
    uses_depth = False
    max_new_tokens = 40

    def make_sample(self, tokenizer, length_tokens, rng, depth) -> Sample:
        if self.min_common_freq <= self.uncommon_freq:
            raise ValueError("min_common_freq must be larger than uncommon_freq")
        pool = list(literary_words())
        rng.shuffle(pool)
        common, uncommon_pool = pool[: self.n_common], pool[self.n_common :]
        order_seed = rng.random()

        def render_items(n_items: int):
            common_freq = max(self.min_common_freq, round(n_items * self.common_share / self.n_common))
            n_uncommon_items = max(0, n_items - common_freq * self.n_common)
            n_distinct = -(-n_uncommon_items // self.uncommon_freq)
            if n_distinct > len(uncommon_pool):
                raise ValueError(
                    f"common_words needs {n_distinct} distinct words; the vocabulary has {len(uncommon_pool)}"
                )
            items = [w for w in common for _ in range(common_freq)]
            items += [w for w in uncommon_pool[:n_distinct] for _ in range(self.uncommon_freq)][:n_uncommon_items]
            random.Random(f"{order_seed}/{n_items}").shuffle(items)
            return "\n".join(f"{i}. {w}" for i, w in enumerate(items, 1)), common_freq

        text, n_tokens, common_freq = _fit_items(
            tokenizer, length_tokens,
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often." + PREAMBLE_SEPARATOR,
            render_items, "a common-words list",
        )
        k = self.n_common
        return self._sample(
            context=text, question=f"What are the {k} most common words in the above list?", answers=common,
            answer_prefix=f"The top {k} words that appear most often in the list are:",
            length_tokens=length_tokens, context_tokens=n_tokens, depth=None,
            metadata={"common_freq": common_freq, "uncommon_freq": self.uncommon_freq},
        )


@dataclass
class FrequentWords(Task):
    """Coded (nonsense) words with Zipf-distributed counts; the answer is the ``n_top`` most frequent."""

    n_top: int = 3
    alpha: float = 2.0
    words_per_line: int = 12

    name = "frequent_words"
    scoring = "recall"
    uses_depth = False
    max_new_tokens = 24

    def make_sample(self, tokenizer, length_tokens, rng, depth) -> Sample:
        words_seed, order_seed = rng.random(), rng.random()

        def render_items(n_items: int):
            counts = zipf_counts(max(n_items, 4 * self.n_top), self.alpha, self.n_top)
            vocab = coded_words(random.Random(words_seed), len(counts))
            items = [w for w, c in zip(vocab, counts) for _ in range(c)]
            random.Random(f"{order_seed}/{n_items}").shuffle(items)
            lines = [" ".join(items[i : i + self.words_per_line]) for i in range(0, len(items), self.words_per_line)]
            return "\n".join(lines), (vocab[: self.n_top], counts[: self.n_top + 1])

        text, n_tokens, (top, top_counts) = _fit_items(
            tokenizer, length_tokens,
            "Read the following coded text and track the frequency of each coded word. "
            f"Find the {_count_word(self.n_top)} most frequently appearing coded words." + PREAMBLE_SEPARATOR,
            render_items, "a frequent-words text",
        )
        k = _count_word(self.n_top)
        return self._sample(
            context=text, question=f"What are the {k} most frequently appearing words in the above coded text?",
            answers=list(top),
            answer_prefix=f"According to the coded text above, the {k} most frequently appearing words are:",
            length_tokens=length_tokens, context_tokens=n_tokens, depth=None,
            metadata={"top_counts": list(top_counts)},
        )


def zipf_counts(n_items: int, alpha: float, n_top: int) -> list[int]:
    """Counts for ranks 1..V (V = n_items // 4) following ``rank ** -alpha``, each >= 1.

    The first ``n_top + 1`` counts are strictly decreasing, so the top words are unambiguous.
    """
    n_distinct = max(n_top + 1, n_items // 4)
    weights = [rank**-alpha for rank in range(1, n_distinct + 1)]
    total = sum(weights)
    counts = [max(1, round(n_items * w / total)) for w in weights]
    for i in range(n_top, 0, -1):
        counts[i - 1] = max(counts[i - 1], counts[i] + 1)
    return counts


def _count_word(n: int) -> str:
    return {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}.get(n, str(n))
