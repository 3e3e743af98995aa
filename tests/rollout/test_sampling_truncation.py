"""Top-k / top-p sampling in both CPU samplers (rollout/engine.py ``generate`` and ``generate_compacting``): every
sampled token is inside the truncated set, and the recorded log-probs are those of the truncated distribution at
the temperature (what a full forward pass over prompt + response gives once truncated the same way), not of the
whole one. Also: the engines take rollout.top_p / rollout.top_k from the config."""
from __future__ import annotations

import pytest
import torch

from rlhf.core.config.run_config import ModelConfig, RolloutConfig, load_config
from rlhf.core.models.build import build_student, build_tokenizer, save_student
from rollout.engine import generate, generate_compacting, truncate
from rollout.engines import ENGINES
from rollout.static_engine import generate_static

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
PROMPTS = ["1+2=", "34+5-6="]


@pytest.fixture(scope="module")
def policy():
    """(model, tokenizer): a tiny random Qwen2 with the character tokenizer."""
    tokenizer = build_tokenizer("char")
    return build_student(TINY, tokenizer, seed=0).eval(), tokenizer


def truncated_logprobs(model, sample, temperature, top_k, top_p) -> torch.Tensor:
    """(response tokens, vocab) log-probs of the truncated distribution at each response position."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(sample.prompt_ids) - 1:-1].float()
    return torch.log_softmax(truncate(logits / temperature, top_k, top_p), dim=-1)


@pytest.mark.parametrize("sampler", [generate, generate_compacting, generate_static])
@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (5, 0.8)])
def test_samples_stay_in_the_truncated_set_with_its_logprobs(policy, sampler, top_k, top_p):
    model, tokenizer = policy
    torch.manual_seed(4)
    samples = sampler(model, tokenizer, PROMPTS, 4, 8, 0.7, False, top_p=top_p, top_k=top_k)
    for s in samples:
        logp = truncated_logprobs(model, s, 0.7, top_k, top_p)
        chosen = logp.gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        assert torch.isfinite(chosen).all()  # never a token the truncation removed
        torch.testing.assert_close(torch.tensor(s.logprobs), chosen, atol=1e-4, rtol=0)
        if top_k:
            assert (torch.isfinite(logp).sum(-1) <= top_k).all()
    # The truncated distribution's log-probs are larger than the whole one's for the same tokens.
    s = samples[0]
    whole = truncated_logprobs(model, s, 0.7, 0, 1.0).gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
    assert (torch.tensor(s.logprobs) >= whole - 1e-5).all() and (torch.tensor(s.logprobs) > whole + 1e-3).any()


def test_engines_sample_with_the_configs_top_p_and_top_k(policy, tmp_path):
    model, tokenizer = policy
    save_student(model, tokenizer, tmp_path)
    rollout = load_config("configs/tiny.yaml", ["rollout.top_k=1", "rollout.top_p=0.9"]).rollout
    assert (rollout.top_k, rollout.top_p) == (1, 0.9)
    for name in ("hf", "hf_compact", "hf_static"):
        engine = ENGINES[name](str(tmp_path), rollout)
        torch.manual_seed(0)
        sampled = engine.generate(PROMPTS, 2, 6, 1.0, False)
        greedy = engine.generate(PROMPTS, 2, 6, 1.0, True)
        assert [s.response_ids for s in sampled] == [s.response_ids for s in greedy]  # top_k 1: the argmax
        assert all(lp == pytest.approx(0.0, abs=1e-6) for s in sampled for lp in s.logprobs)
    with pytest.raises(ValueError):
        RolloutConfig(top_p=0)
