"""A rollout sample as every layer sees it: what the rollout engines return and the trainer batches are built from."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sample:
    prompt_index: int          # index into the prompts of the call
    prompt_ids: list[int]
    response_ids: list[int]    # includes the end-of-sequence token when the model produced one
    logprobs: list[float]      # sampler's log-prob of each response token (at the sampling temperature)
    finish_reason: str         # "stop" (end-of-sequence) or "length" (hit max_new_tokens)
    text: str                  # the response decoded, special tokens dropped
