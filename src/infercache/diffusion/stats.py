"""Per-call statistics: which steps were computed or skipped, per CFG branch, and why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CallStats:
    """What the cache did during one pipeline call (one denoising trajectory).

    ``skip_mask[branch][i]`` is ``True`` when step ``i`` of that branch reused the cache. ``reasons`` says why
    each decision was taken: ``warmup``, ``last``, ``empty`` (nothing cached yet), ``max-skips``,
    ``no-estimate``, ``threshold`` (distance over the threshold: computed), ``cfg-sync`` (the other half of a
    CFG batch had to compute) or ``skip``.
    """

    policy: str
    num_steps: int | None
    skip_mask: dict[str, list[bool]] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def add(self, branch: str, skipped: bool, reason: str) -> None:
        self.skip_mask.setdefault(branch, []).append(skipped)
        self.reasons.setdefault(branch, []).append(reason)

    @property
    def steps_total(self) -> int:
        """Denoising steps seen in this call."""
        return max((len(m) for m in self.skip_mask.values()), default=0)

    @property
    def steps_computed(self) -> int:
        """Steps on which at least one branch ran the cached part of the model."""
        n = self.steps_total
        masks = list(self.skip_mask.values())
        return sum(1 for i in range(n) if any(i < len(m) and not m[i] for m in masks))

    @property
    def steps_skipped(self) -> int:
        return self.steps_total - self.steps_computed

    @property
    def compute_fraction(self) -> float:
        """Computed branch-steps over all branch-steps (1.0 = no saving)."""
        total = sum(len(m) for m in self.skip_mask.values())
        return sum(not s for m in self.skip_mask.values() for s in m) / total if total else 1.0

    def summary(self) -> str:
        lines = [f"{self.policy}: {self.steps_computed}/{self.steps_total} steps computed"]
        for branch, mask in self.skip_mask.items():
            lines.append(f"  {branch:>7}: " + "".join("." if s else "C" for s in mask))
        return "\n".join(lines)
