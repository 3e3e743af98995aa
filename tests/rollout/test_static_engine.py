"""The hf_static engine's parts (rollout/static_engine.py): the preallocated KV cache against the concatenating one
it replaces, and the fused sampler against a log-softmax by hand. The engine contract itself runs in
tests/rollout/test_engine_contract.py and tests/rollout/test_sampling_truncation.py."""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from rlhf.core.config.run_config import ModelConfig
from rlhf.core.models.build import build_student, build_tokenizer
from rollout.engine import generate_compacting
from rollout.static_engine import PreallocatedLayer, generate_static, sample_next


def _kv(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, length, 4, generator=g), torch.randn(rows, 2, length, 4, generator=g)


def test_the_preallocated_layer_holds_what_the_concatenating_one_does():
    ours, theirs = PreallocatedLayer(rows=6, capacity=8), DynamicLayer()
    for layer in (ours, theirs):
        layer.update(*_kv(2, 3, seed=0))  # a prefill of 2 prompts
        layer.batch_repeat_interleave(3)  # 3 samples each
        layer.update(*_kv(6, 1, seed=1))
        layer.batch_select_indices(torch.tensor([0, 2, 5]))  # finished rows out
        keys, values = layer.update(*_kv(3, 1, seed=2))
    assert ours.get_seq_length() == theirs.get_seq_length() == 5
    torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=0)
    torch.testing.assert_close(values, theirs.values, rtol=0, atol=0)
    # A view of the buffer made once: no copy of the cache per token.
    assert ours.keys.untyped_storage().data_ptr() == ours._k.untyped_storage().data_ptr()


def test_fused_sampling_draws_and_scores_like_a_log_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    token, logp = sample_next(logits, 0.5, greedy=True)
    assert token.tolist() == [0, 2]
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, token[:, None])[:, 0]
    torch.testing.assert_close(logp, expected)
    # A banned token is never drawn, and the others' log-probs are those of the distribution without it.
    torch.manual_seed(0)
    token, logp = sample_next(logits.repeat(50, 1), 1.0, greedy=False, banned=2)
    assert 2 not in token.tolist()
    without = logits.repeat(50, 1).clone()
    without[:, 2] = float("-inf")
    torch.testing.assert_close(logp, torch.log_softmax(without, -1).gather(-1, token[:, None])[:, 0])


def test_greedy_answers_match_hf_compact_row_for_row():
    tokenizer = build_tokenizer("char")
    model = build_student(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64), tokenizer, seed=3).eval()
    prompts = ["1+2=", "34+5-6=", "7-1="]
    ours = generate_static(model, tokenizer, prompts, 2, 12, greedy=True)
    theirs = generate_compacting(model, tokenizer, prompts, 2, 12, greedy=True)
    assert [s.response_ids for s in ours] == [s.response_ids for s in theirs]
    assert [s.finish_reason for s in ours] == [s.finish_reason for s in theirs]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))  # the last token impossible
    torch.manual_seed(1)
    token, _ = sample_next(logits.repeat(20000, 1), 1.0, greedy=False)
    freq = torch.bincount(token, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015, rtol=0)
