"""The RL update's batch, typed (``TrainBatch``), and assembling it from rollout samples: right-padded rows,
per-token tensors aligned with the ids."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch

from rlhf.core.algorithms.aggregation import loss_token_weights
from rlhf.core.data.samples import Sample


@dataclass
class TrainBatch:
    """One right-padded row per sample (prompt, then response, then padding), every tensor (B, L) in that layout,
    on the CPU until a rank moves a micro-batch to its device. ``make_train_batch`` fills the first six; the
    update adds the critic's targets, the policy ranks the old log-probs and sequence ids of each mini-batch, and
    ``packing.micro_batches`` the position ids of a packed micro-batch (whose tensors are then (bins, W), in the
    packed layout)."""

    input_ids: torch.Tensor         # (B, L) long: prompt then response ids, padding after
    attention_mask: torch.Tensor    # (B, L) long: 1 on prompt and response tokens, 0 on padding
    response_mask: torch.Tensor     # (B, L) float: 1 on the tokens the policy sampled, 0 on prompt, a multi-turn
                                    # sample's observations and padding: the tokens that carry loss
    rollout_logprobs: torch.Tensor  # (B, L) float: the sampler's log-prob of each response token, 0 elsewhere
    advantages: torch.Tensor        # (B, L) float: each response token's advantage, 0 elsewhere
    loss_weights: torch.Tensor      # (B, L) float: a mini-batch's loss is sum(loss_weights * per-token loss)
    old_logprobs: torch.Tensor | None = None  # (B, L) float: the trainer's log-probs before the batch's first
                                              # update, when it makes several (the PPO ratio's denominator)
    old_values: torch.Tensor | None = None    # (B, L) float: the critic's values the advantages came from
    returns: torch.Tensor | None = None       # (B, L) float: the critic's targets
    sequence_ids: torch.Tensor | None = None  # (B, L) long: each token's row, which a packed row holds several of
    position_ids: torch.Tensor | None = None  # (bins, W) long, a packed micro-batch's alone: each sequence's own
                                              # positions, from which the model derives its attention mask

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every field that is set, for what treats them all alike (row splits, packing)."""
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                yield field.name, value

    def rows(self, index) -> TrainBatch:
        """The rows ``index`` (a slice, indices or a boolean mask) selects, of every tensor that is set."""
        return replace(self, **{name: tensor[index] for name, tensor in self.tensors()})

    def with_(self, **changes: torch.Tensor) -> TrainBatch:
        """A copy with ``changes`` (field name: tensor) in place of those fields."""
        return replace(self, **changes)

    def inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` by name: the rows as the per-token forwards take them (log-probs,
        values, a teacher's), like every other stage's model rows (``packing.per_token``)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def make_train_batch(samples: list[Sample], advantages: torch.Tensor, pad_id: int, aggregation: str,
                     max_response_tokens: int, mini_batches: int = 1) -> TrainBatch:
    """One row per sample, prompt then response then padding (so position ids are a plain arange, as in
    rollout). ``advantages`` is either (B,), spread over each row's response tokens, or (B, L) per token in this
    same layout (``response_mask(samples)`` gives it), as token-level estimators such as REINFORCE++ return.

    The loss weights sum the loss of each of ``mini_batches`` contiguous equal row blocks (one optimizer step
    each, as the trainer splits them): token-mean over a mini-batch's tokens, not the whole batch's."""
    rows = len(samples)
    if rows % mini_batches:
        raise ValueError(f"{rows} rows do not split into {mini_batches} equal mini-batches")
    mask = response_mask(samples)
    width = mask.shape[1]
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    rollout_logprobs = torch.zeros((rows, width))
    for i, s in enumerate(samples):
        start, end = len(s.prompt_ids), len(s.prompt_ids) + len(s.response_ids)
        input_ids[i, :end] = torch.tensor(s.prompt_ids + s.response_ids)
        attention_mask[i, :end] = 1
        rollout_logprobs[i, start:end] = torch.tensor(s.logprobs)
    advantages = advantages.float()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    elif advantages.shape != mask.shape:
        raise ValueError(f"token advantages of shape {tuple(advantages.shape)} do not match the batch's "
                         f"{tuple(mask.shape)}")
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=mask,
        rollout_logprobs=rollout_logprobs,
        advantages=advantages * mask,
        loss_weights=torch.cat([loss_token_weights(part, aggregation, max_response_tokens)
                                for part in mask.split(rows // mini_batches)]),
    )


def response_mask(samples: list[Sample]) -> torch.Tensor:
    """(B, L) float, 1 on each row's response tokens, in make_train_batch's layout: what token-level advantage
    estimators need before the batch is assembled. A multi-turn sample's observation tokens (its ``loss_mask``
    0s) are 0: no loss, no advantage, no KL, no value target on tokens the policy did not sample."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    mask = torch.zeros((len(samples), width))
    for i, s in enumerate(samples):
        start, end = len(s.prompt_ids), len(s.prompt_ids) + len(s.response_ids)
        mask[i, start:end] = 1.0 if s.loss_mask is None else torch.tensor(s.loss_mask, dtype=torch.float)
    return mask


def without_zero_advantage_rows(batch: TrainBatch, multiple: int) -> TrainBatch:
    """``batch`` (its rows a multiple of ``multiple``) without the rows whose advantage is 0 on every token, except
    as many of those (the shortest) as keep the row count a positive multiple of ``multiple``: the trainer ranks
    split the rows evenly, and each takes part in the optimizer step.

    When the loss is the clipped policy term alone (no KL or entropy term), such a row's gradient is exactly 0, and
    the loss weights were set over the whole batch before this, so the rows kept give exactly the whole batch's
    update; running the others through forward and backward is wasted work. GRPO with a verifier makes many of
    them: every group all right or all wrong has advantage 0."""
    zero = batch.advantages.eq(0).all(dim=1)
    signal = int((~zero).sum())
    keep = ~zero
    fill = max(multiple, -(-signal // multiple) * multiple) - signal  # zero rows that round the count up
    if fill:
        zero_rows = zero.nonzero().squeeze(1)
        lengths = batch.attention_mask[zero_rows].sum(dim=1)
        keep[zero_rows[lengths.argsort(stable=True)[:fill]]] = True
    return batch.rows(keep)
