"""The head only at the response (rlhf/core/models/response_head.py): the same log-probs, entropies and gradients as
the full forward, padded, packed, through peft and without the hook firing."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlhf.core.algorithms.tokens import token_entropy, token_logprobs  # noqa: E402
from rlhf.core.data import packing  # noqa: E402
from rlhf.core.models import response_head  # noqa: E402
from tests.rlhf.core.data.test_packing import batch_of  # noqa: E402


def tiny_policy():
    config = transformers.Qwen2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def test_spread_puts_each_value_at_its_token_by_hand():
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    # Row-major over the response tokens: (0, 2), (0, 3), (1, 1), (1, 2).
    spread = response_head.spread(torch.tensor([1.0, 2.0, 3.0, 4.0]), mask)
    assert spread.tolist() == [[0, 0, 1, 2], [0, 3, 4, 0]]


@pytest.mark.parametrize("can_pack", [False, True])
def test_response_logprobs_entropy_and_gradients_equal_the_full_heads(policy, can_pack, monkeypatch):
    monkeypatch.setattr(response_head, "ENTROPY_CHUNK", 5)  # several pieces, the last one short
    batch = batch_of([9, 4, 3, 5, 3, 9, 2], width=10)
    (_, mb, _), = packing.micro_batches(batch, 7, "cpu", can_pack=can_pack)
    response = mb["response_mask"]

    def full():
        logits = policy(**packing.model_inputs(mb)).logits
        return (packing.zero_sequence_starts(token_logprobs(logits, mb["input_ids"]), mb) * response,
                token_entropy(logits) * response)

    def cut():
        logits = response_head.response_logits(policy, packing.model_inputs(mb), response)
        assert logits.shape == (int(response.sum()), 32)
        return (packing.zero_sequence_starts(response_head.response_logprobs(logits, mb["input_ids"], response), mb),
                response_head.response_entropy(logits, response))

    results = {}
    for name, forward in (("full", full), ("cut", cut)):
        policy.zero_grad()
        logp, entropy = forward()
        (logp.sum() + 0.1 * entropy.sum()).backward()
        results[name] = logp, entropy, {n: p.grad.clone() for n, p in policy.named_parameters()}
    (want_logp, want_h, want_grads), (got_logp, got_h, got_grads) = results["full"], results["cut"]
    torch.testing.assert_close(got_logp, want_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
    assert torch.all(got_logp[response == 0] == 0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The hook is gone: the next plain forward has logits at every position again.
    assert policy(**packing.model_inputs(mb)).logits.dim() == 3


def test_through_peft_and_with_adapters_off():
    from rlhf.core.models import lora

    peft_model = lora.wrap(tiny_policy(), {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    torch.nn.init.normal_(peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight)
    batch = batch_of([6, 5, 7], width=8, seed=2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    response = batch["response_mask"]
    for model in (peft_model, lora.AdaptersOff(peft_model)):
        with torch.no_grad():
            want = token_logprobs(model(**inputs).logits, batch["input_ids"]) * response
            logits = response_head.response_logits(model, inputs, response)
        got = response_head.response_logprobs(logits, batch["input_ids"], response)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_model_whose_head_is_not_called_as_a_module_is_cut_after_the_fact():
    class HeadAsFunction(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)

        def get_output_embeddings(self):
            return torch.nn.Linear(8, 16)  # a module the forward never calls

        def forward(self, input_ids, attention_mask):
            class Out:
                logits = self.embed(input_ids) @ self.embed.weight.T
            return Out()

    model = HeadAsFunction()
    ids = torch.tensor([[1, 2, 3, 4]])
    response = torch.tensor([[0, 0, 1, 1]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    logits = response_head.response_logits(model, inputs, response)
    got = response_head.response_logprobs(logits, ids, response)
    torch.testing.assert_close(got, token_logprobs(model(**inputs).logits, ids) * response)
