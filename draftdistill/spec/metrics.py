"""Counters for speculative decoding: acceptance per draft position, tau, accept length, throughput.

Per draft position i (0-based), summed over rounds:
  proposed[i]  drafts at position i put to the verifier, i.e. all earlier drafts in the block were
               accepted (a draft behind a rejection is never looked at, so it is not counted here)
  accepted[i]  drafts at position i that were accepted
so alpha_per_position[i] = accepted[i] / proposed[i] is P(accept position i | reached it), and the
overall alpha = sum(accepted) / sum(proposed) estimates 1 - TVD(p, q) averaged over the text (for
chains; with draft trees, position i is depth i + 1: proposed when the accepted path reached a
node at depth i that has children, accepted when one of them is accepted).
Drafts thrown away behind a rejection still cost a drafter forward: drafter_calls - sum(proposed).

Two per-step numbers, both reported:
  tau            new_tokens / target_calls: tokens per target forward, every forward counted (the
                 EAGLE-3 prefill, which drafts nothing, and a last forward left no room to draft).
                 What the target's cost per token is.
  accept_length  1 + sum(accepted) / verify_steps, verify_steps = target forwards that verified at
                 least one draft: the peers' number (SGLang's spec_accept_length, vLLM's mean
                 acceptance length), the same for every drafter kind, so an EAGLE-3 head is not
                 charged for its prefill against an LM drafter. A target as its own drafter at
                 gamma = k, greedy, gives exactly k + 1 (when every round has room for k drafts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum, padding the shorter list with zeros (stats from runs with different gamma)."""
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


@dataclass
class SpecStats:
    proposed: list[int] = field(default_factory=list)  # per draft position, see the module docstring
    accepted: list[int] = field(default_factory=list)
    target_calls: int = 0  # target forwards, one per round (the tree decoder feeds the prompt in a causal
    #                        forward of its own first); one per token for the baseline
    verify_steps: int = 0  # target forwards that verified at least one draft (not the EAGLE-3 prefill)
    drafter_calls: int = 0  # drafter forwards (one per drafted token; one per depth for trees)
    drafts_scored: int = 0  # draft tokens the target scored (a round's chain or tree): its extra work
    new_tokens: int = 0  # tokens emitted
    seconds: float = 0.0  # wall time spent generating

    @classmethod
    def empty(cls, gamma: int) -> "SpecStats":
        return cls(proposed=[0] * gamma, accepted=[0] * gamma)

    def record_round(self, num_drafts: int, num_accepted: int) -> None:
        """Count one target forward over `num_drafts` real drafts of which the first `num_accepted` passed
        (for trees: the drafts on the verified path, see the module docstring); with no draft it is no
        verify step."""
        self.verify_steps += num_drafts > 0
        # The verifier looks at drafts 0..n (the n accepted ones and the one it rejected), never past it.
        for i in range(min(num_accepted + 1, num_drafts)):
            self.proposed[i] += 1
            self.accepted[i] += i < num_accepted

    # ---- derived numbers ----
    @property
    def gamma(self) -> int:
        return len(self.proposed)

    @property
    def alpha_per_position(self) -> list[float]:
        """accepted[i] / proposed[i]; nan for a position never reached."""
        return [_ratio(a, p) for a, p in zip(self.accepted, self.proposed)]

    @property
    def alpha(self) -> float:
        """Accepted drafts / drafts the verifier looked at."""
        return _ratio(sum(self.accepted), sum(self.proposed))

    @property
    def tau(self) -> float:
        """Tokens emitted per target forward."""
        return _ratio(self.new_tokens, self.target_calls)

    @property
    def accept_length(self) -> float:
        """1 + accepted drafts per verify step (the peers' accept length; see the module docstring)."""
        return 1.0 + sum(self.accepted) / self.verify_steps if self.verify_steps else math.nan

    @property
    def tokens_per_second(self) -> float:
        return _ratio(self.new_tokens, self.seconds)

    # ---- aggregation over prompts ----
    def merge(self, other: "SpecStats") -> "SpecStats":
        """A new SpecStats with both runs' counts added (operands unchanged)."""
        return SpecStats(
            proposed=_add_lists(self.proposed, other.proposed),
            accepted=_add_lists(self.accepted, other.accepted),
            target_calls=self.target_calls + other.target_calls,
            verify_steps=self.verify_steps + other.verify_steps,
            drafter_calls=self.drafter_calls + other.drafter_calls,
            drafts_scored=self.drafts_scored + other.drafts_scored,
            new_tokens=self.new_tokens + other.new_tokens,
            seconds=self.seconds + other.seconds,
        )

    __add__ = merge

    def __radd__(self, other):  # lets sum(list_of_stats) start from 0
        return self if other == 0 else NotImplemented

    def to_dict(self) -> dict:
        """JSON-safe: nan (nothing to divide by) becomes None."""
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        return {
            "gamma": self.gamma,
            "proposed": list(self.proposed),
            "accepted": list(self.accepted),
            "target_calls": self.target_calls,
            "verify_steps": self.verify_steps,
            "drafter_calls": self.drafter_calls,
            "drafts_scored": self.drafts_scored,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "alpha_per_position": [clean(a) for a in self.alpha_per_position],
            "alpha": clean(self.alpha),
            "tau": clean(self.tau),
            "accept_length": clean(self.accept_length),
            "tokens_per_second": clean(self.tokens_per_second),
        }
