"""Tests for rlhf.core.data.batch: make_train_batch's exact tensors on hand-made samples, TrainBatch's row selection
and pickling, then end-to-end alignment of the trainer's per-token log-probs with the sampler's on samples a tiny
model generated."""
from __future__ import annotations

import pickle

import pytest
import torch

from rlhf.core.algorithms.tokens import token_logprobs
from rlhf.core.data.batch import TrainBatch, make_train_batch, without_zero_advantage_rows
from rlhf.core.config.run_config import ModelConfig
from rlhf.core.models.build import build_student, build_tokenizer
from rlhf.core.data.samples import Sample
from rollout.engine import generate

T = torch.tensor

# Row 0: prompt [5, 6], response [7, 8, 1] (ending in eos id 1). Row 1: prompt [5], response [9]. Width 5.
SAMPLES = [
    Sample(0, [5, 6], [7, 8, 1], [-0.1, -0.2, -0.3], "stop", "ab"),
    Sample(1, [5], [9], [-0.5], "length", "c"),
]
ADVANTAGES = T([2.0, -1.0])


@pytest.fixture
def batch():
    return make_train_batch(SAMPLES, ADVANTAGES, pad_id=0, aggregation="token-mean", max_response_tokens=4)


def test_input_ids_are_prompt_then_response_right_padded_with_pad_id(batch):
    assert batch.input_ids.dtype == torch.long
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 1], [5, 9, 0, 0, 0]]


def test_attention_mask_covers_prompt_and_response_only(batch):
    assert batch.attention_mask.dtype == torch.long
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_response_mask_marks_response_positions_only(batch):
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


def test_rollout_logprobs_sit_at_response_positions(batch):
    torch.testing.assert_close(batch.rollout_logprobs,
                               T([[0.0, 0.0, -0.1, -0.2, -0.3], [0.0, -0.5, 0.0, 0.0, 0.0]]))


def test_advantages_spread_over_response_tokens_only(batch):
    torch.testing.assert_close(batch.advantages,
                               T([[0.0, 0.0, 2.0, 2.0, 2.0], [0.0, -1.0, 0.0, 0.0, 0.0]]))


def test_token_mean_loss_weights_are_one_quarter_per_response_token_and_sum_to_one(batch):
    # 4 response tokens in the batch: each weighs 1/4.
    torch.testing.assert_close(batch.loss_weights,
                               T([[0.0, 0.0, 0.25, 0.25, 0.25], [0.0, 0.25, 0.0, 0.0, 0.0]]))
    assert batch.loss_weights.sum().item() == pytest.approx(1.0)


def test_seq_mean_and_dr_grpo_loss_weights():
    seq = make_train_batch(SAMPLES, ADVANTAGES, 0, "seq-mean", 4).loss_weights
    # Each of the 2 rows weighs 1/2, shared by its tokens: 1/6 each in row 0, 1/2 in row 1.
    torch.testing.assert_close(seq, T([[0.0, 0.0, 1 / 6, 1 / 6, 1 / 6], [0.0, 0.5, 0.0, 0.0, 0.0]]))
    assert seq.sum().item() == pytest.approx(1.0)
    dr = make_train_batch(SAMPLES, ADVANTAGES, 0, "dr-grpo", 4).loss_weights
    # Constant normaliser 2 rows x 4 max tokens = 8.
    torch.testing.assert_close(dr, T([[0.0, 0.0, 0.125, 0.125, 0.125], [0.0, 0.125, 0.0, 0.0, 0.0]]))


def test_pad_id_other_than_zero_fills_the_padding():
    ids = make_train_batch(SAMPLES, ADVANTAGES, pad_id=42, aggregation="token-mean", max_response_tokens=4).input_ids
    assert ids.tolist() == [[5, 6, 7, 8, 1], [5, 9, 42, 42, 42]]


def test_all_per_token_tensors_share_the_input_ids_shape(batch):
    names = [name for name, _ in batch.tensors()]
    assert names == ["input_ids", "attention_mask", "response_mask", "rollout_logprobs", "advantages", "loss_weights"]
    for name, tensor in batch.tensors():
        assert tensor.shape == batch.input_ids.shape, name


def test_rows_select_every_field_that_is_set_and_the_batch_pickles(batch):
    """Ray sends the batch to the ranks pickled; ``rows`` is how it is split across them."""
    full = batch.with_(returns=torch.ones(2, 5))
    second = full.rows(slice(1, 2))
    assert second.old_values is None and second.returns.tolist() == [[1.0] * 5]
    assert second.input_ids.tolist() == [[5, 9, 0, 0, 0]]
    again = pickle.loads(pickle.dumps(full))
    assert isinstance(again, TrainBatch) and again.old_values is None
    for (name, tensor), (_, original) in zip(again.tensors(), full.tensors(), strict=True):
        assert torch.equal(tensor, original), name


# ------------------------------------------------------------------------ rows with no gradient left out

# Six rows of 5, 2, 4, 3, 6 and 1 tokens: a 1-token prompt, the rest response (15 response tokens in all).
LENGTHS = [5, 2, 4, 3, 6, 1]


def zero_signal_batch(signal_rows: list[int]) -> TrainBatch:
    samples = [Sample(i, [5], [7] * (n - 1), [-0.1] * (n - 1), "stop", "") for i, n in enumerate(LENGTHS)]
    advantages = torch.zeros(len(LENGTHS))
    advantages[signal_rows] = torch.arange(1.0, len(signal_rows) + 1)
    return make_train_batch(samples, advantages, pad_id=0, aggregation="token-mean", max_response_tokens=5)


@pytest.mark.parametrize("multiple, kept", [
    (1, [0, 3]),         # only the signal rows
    (3, [0, 3, 5]),      # rounded up to 3 with the shortest zero row (row 5, 1 token)
    (2, [0, 3]),         # already a multiple of 2
])
def test_zero_advantage_rows_are_left_out_but_the_count_stays_a_multiple_of_the_ranks(multiple, kept):
    batch = zero_signal_batch([0, 3])
    out = without_zero_advantage_rows(batch, multiple)
    for (name, value), (_, whole) in zip(out.tensors(), batch.tensors(), strict=True):
        torch.testing.assert_close(value, whole[kept], rtol=0, atol=0, msg=name)
    # The loss weights stay the whole batch's, token-mean over all its 15 response tokens, not renormalised over
    # the rows kept: the update must equal the whole batch's.
    assert out.loss_weights[0, 1].item() == pytest.approx(1 / 15)


def test_a_batch_without_signal_keeps_its_shortest_row_per_rank():
    # No row carries signal: one row per rank still goes through, so every rank takes the optimizer step (its
    # gradient is 0; AdamW's weight decay and moments still move, as they would on the whole batch).
    out = without_zero_advantage_rows(zero_signal_batch([]), 2)
    assert out.input_ids.tolist() == zero_signal_batch([]).input_ids[[1, 5]].tolist()


# ------------------------------------------------------------------------------- end-to-end alignment


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_over_the_batch_equal_generate_logprobs(temperature):
    """What the trainer computes (one right-padded forward with the attention mask, logits / temperature,
    token_logprobs) must give, at the response positions, the sampler's own log-probs."""
    tokenizer = build_tokenizer("char")
    model = build_student(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64), tokenizer, seed=0).eval()
    torch.manual_seed(5)
    samples = generate(model, tokenizer, ["1+2=", "34+5-6=", "9-8+7-6+5="], n=2, max_new_tokens=8,
                       temperature=temperature)
    lengths = {len(s.prompt_ids) + len(s.response_ids) for s in samples}
    assert len(lengths) > 1  # rows of different lengths, so right padding is exercised
    batch = make_train_batch(samples, torch.zeros(len(samples)), tokenizer.pad_token_id, "token-mean", 8)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = token_logprobs(logits / temperature, batch.input_ids)
    mask = batch.response_mask
    torch.testing.assert_close(logp * mask, batch.rollout_logprobs, atol=1e-4, rtol=0)
    assert int(mask.sum()) == sum(len(s.response_ids) for s in samples)
