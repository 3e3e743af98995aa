"""Tests for rollout.engine.generate and rollout.worker.RolloutWorker on a tiny random Qwen2 student (CPU).

The central property: the log-probs ``generate`` returns (from HF generate's per-step logits over left-padded
prompts with a KV cache) are the ones a plain full forward pass over prompt + response gives, so the trainer's
importance ratio starts at exactly 1 for on-policy data.
"""
from __future__ import annotations

import pytest
import torch

from rlhf.core.algorithms.tokens import token_logprobs
from rlhf.core.config.run_config import ModelConfig, RolloutConfig
from rlhf.core.models.build import build_student, build_tokenizer, save_student
from rollout.engine import generate
from rollout.worker import RolloutWorker, StaleWeightsError

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
PROMPTS = ["1+2=", "34+5-6="]  # different lengths: the shorter one is left-padded inside generate


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("char")


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_student(TINY, tokenizer, seed=0).eval()


def _force_eos(model, eos: int, value: float, only_step: int | None = None, only_row: int | None = None):
    """Add ``value`` to the end-of-sequence logit (at one decoding step / one row when given). Returns the hook
    handle; the caller removes it."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if only_step is not None and calls["n"] != only_step:
            return output
        output = output.clone()
        rows = slice(None) if only_row is None else only_row
        output[rows, ..., eos] += value
        return output

    return model.lm_head.register_forward_hook(hook)


def _recomputed_logprobs(model, sample, temperature: float) -> torch.Tensor:
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(ids).logits
    return token_logprobs(logits / temperature, ids)[0, len(sample.prompt_ids):]


# ------------------------------------------------------------------------------------------------ generate


def test_generate_groups_n_samples_per_prompt_with_unpadded_prompt_ids(model, tokenizer):
    torch.manual_seed(0)
    samples = generate(model, tokenizer, PROMPTS, n=3, max_new_tokens=6)
    assert len(samples) == 6
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    for s in samples:
        expected = tokenizer(PROMPTS[s.prompt_index], add_special_tokens=False).input_ids
        assert s.prompt_ids == expected
        assert tokenizer.pad_token_id not in s.prompt_ids
        assert len(s.logprobs) == len(s.response_ids)
        assert 1 <= len(s.response_ids) <= 6
        assert s.text == tokenizer.decode(s.response_ids, skip_special_tokens=True)
        assert all(lp <= 0.0 for lp in s.logprobs)


def test_finish_reason_is_consistent_with_eos_and_length_for_sampled_responses(model, tokenizer):
    torch.manual_seed(1)
    eos = tokenizer.eos_token_id
    for s in generate(model, tokenizer, PROMPTS, n=3, max_new_tokens=8):
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == eos and eos not in s.response_ids[:-1]
        else:
            assert s.finish_reason == "length"
            assert eos not in s.response_ids and len(s.response_ids) == 8


def test_no_eos_within_max_new_tokens_gives_length_and_full_length_response(model, tokenizer):
    handle = _force_eos(model, tokenizer.eos_token_id, -1e4)
    try:
        torch.manual_seed(0)
        samples = generate(model, tokenizer, PROMPTS, n=3, max_new_tokens=5)
    finally:
        handle.remove()
    for s in samples:
        assert s.finish_reason == "length"
        assert len(s.response_ids) == 5 and len(s.logprobs) == 5
        assert tokenizer.eos_token_id not in s.response_ids
        assert s.text == tokenizer.decode(s.response_ids, skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_full_forward_logprobs_at_temperature(model, tokenizer, temperature):
    torch.manual_seed(2)
    samples = generate(model, tokenizer, PROMPTS, n=3, max_new_tokens=8, temperature=temperature)
    for s in samples:
        torch.testing.assert_close(torch.tensor(s.logprobs), _recomputed_logprobs(model, s, temperature),
                                   atol=1e-4, rtol=0)


def test_sampling_logprobs_depend_on_temperature(model, tokenizer):
    # The same tokens scored at another temperature must give other numbers: generate really scales the logits.
    torch.manual_seed(3)
    s = generate(model, tokenizer, PROMPTS[:1], n=1, max_new_tokens=6, temperature=0.7)[0]
    assert not torch.allclose(torch.tensor(s.logprobs), _recomputed_logprobs(model, s, 1.0), atol=1e-3)


def test_greedy_generation_is_deterministic_and_takes_the_argmax(model, tokenizer):
    torch.manual_seed(0)
    first = generate(model, tokenizer, PROMPTS, n=2, max_new_tokens=6, greedy=True)
    torch.manual_seed(123)
    second = generate(model, tokenizer, PROMPTS, n=2, max_new_tokens=6, greedy=True)
    assert first == second
    for s in first:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0]
        start = len(s.prompt_ids)
        predicted = logits[start - 1: start - 1 + len(s.response_ids)].argmax(-1).tolist()
        assert predicted == s.response_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), _recomputed_logprobs(model, s, 1.0), atol=1e-4, rtol=0)


def test_forced_eos_first_gives_stop_and_a_response_of_just_eos(model, tokenizer):
    eos = tokenizer.eos_token_id
    handle = _force_eos(model, eos, 1e4)
    try:
        samples = generate(model, tokenizer, PROMPTS, n=2, max_new_tokens=6, greedy=True)
    finally:
        handle.remove()
    for s in samples:
        assert s.finish_reason == "stop"
        assert s.response_ids == [eos]
        assert len(s.logprobs) == 1
        assert s.text == ""


def test_eos_in_one_row_truncates_that_row_only_and_keeps_eos(model, tokenizer):
    # Step 1 is the prefill, step 3 decodes the third response token: row 0 stops there, row 1 runs to the limit.
    eos = tokenizer.eos_token_id
    handle = _force_eos(model, eos, 1e4, only_step=3, only_row=0)
    try:
        samples = generate(model, tokenizer, PROMPTS, n=1, max_new_tokens=6, greedy=True)
    finally:
        handle.remove()
    stopped, running = samples
    assert stopped.finish_reason == "stop"
    assert len(stopped.response_ids) == 3 and stopped.response_ids[-1] == eos
    assert eos not in stopped.response_ids[:-1]
    assert stopped.text == tokenizer.decode(stopped.response_ids[:-1])
    assert len(stopped.logprobs) == 3
    # The tokens before eos are the unhooked greedy ones.
    assert stopped.logprobs[:2] == pytest.approx(_recomputed_logprobs(model, stopped, 1.0)[:2].tolist(), abs=1e-4)
    assert running.finish_reason == "length" and len(running.response_ids) == 6


# ------------------------------------------------------------------------------------------- RolloutWorker


@pytest.fixture
def worker(model, tokenizer, tmp_path):
    save_student(model, tokenizer, tmp_path / "policy")
    # Pass the current thread count so the worker's torch.set_num_threads leaves the test process as it was.
    return RolloutWorker(str(tmp_path / "policy"), RolloutConfig(threads=torch.get_num_threads()), seed=0)


def _logits(model, text_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([text_ids])).logits


def test_worker_load_weights_installs_new_weights_and_sets_version(worker, tokenizer):
    ids = tokenizer("7+8=", add_special_tokens=False).input_ids
    before = _logits(worker.engine.model, ids)
    other = build_student(TINY, tokenizer, seed=1).eval()
    seconds = worker.load_weights({k: v.clone() for k, v in other.state_dict().items()}, version=1)
    assert seconds >= 0.0
    assert worker.version == 1
    after = _logits(worker.engine.model, ids)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _logits(other, ids))
    samples = worker.generate(["7+8="], n=2, max_new_tokens=4, temperature=1.0, greedy=True, expected_version=1)
    assert samples == generate(other, tokenizer, ["7+8="], n=2, max_new_tokens=4, greedy=True)


def test_worker_accepts_state_dict_without_tied_lm_head(worker, tokenizer):
    other = build_student(TINY, tokenizer, seed=1)
    state = {k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}
    worker.load_weights(state, version=4)
    assert worker.version == 4
    torch.testing.assert_close(worker.engine.model.lm_head.weight, other.model.embed_tokens.weight)


def test_worker_generate_with_stale_version_raises(worker):
    assert worker.version == 0
    worker.generate(["1+1="], n=1, max_new_tokens=2, temperature=1.0, greedy=True, expected_version=0)
    with pytest.raises(StaleWeightsError, match="v0.*v1"):
        worker.generate(["1+1="], n=1, max_new_tokens=2, temperature=1.0, greedy=True, expected_version=1)


def test_worker_load_weights_with_unknown_or_missing_keys_raises_value_error_and_keeps_weights(worker, tokenizer):
    state = build_student(TINY, tokenizer, seed=1).state_dict()
    with pytest.raises(ValueError, match="unexpected"):
        worker.load_weights({**state, "not.a.weight": torch.zeros(1)}, version=1)
    missing = {k: v for k, v in state.items() if "layers.0.mlp" not in k}
    ids = [4, 5, 6]
    before = _logits(worker.engine.model, ids)
    with pytest.raises(ValueError, match="missing"):
        worker.load_weights(missing, version=1)
    assert worker.version == 0
    # A refused state dict leaves the old weights whole, not half-replaced.
    torch.testing.assert_close(_logits(worker.engine.model, ids), before)


def test_worker_load_weights_from_a_model_of_another_size_raises_value_error_and_keeps_weights(worker, tokenizer):
    ids = tokenizer("3+4=", add_special_tokens=False).input_ids
    before = _logits(worker.engine.model, ids)
    bigger = build_student(ModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64), tokenizer, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        worker.load_weights(bigger.state_dict(), version=1)
    assert worker.version == 0
    torch.testing.assert_close(_logits(worker.engine.model, ids), before)
