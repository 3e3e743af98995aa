"""Assembling the trainer's batch from rollout samples: right-padded rows, per-token tensors aligned with ids."""
from __future__ import annotations

import torch

from rlhf.algorithms import loss_token_weights
from rollout.engine import Sample


def make_train_batch(samples: list[Sample], advantages: torch.Tensor, pad_id: int, aggregation: str,
                     max_response_tokens: int) -> dict[str, torch.Tensor]:
    """One row per sample, prompt then response then padding (so position ids are a plain arange, as in
    rollout). ``advantages`` (B,) is spread over each row's response tokens."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    rows = len(samples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    response_mask = torch.zeros((rows, width))
    rollout_logprobs = torch.zeros((rows, width))
    for i, s in enumerate(samples):
        start, end = len(s.prompt_ids), len(s.prompt_ids) + len(s.response_ids)
        input_ids[i, :end] = torch.tensor(s.prompt_ids + s.response_ids)
        attention_mask[i, :end] = 1
        response_mask[i, start:end] = 1.0
        rollout_logprobs[i, start:end] = torch.tensor(s.logprobs)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "rollout_logprobs": rollout_logprobs,
        "advantages": advantages.float().unsqueeze(1) * response_mask,
        "loss_weights": loss_token_weights(response_mask, aggregation, max_response_tokens),
    }
