"""The common shape of every benchmark task: :class:`Sample` and the :class:`Task` interface."""

from __future__ import annotations

import dataclasses
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..metrics import contains_match, recall_match

Scoring = Literal["contains", "recall"]
GOLDEN_RATIO_FRACTION = (math.sqrt(5) - 1) / 2


@dataclass
class Sample:
    """One generated example.

    ``context`` is the long part a KV cache holds (and a press compresses); ``question`` and
    ``answer_prefix`` come after it (see :mod:`.prompts`). ``length_tokens`` is the requested context
    length and ``context_tokens`` the measured one, both in the generating tokenizer's tokens.
    ``depth`` is the requested depth (0..1) of the needle the question is about, or ``None``.
    """

    task: str
    sample_id: str
    seed: int
    context: str
    question: str
    answers: list[str]
    answer_prefix: str
    length_tokens: int
    context_tokens: int
    depth: float | None
    max_new_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Task(ABC):
    """A deterministic task generator plus its scorer.

    Subclasses are dataclasses whose fields are the task's options (needle counts, filler, ...), so
    ``dataclasses.replace(task, filler="repeat")`` gives a variant.
    """

    name: ClassVar[str]
    scoring: ClassVar[Scoring] = "contains"
    uses_depth: ClassVar[bool] = True
    max_new_tokens: ClassVar[int] = 16

    def generate(
        self, tokenizer, length_tokens: int, n_samples: int, seed: int = 0, depth: float | None = None
    ) -> list[Sample]:
        """``n_samples`` samples whose contexts are ``length_tokens`` long (±2%) in ``tokenizer``'s tokens.

        The same (options, tokenizer, length, seed) always gives the same samples, and sample ``i`` does
        not depend on ``n_samples``. ``depth`` fixes where the queried needle goes (0 = start of the
        haystack, 1 = end); ``None`` spreads the samples over all depths (a golden-ratio sequence).
        """
        if n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {n_samples}")
        if depth is not None:
            if not self.uses_depth:
                raise ValueError(f"task {self.name!r} has no needle, so depth does not apply (got {depth})")
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth must be within [0, 1], got {depth}")
        start = random.Random(f"{self.name}/{seed}/depths").random()
        samples = []
        for index in range(n_samples):
            rng = random.Random(f"{self.name}/{seed}/{index}")
            sample_depth = None
            if self.uses_depth:
                sample_depth = depth if depth is not None else (start + index * GOLDEN_RATIO_FRACTION) % 1.0
            sample = self.make_sample(tokenizer, length_tokens, rng, sample_depth)
            sample.sample_id = f"{self.name}-{length_tokens}-{seed}-{index}"
            sample.seed = seed
            sample.metadata.setdefault("index", index)
            samples.append(sample)
        return samples

    @abstractmethod
    def make_sample(self, tokenizer, length_tokens: int, rng: random.Random, depth: float | None) -> Sample:
        """Build one sample from its own random generator (``sample_id`` and ``seed`` are set by the caller)."""

    def score(self, prediction: str, sample: Sample) -> float:
        """1.0/0.0 for ``contains`` tasks; the fraction of answers found for ``recall`` tasks."""
        if self.scoring == "recall":
            return recall_match(prediction, sample.answers)
        return contains_match(prediction, sample.answers)

    def _sample(self, **fields: Any) -> Sample:
        """A :class:`Sample` of this task with id and seed left for :meth:`generate` to fill in."""
        fields.setdefault("max_new_tokens", self.max_new_tokens)
        return Sample(task=self.name, sample_id="", seed=0, **fields)
