"""The everyday peer: transformers' assisted generation (``generate(assistant_model=...)``), with
target forwards counted by a hook so its tau is comparable with ours."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from draftdistill.spec import SamplingConfig


class ForwardCounter:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1

    def remove(self):
        self.handle.remove()


def hf_generate_all(target, prompt_ids: list[torch.Tensor], *, drafter=None, gamma: int = 4,
                    sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 64,
                    eos_token_id=None, seed: int = 0, progress: bool = True) -> dict:
    """HF ``generate`` over every prompt, assisted by ``drafter`` when given; tokens, calls, tokens/s."""
    first_eos = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": eos_token_id, "pad_token_id": first_eos}
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if drafter is not None:
        # A fixed gamma, as in our decoder: no heuristic schedule, no confidence early-exit.
        drafter.generation_config.num_assistant_tokens = gamma
        drafter.generation_config.num_assistant_tokens_schedule = "constant"
        drafter.generation_config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = drafter
    counter = ForwardCounter(target)
    new_tokens, seconds = 0, 0.0
    try:
        for i, ids in enumerate(tqdm(prompt_ids, desc="hf assisted" if drafter is not None else "hf target",
                                     disable=not progress, leave=False)):
            torch.manual_seed(seed + i)
            start = time.perf_counter()
            with torch.inference_mode():
                out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            seconds += time.perf_counter() - start
            new_tokens += out.shape[1] - ids.shape[1]
    finally:
        counter.remove()
    return {"new_tokens": new_tokens, "target_calls": counter.calls, "seconds": seconds,
            "tau": new_tokens / max(counter.calls, 1), "tokens_per_second": new_tokens / seconds}
