"""How per-token losses become one batch loss: weights computed once for the whole batch."""
from __future__ import annotations

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "dr-grpo")


def loss_token_weights(mask: torch.Tensor, mode: str, max_response_tokens: int) -> torch.Tensor:
    """Weights w (B, L) such that the batch loss is sum(w * per_token_loss).

    Computing the weights once for the whole batch, before it is split across trainer ranks and micro-batches,
    makes the loss independent of how it is split: each part just sums its share.
      token-mean: every response token in the batch counts equally (long answers weigh more);
      seq-mean:   every sequence counts equally, tokens averaged within it;
      dr-grpo:    a constant normaliser (B * max_response_tokens), so no length bias at all.
    """
    mask = mask.float()
    if mode == "token-mean":
        return mask / mask.sum().clamp(min=1.0)
    if mode == "seq-mean":
        per_seq = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return mask / per_seq / mask.shape[0]
    if mode == "dr-grpo":
        return mask / float(mask.shape[0] * max_response_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}: use one of {', '.join(LOSS_AGGREGATIONS)}")
