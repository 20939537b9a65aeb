"""Deterministic, offline long-context tasks for ``infercache bench`` (RULER style).

>>> from infercache.bench.tasks import get_task, render_prompt
>>> task = get_task("niah_single")
>>> samples = task.generate(tokenizer, length_tokens=1024, n_samples=5, seed=0)
>>> prompt = render_prompt(samples[0], tokenizer, protocol="question_agnostic")
>>> task.score(" 71432.", samples[0])

Every context is built from shipped or standard-library text (see :mod:`.haystack`), measured in the
given tokenizer's tokens, and fully determined by the task options, tokenizer, length and seed.
"""

from __future__ import annotations

import dataclasses

from .base import Sample, Task
from .fitting import LengthFitError
from .haystack import FILLERS, UnknownFillerError
from .multihop import MultiHop
from .niah import NiahMultiKey, NiahMultiQuery, NiahMultiValue, NiahSingle
from .prompts import PROTOCOLS, RenderedPrompt, render_prompt
from .variable_tracking import VariableTracking
from .words import CommonWords, FrequentWords

__all__ = [
    "FILLERS",
    "PROTOCOLS",
    "TASKS",
    "LengthFitError",
    "RenderedPrompt",
    "Sample",
    "Task",
    "UnknownFillerError",
    "UnknownTaskError",
    "get_task",
    "render_prompt",
]

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        NiahSingle(),
        NiahMultiKey(),
        NiahMultiValue(),
        NiahMultiQuery(),
        VariableTracking(),
        CommonWords(),
        FrequentWords(),
        MultiHop(),
    )
}


class UnknownTaskError(KeyError):
    """Raised by :func:`get_task` for a name that is not in :data:`TASKS`."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def get_task(name: str, **options) -> Task:
    """The registered task ``name``; keyword ``options`` (e.g. ``filler="repeat"``) give a variant."""
    try:
        task = TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
    if not options:
        return task
    known = {f.name for f in dataclasses.fields(task)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"task {name!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(sorted(known))}"
        )
    if "filler" in options and options["filler"] not in FILLERS:
        raise UnknownFillerError(f"unknown filler {options['filler']!r}; choose one of {', '.join(FILLERS)}")
    return dataclasses.replace(task, **options)
