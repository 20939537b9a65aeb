"""Variable tracking (RULER ``vt``): follow a chain of assignments ``VAR A = 12345``, ``VAR B = VAR A``, ...

The question gives the number; the answer is every variable in its chain (scored by recall). Distractor
chains (``n_chains - 1``) carry other numbers. Statements of a chain appear in order through the text.
With RULER's default of one chain, listing every ``VAR`` in the text is enough; ``n_chains=2`` makes the
model tell chains apart (Gemma-3-270M fails that at 1K).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Sample, Task
from .context import build_context
from .haystack import Needle
from .vocab import numbers, variable_names


@dataclass
class VariableTracking(Task):
    """``n_hops`` copies after the first assignment, so each chain has ``n_hops + 1`` variables."""

    filler: str = "literary"
    n_chains: int = 1
    n_hops: int = 2
    value_digits: int = 5

    name = "variable_tracking"
    scoring = "recall"
    max_new_tokens = 24

    def make_sample(self, tokenizer, length_tokens, rng, depth) -> Sample:
        if self.n_chains < 1 or self.n_hops < 1:
            raise ValueError("variable_tracking needs n_chains >= 1 and n_hops >= 1")
        per_chain = self.n_hops + 1
        names = variable_names(rng, self.n_chains * per_chain)
        values = numbers(rng, self.n_chains, self.value_digits)
        chains = [names[c * per_chain : (c + 1) * per_chain] for c in range(self.n_chains)]
        needles = []
        for c, (chain, value) in enumerate(zip(chains, values)):
            first = depth if c == 0 else rng.random() * 0.5
            # The chain's statements go in order, from its first depth to somewhere near the end.
            last = first + (1.0 - first) * rng.uniform(0.6, 1.0)
            step = (last - first) / self.n_hops
            needles.append(Needle(f"VAR {chain[0]} = {value}.", first))
            for hop in range(1, per_chain):
                needles.append(Needle(f"VAR {chain[hop]} = VAR {chain[hop - 1]}.", first + hop * step))
        built = build_context(
            tokenizer, length_tokens, needles, filler=self.filler, rng=rng,
            preamble="Memorize and track the chain of variable assignments hidden in the following text.",
        )
        value = values[0]
        return self._sample(
            context=built.text,
            question=f"Which variables are assigned the value {value}, directly or through other variables?",
            answers=chains[0],
            # "VAR" cues the answer's format (every variable is written "VAR NAME"), not its content.
            answer_prefix=f"The variables assigned the value {value} are: VAR",
            length_tokens=length_tokens, context_tokens=built.n_tokens, depth=depth,
            metadata={"needle_depths": built.needle_depths[:per_chain], "chains": chains, "values": values,
                      "filler": self.filler},
        )
