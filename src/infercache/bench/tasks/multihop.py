"""Two-hop question over synthetic facts: "X lives in T." + "T is famous for S." -> what is X's town famous for?

Towns are invented, so no model knows the answer beforehand. Distractor people and towns make both hops
necessary: every person lives somewhere and every town is famous for something.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Sample, Task
from .context import build_context
from .haystack import Needle
from .vocab import FIRST_NAMES, SPECIALTIES, TOWNS


@dataclass
class MultiHop(Task):
    """``n_people`` (person, town, specialty) triples; the question is about the first person."""

    filler: str = "literary"
    n_people: int = 3

    name = "multihop"
    max_new_tokens = 12

    def make_sample(self, tokenizer, length_tokens, rng, depth) -> Sample:
        if not 1 <= self.n_people <= min(len(FIRST_NAMES), len(TOWNS), len(SPECIALTIES)):
            raise ValueError(f"n_people out of range: {self.n_people}")
        people = rng.sample(FIRST_NAMES, self.n_people)
        towns = rng.sample(TOWNS, self.n_people)
        specialties = rng.sample(SPECIALTIES, self.n_people)
        needles = []
        for i, (person, town, specialty) in enumerate(zip(people, towns, specialties)):
            needles.append(Needle(f"{person} lives in the town of {town}.", depth if i == 0 else rng.random()))
            needles.append(Needle(f"The town of {town} is famous for its {specialty}.", rng.random()))
        built = build_context(
            tokenizer, length_tokens, needles, filler=self.filler, rng=rng,
            preamble="Some facts about people and towns are hidden within the following text. "
            "Memorize them. I will ask you a question that combines them afterwards.",
        )
        person = people[0]
        return self._sample(
            context=built.text,
            question=f"What is the town where {person} lives famous for?",
            answers=[specialties[0]],
            answer_prefix=f"The town where {person} lives is famous for its",
            length_tokens=length_tokens, context_tokens=built.n_tokens, depth=depth,
            metadata={"needle_depths": built.needle_depths[:2], "people": people, "towns": towns,
                      "specialties": specialties, "filler": self.filler},
        )
