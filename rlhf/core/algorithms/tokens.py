"""Per-token quantities from a causal LM's logits, and the masked mean every per-token figure is averaged with."""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token given the ones before it, aligned with ``input_ids`` (position 0 gets 0).

    ``logits`` (B, L, V) from a causal LM over ``input_ids`` (B, L).
    """
    return torch.nn.functional.pad(logprob_of(logits[:, :-1].float(), input_ids[:, 1:]), (1, 0), value=0.0)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the distribution each token was sampled from, aligned with ``input_ids`` as ``token_logprobs``
    is: position t holds H(softmax(logits[t-1])), position 0 gets 0. ``logits`` (B, L, V) -> (B, L), float32.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v, which stays finite where probabilities underflow to 0
    (-sum p log p would meet 0 * -inf there). Differentiable, for the entropy bonus.
    """
    return torch.nn.functional.pad(entropy_of(logits[:, :-1].float()), (1, 0), value=0.0)


def logprob_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] over the last dimension: ``logits`` (..., V), ``targets`` (...)."""
    # gather minus logsumexp instead of a full log_softmax: with a 151k vocabulary that saves a (..., V) copy.
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, as ``token_entropy`` takes it."""
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 for an all-masked input rather than NaN."""
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
