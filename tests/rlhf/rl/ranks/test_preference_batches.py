"""The preference ranks' batches: collated pairs cut into micro-batches, packed or not, give each row's sequence
log-prob as the whole padded batch does (rlhf/rl/ranks/preference.py, no model: per-token values made up)."""
from __future__ import annotations

import pytest
import torch

from rlhf.core.algorithms.preference_losses import sequence_logprobs
from rlhf.core.data import packing
from rlhf.rl.ranks.preference import micro_batch_sequences


@pytest.mark.parametrize("average", [False, True])
def test_packed_micro_batches_after_the_first_give_the_padded_batchs_sequence_logprobs(average):
    # 4 pairs (8 rows) of lengths 9, 3, 9, 3, ...: micro-batches of 4 rows pack into bins of 9 with padding
    # slots, and the second micro-batch starts at row 4 (its padding slots' row id 0 must not become -4).
    rows, width = 8, 9
    lengths = [9, 3] * 4
    attention = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    response = attention.clone().float()
    response[:, :2] = 0  # a 2-token prompt
    logp = -torch.arange(1, rows * width + 1, dtype=torch.float).reshape(rows, width) / 10 * attention
    tokens = {"input_ids": attention.clone(), "attention_mask": attention, "response_mask": response,
              "row_ids": torch.arange(rows).unsqueeze(1).expand(rows, width), "logp": logp}
    sequences, chosen_sums, packed = [], [], 0
    for first, mb, plan in packing.micro_batches(tokens, 4, "cpu", can_pack=True):
        packed += plan is not None
        total, chosen = micro_batch_sequences(mb["logp"], mb, first, min(4, rows - first), average)
        sequences.append(total)
        chosen_sums.append(chosen)
    assert packed == 2
    torch.testing.assert_close(torch.cat(sequences), sequence_logprobs(logp, response, average=average))
    # the chosen rows' (0, 2, 4, 6) sums, for the SFT term, also where the loss takes means
    torch.testing.assert_close(torch.cat(chosen_sums), sequence_logprobs(logp, response)[0::2])
    # by hand, row 1 (length 3, response its third token only): -(1 * 9 + 3) / 10 = -1.2
    assert abs(float(torch.cat(sequences)[1]) + 1.2) < 1e-6
