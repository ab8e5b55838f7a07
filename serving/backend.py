"""The one interface the online distiller talks to, whatever serves the traffic.

Two backends implement it: the embedded in-process speculative server (the default, built on
draftdistill.spec) and a live SGLang server (through serving.sglang_client). The distiller only
needs to (1) see finished requests, (2) get teacher scores for them, (3) push new draft weights
and (4) read the acceptance the server measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class FinishedRequest:
    """One served request, as captured from the server (request log, plugin or proxy)."""

    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    weight_version: str = "default"  # draft weights the server used for it
    verify_steps: int | None = None  # target forwards that verified drafts (SGLang: meta_info spec_verify_ct;
    # a prefill that drafted nothing does not count)
    finished_at: float = 0.0  # time.time() when it finished
    meta: dict = field(default_factory=dict)

    @property
    def accept_length(self) -> float | None:
        """Tokens emitted per verify step over this request, when the server reports it: SGLang's
        spec_accept_length (completion_tokens / spec_verify_ct), which the embedded server reports the
        same way (its verify steps leave out an EAGLE-3 prefill that drafted nothing)."""
        if not self.verify_steps:
            return None
        return len(self.output_ids) / self.verify_steps


class TrafficBackend(Protocol):
    def finished_requests(self, since: float) -> list[FinishedRequest]:
        """Requests that finished after ``since`` (a time.time() value), oldest first."""

    def teacher_logits(self, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
        """Target scores of every response position: [len(response_ids), V] logits, or a
        draftdistill.losses Teacher* object (top-k / token log-probs) when only those are served."""

    def push_draft_weights(self, named_tensors: dict[str, torch.Tensor], version: str) -> None:
        """Install new draft weights under ``version``; the target's outputs must not change."""

    def draft_weight_version(self) -> str:
        """The draft weight version now serving."""
