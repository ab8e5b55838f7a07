"""Counters for speculative decoding: acceptance per draft position, tau, throughput.

Per draft position i (0-based) over all rounds:
  proposed[i]  rounds in which the drafter proposed a token at position i
  reached[i]   rounds in which position i was proposed and drafts 0..i-1 were all accepted
  accepted[i]  rounds in which the draft at position i was accepted (implies reached)
so alpha_per_position[i] = accepted[i] / reached[i] is the acceptance rate at position i given the
verifier got there, and the overall acceptance rate is accepted / proposed (drafts thrown away
after an earlier rejection count as not accepted, as in vLLM's "draft acceptance rate").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


@dataclass
class SpecStats:
    proposed: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    target_calls: int = 0  # target forwards (one per round; one per token for the baseline)
    drafter_calls: int = 0  # drafter forwards
    new_tokens: int = 0  # tokens emitted
    wall_time_s: float = 0.0

    @classmethod
    def empty(cls, gamma: int) -> "SpecStats":
        return cls(proposed=[0] * gamma, reached=[0] * gamma, accepted=[0] * gamma)

    def record_round(self, num_drafts: int, num_accepted: int) -> None:
        """Count one verify step with `num_drafts` real drafts of which the first `num_accepted` passed."""
        for i in range(num_drafts):
            self.proposed[i] += 1
            self.reached[i] += i <= num_accepted
            self.accepted[i] += i < num_accepted

    # ---- derived numbers ----
    @property
    def gamma(self) -> int:
        return len(self.proposed)

    @property
    def alpha_per_position(self) -> list[float]:
        """accepted[i] / reached[i]; nan for a position never reached."""
        return [_ratio(a, r) for a, r in zip(self.accepted, self.reached)]

    @property
    def alpha(self) -> float:
        """Accepted drafts / proposed drafts."""
        return _ratio(sum(self.accepted), sum(self.proposed))

    @property
    def alpha_reached(self) -> float:
        """Accepted drafts / drafts the verifier looked at: an estimate of alpha = 1 - TVD(p, q)."""
        return _ratio(sum(self.accepted), sum(self.reached))

    @property
    def tau(self) -> float:
        """Tokens emitted per target forward."""
        return _ratio(self.new_tokens, self.target_calls)

    @property
    def tokens_per_second(self) -> float:
        return _ratio(self.new_tokens, self.wall_time_s)

    # ---- aggregation over prompts ----
    def update(self, other: "SpecStats") -> "SpecStats":
        """Add `other`'s counts into self (in place); per-position lists are padded to the longer gamma."""
        n = max(self.gamma, other.gamma)
        for name in ("proposed", "reached", "accepted"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, [
                (mine[i] if i < len(mine) else 0) + (theirs[i] if i < len(theirs) else 0) for i in range(n)
            ])
        self.target_calls += other.target_calls
        self.drafter_calls += other.drafter_calls
        self.new_tokens += other.new_tokens
        self.wall_time_s += other.wall_time_s
        return self

    def __add__(self, other: "SpecStats") -> "SpecStats":
        return SpecStats().update(self).update(other)

    def __radd__(self, other):  # lets sum(list_of_stats) work
        return self if other == 0 else NotImplemented

    def to_dict(self) -> dict:
        nan_to_none = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731 (JSON-safe)
        return {
            "gamma": self.gamma,
            "proposed": list(self.proposed),
            "reached": list(self.reached),
            "accepted": list(self.accepted),
            "target_calls": self.target_calls,
            "drafter_calls": self.drafter_calls,
            "new_tokens": self.new_tokens,
            "wall_time_s": self.wall_time_s,
            "alpha_per_position": [nan_to_none(a) for a in self.alpha_per_position],
            "alpha": nan_to_none(self.alpha),
            "alpha_reached": nan_to_none(self.alpha_reached),
            "tau": nan_to_none(self.tau),
            "tokens_per_second": nan_to_none(self.tokens_per_second),
        }
