"""A causal LM's head applied only where a loss reads it: at the positions that predict response tokens.

The head turns each position's hidden state into a whole vocabulary of logits, and the RL loss reads one log-prob
(and one entropy) per response token. Everything else it computes is thrown away: the prompt positions, which are
most of a row on chat-formatted problems (SmolLM2 on configs/smollm2_distil.yaml's task: 668 of a micro-batch's
1,074 tokens, benchmarks/update_head.py), and their float copy and
log-sum-exp over the vocabulary (49,152 for SmolLM2, 151,936 for Qwen) forward and backward. With the head's
input cut to the response positions, the logits are (N, V) for the batch's N response tokens instead of (B, L, V).

The cut is a forward pre-hook on the model's output embeddings, so the model is still called as a whole (DeepSpeed's
engine and its ZeRO-3 hooks, peft's wrappers, and anything a model applies after its head elementwise, such as a
logit soft-cap, all run as before). A model that never calls that module returns full (B, L, V) logits; the
log-probs are then taken from those and cut the same way, so the result never depends on which path ran.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from rlhf.core.algorithms.tokens import entropy_of, logprob_of


def predicting(response_mask: torch.Tensor) -> torch.Tensor:
    """(B, L - 1) bool: the positions whose output predicts a response token (output t predicts token t + 1)."""
    return response_mask[:, 1:].bool()


@contextmanager
def head_only_at(model, where: torch.Tensor):
    """While open, ``model``'s output embeddings see only the hidden states at ``where`` (B, L - 1): the model's
    logits come out (N, V), one row per True in ``where``, in row-major order."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return

    def select(_module, args):
        hidden = args[0]
        return (hidden[:, :-1][where.to(hidden.device)], *args[1:]) if hidden.dim() == 3 else None

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def response_logits(model, inputs: dict[str, torch.Tensor], response_mask: torch.Tensor) -> torch.Tensor:
    """``model``'s float logits (N, V) at the positions predicting the response tokens of ``inputs``'s rows
    (``response_mask`` (B, L), aligned with ``input_ids``)."""
    where = predicting(response_mask)
    with head_only_at(model, where):
        logits = model(**inputs).logits
    if logits.dim() == 3:  # the head was not called as a module: cut its full output instead
        logits = logits[:, :-1][where.to(logits.device)]
    return logits.float()


def spread(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-response-token ``values`` (N,) back to (B, L), aligned as ``tokens.token_logprobs`` is (position t holds
    the value for token t), 0 everywhere else. Differentiable in ``values``."""
    where = predicting(response_mask).to(values.device)
    out = values.new_zeros(where.shape).masked_scatter(where, values)
    return torch.nn.functional.pad(out, (1, 0), value=0.0)


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Log-probs (B, L) of the response tokens from ``response_logits``'s (N, V); 0 off the response."""
    targets = input_ids[:, 1:][predicting(response_mask).to(input_ids.device)]
    return spread(logprob_of(logits, targets), response_mask)


# Response tokens per piece of the entropy: its softmax and product are two more float copies of the logits, and
# with a 151k vocabulary and long responses those would be gigabytes at once.
ENTROPY_CHUNK = 1024


def response_entropy(logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Entropy (B, L) of the distributions the response tokens were drawn from; 0 off the response."""
    return spread(torch.cat([entropy_of(piece) for piece in logits.split(ENTROPY_CHUNK)]), response_mask)
