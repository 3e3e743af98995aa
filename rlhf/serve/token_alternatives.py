"""The most likely tokens at each position of a sampled response (OpenAI's ``top_logprobs``), under the
distribution the sampler drew from: the model's logits at the sampling temperature, truncated by top-k/top-p as
the samplers truncate them (rollout/engine.py ``truncate``). One forward pass over prompt + response; the engines
record only the sampled token's log-prob, so this needs an engine that holds a transformers model."""
from __future__ import annotations

import torch

from rlhf.core.data.samples import Sample
from rollout.engine import truncate


@torch.no_grad()
def top_alternatives(model, sample: Sample, k: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                     greedy: bool = False) -> list[list[tuple[int, float]]]:
    """For each response token, the ``k`` most likely (token id, log-prob) pairs, most likely first; tokens the
    truncation removed are never among them (fewer than ``k`` pairs where fewer remain)."""
    if not sample.response_ids or k <= 0:
        return [[] for _ in sample.response_ids]
    ids = torch.tensor([sample.prompt_ids + sample.response_ids], dtype=torch.long, device=model.device)
    first = len(sample.prompt_ids) - 1  # the logits at position t predict token t + 1
    logits = model(input_ids=ids).logits[0, first:first + len(sample.response_ids)].float()
    if not greedy:
        logits = truncate(logits / temperature, top_k, top_p)
    values, indices = torch.log_softmax(logits, dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
    return [[(int(i), float(v)) for i, v in zip(row_i, row_v) if v != float("-inf")]
            for row_i, row_v in zip(indices.tolist(), values.tolist())]
