"""Padding-free micro-batches (rlhf/core/data/packing.py): the layout by hand, and a packed forward equal to the padded one."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlhf.core.algorithms.tokens import token_logprobs  # noqa: E402

from rlhf.core.data import packing
from rlhf.core.data.batch import TrainBatch
from rlhf.rl.ranks.critic import token_values  # noqa: E402


def test_first_fit_decreasing_layout_by_hand():
    # Capacity 3 (the longest row). Longest first: row 0 (3) opens bin 0; row 2 (2) opens bin 1; row 3 (2) does
    # not fit bin 1's one free slot and opens bin 2; row 1 (1) fills bin 1. Row 4 is empty and dropped.
    plan = packing.plan_packing([3, 1, 2, 2, 0], width=4)
    pad = 5 * 4
    assert plan.source.tolist() == [[0, 1, 2], [8, 9, 4], [12, 13, pad]]
    assert plan.position_ids.tolist() == [[0, 1, 2], [0, 1, 0], [0, 1, 0]]
    assert plan.shape == (5, 4)


def test_pack_unpack_round_trip_zeroes_padding():
    lengths = [3, 1, 2, 2, 0]
    x = torch.arange(1, 21, dtype=torch.float).reshape(5, 4)
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in lengths])
    plan = packing.plan_packing(lengths, 4)
    packed = plan.pack(x)
    assert packed.tolist() == [[1, 2, 3], [9, 10, 5], [13, 14, 0]]
    assert torch.equal(plan.unpack(packed), x * mask)
    assert plan.pack(torch.ones(5, 4, dtype=torch.long)).dtype == torch.long
    with pytest.raises(ValueError, match=r"tensor of shape \(4, 4\), the packing is for \(5, 4\)"):
        plan.pack(x[:4])


def test_worth_packing_needs_the_minimum_saving():
    # [4, 2, 2]: 2 packed rows of 4 against 3 padded rows of 4, a third fewer tokens.
    assert packing.worth_packing([4, 2, 2], packing.plan_packing([4, 2, 2], 4))
    # [4, 3, 2]: nothing fits beside another row; no saving.
    assert not packing.worth_packing([4, 3, 2], packing.plan_packing([4, 3, 2], 4))
    # Six rows of 4 and one of 1 (into its own bin): 7 rows either way.
    lengths = [4] * 6 + [1]
    assert not packing.worth_packing(lengths, packing.plan_packing(lengths, 4))
    # Only empty rows: nothing to compute, nothing packed.
    assert not packing.worth_packing([0, 0], packing.plan_packing([0, 0], 4))


def batch_of(lengths: list[int], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 32, (len(lengths), width), generator=g)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    # A response: everything after a row's first two tokens (prompt).
    response = mask.float().clone()
    response[:, :2] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "response_mask": response}


def test_micro_batches_pack_only_where_it_pays():
    batch = batch_of([6, 3, 3, 6, 5, 4], width=8)
    out = list(packing.micro_batches(batch, size=3, device="cpu", can_pack=True))
    first, mb, plan = out[0]
    # Rows 0-2 (6, 3, 3) pack into two rows of 6: the long one alone, the short ones side by side.
    assert first == 0 and plan is not None and mb["input_ids"].shape == (2, 6)
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]]
    for key in ("response_mask", "attention_mask"):
        assert torch.equal(plan.unpack(mb[key]), batch[key][:3, :6]), key
    assert packing.model_inputs(mb).keys() == {"input_ids", "position_ids", "use_cache"}
    # Rows 3-5 (6, 5, 4): no two fit in 6, so they stay padded, cut to their longest row.
    first, mb, plan = out[1]
    assert first == 3 and plan is None and mb["input_ids"].shape == (3, 6) and "position_ids" not in mb
    # A kernel that takes no packed rows gets plain micro-batches.
    assert all(p is None for _, _, p in packing.micro_batches(batch, 3, "cpu", can_pack=False))
    # All-padding rows stay as they are, one column wide.
    (_, mb, plan), = packing.micro_batches(batch_of([0, 0, 0], width=4), 3, "cpu", can_pack=True)
    assert plan is None and mb["input_ids"].shape == (3, 1)


def test_a_train_batch_gives_train_batch_micro_batches():
    rows = batch_of([6, 3, 3], width=8)
    zeros = torch.zeros(3, 8)
    batch = TrainBatch(**rows, rollout_logprobs=zeros, advantages=2 * rows["response_mask"], loss_weights=zeros)
    (_, mb, plan), = packing.micro_batches(batch, 3, "cpu", can_pack=True)
    assert isinstance(mb, TrainBatch) and plan is not None and mb.old_values is None
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]]
    assert torch.equal(plan.unpack(mb.advantages), batch.advantages[:, :6])
    assert packing.model_inputs(mb).keys() == {"input_ids", "position_ids", "use_cache"}


def test_zero_sequence_starts():
    mb = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
    x = torch.arange(1.0, 7.0).unsqueeze(0)
    assert packing.zero_sequence_starts(x, mb).tolist() == [[0, 2, 3, 0, 5, 0]]
    assert packing.zero_sequence_starts(x, {"attention_mask": torch.ones(1, 6)}) is x


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def policy(request):
    config = transformers.Qwen2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      attn_implementation=request.param)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


def test_packed_log_probs_and_gradients_equal_the_padded_ones(policy):
    # One-token rows too: a sequence of one is its own prompt, with nothing to predict.
    batch = batch_of([9, 4, 1, 5, 3, 9, 2], width=10)
    (_, padded_mb, none), = packing.micro_batches(batch, 7, "cpu", can_pack=False)
    (_, packed_mb, plan), = packing.micro_batches(batch, 7, "cpu", can_pack=True)
    assert none is None and plan is not None and packed_mb["input_ids"].shape[0] < 7

    def weighted_logprobs(mb):
        logits = policy(**packing.model_inputs(mb)).logits
        logp = packing.zero_sequence_starts(token_logprobs(logits, mb["input_ids"]), mb)
        policy.zero_grad()
        (logp * mb["response_mask"]).sum().backward()
        return logp, {n: p.grad.clone() for n, p in policy.named_parameters()}

    want, want_grads = weighted_logprobs(padded_mb)
    got, got_grads = weighted_logprobs(packed_mb)
    got = plan.unpack(got)
    real = padded_mb["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert torch.all(got[:, 0] == 0) and torch.all(got[~real] == 0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_critic_values_equal_the_padded_ones(policy):
    from transformers import Qwen2ForTokenClassification

    config = policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1})
    torch.manual_seed(1)
    critic = Qwen2ForTokenClassification(config).eval()
    batch = batch_of([7, 3, 2, 7, 4], width=8, seed=3)
    (_, padded_mb, _), = packing.micro_batches(batch, 5, "cpu", can_pack=False)
    (_, packed_mb, plan), = packing.micro_batches(batch, 5, "cpu", can_pack=True)
    assert plan is not None
    with torch.no_grad():
        want = token_values(critic, padded_mb) * padded_mb["attention_mask"]
        got = plan.unpack(token_values(critic, packed_mb))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
