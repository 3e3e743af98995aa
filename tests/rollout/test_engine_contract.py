"""The rollout-engine contract (rollout/engines.py), one module run against every engine: ``hf`` and a stand-in
registered here (one full forward per token, no KV cache: an independent implementation, so the checks rely on
nothing but the interface). A new engine joins by adding its name to ENGINE_NAMES; the vLLM engine runs these same
checks from its GPU-only module (tests/rollout/test_vllm_engine.py), which overrides the fixtures ``engine``, ``shape``
(vLLM's attention kernels want wider heads) and ``logprob_atol`` (bf16).

Checks: ``n`` samples per prompt, grouped in prompt order; prompts given as token ids taken as is; the sampler's
log-probs equal a recomputed full forward at the temperature; finish reasons agree with end-of-sequence and the length cap; ``load_weights`` changes what is
sampled and refuses a state dict of another shape, keeping the old weights; through a RolloutWorker, the version
check and the timing it records.
"""
from __future__ import annotations

import pytest
import torch

from rlhf.core.algorithms.tokens import token_logprobs
from rlhf.core.config.run_config import ModelConfig, RolloutConfig
from rlhf.core.models.build import build_student, build_tokenizer, load_student, save_student
from rlhf.core.data.samples import Sample
from rollout import static_engine  # noqa: F401 - registers hf_static
from rollout.engines import ENGINES, HFEngine
from rollout.worker import RolloutWorker, StaleWeightsError

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
PROMPTS = ["1+2=", "34+5-6="]  # of different lengths


class OneTokenAtATimeEngine(HFEngine):
    """The stand-in: the policy's full forward over prompt + response so far for every token (a prompt's ``n`` rows
    at once: they have the same length), sampling with torch.multinomial. Loads weights as the hf engine does."""

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                 greedy: bool) -> list[Sample]:
        eos, samples = self.tokenizer.eos_token_id, []
        for index, prompt in enumerate(prompts):
            ids = prompt if isinstance(prompt, list) else self.tokenizer(prompt, add_special_tokens=False).input_ids
            rows = torch.tensor([ids] * n, device=self.model.device)
            logprobs = []
            for _ in range(max_new_tokens):
                logp = torch.log_softmax(self.model(rows).logits[:, -1].float() / (1.0 if greedy else temperature),
                                         dim=-1)
                tokens = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(-1)
                logprobs.append(logp.gather(-1, tokens[:, None]).squeeze(-1))
                rows = torch.cat([rows, tokens[:, None]], dim=1)
            for response, logps in zip(rows[:, len(ids):].tolist(), torch.stack(logprobs, 1).tolist()):
                end = response.index(eos) + 1 if eos in response else len(response)  # what follows eos is dropped
                samples.append(Sample(index, ids, response[:end], logps[:end], "stop" if eos in response else "length",
                                      self.tokenizer.decode(response[:end], skip_special_tokens=True)))
        return samples


if "one_token_at_a_time" not in ENGINES:
    ENGINES.register("one_token_at_a_time", OneTokenAtATimeEngine)
ENGINE_NAMES = ["hf", "hf_compact", "hf_static", "one_token_at_a_time"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("char")


@pytest.fixture(scope="module")
def shape() -> ModelConfig:
    return TINY


@pytest.fixture(scope="module")
def logprob_atol() -> float:
    return 1e-4


@pytest.fixture(scope="module")
def model_dir(tokenizer, shape, tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    save_student(build_student(shape, tokenizer, seed=0), tokenizer, path)
    return str(path)


@pytest.fixture(scope="module")
def other_weights(tokenizer, shape):
    """Another policy of the same shape."""
    return build_student(shape, tokenizer, seed=1).eval()


@pytest.fixture(params=ENGINE_NAMES)
def engine(request, model_dir):
    return ENGINES[request.param](model_dir, RolloutConfig(threads=torch.get_num_threads()))


def recomputed(model, sample: Sample, temperature: float) -> torch.Tensor:
    """The sample's response-token log-probs from one full forward of ``model`` at ``temperature``."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(ids).logits.float()
    return token_logprobs(logits / temperature, ids)[0, len(sample.prompt_ids):]


def uniform_policy(tokenizer, shape) -> torch.nn.Module:
    """A policy whose every next-token distribution is uniform (final norm zeroed): end-of-sequence comes at
    random, so sampled responses both stop and hit the length cap."""
    model = build_student(shape, tokenizer, seed=2).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model


def test_n_samples_per_prompt_grouped_in_prompt_order(engine, tokenizer):
    torch.manual_seed(0)
    samples = engine.generate(PROMPTS, 3, 6, 1.0, False)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    for s in samples:
        assert s.prompt_ids == tokenizer(PROMPTS[s.prompt_index], add_special_tokens=False).input_ids
        assert 1 <= len(s.response_ids) <= 6 and len(s.logprobs) == len(s.response_ids)
        assert s.text == tokenizer.decode(s.response_ids, skip_special_tokens=True)


def test_prompts_given_as_token_ids_are_taken_as_is(engine, tokenizer):
    """Multi-turn rollouts continue from the ids sampled so far (rollout/multi_turn.py): ids a text would not
    tokenise to (an end-of-sequence inside) are the prompt exactly, and text and its ids sample alike."""
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    as_text, as_ids = (engine.generate(prompts, 1, 6, 1.0, True) for prompts in (PROMPTS, ids))
    assert [(s.prompt_ids, s.response_ids) for s in as_text] == [(s.prompt_ids, s.response_ids) for s in as_ids]
    inner_eos = ids[1][:2] + [tokenizer.eos_token_id] + ids[1][2:]
    assert [s.prompt_ids for s in engine.generate([inner_eos], 2, 4, 1.0, False)] == [inner_eos, inner_eos]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_equal_a_recomputed_forward_at_the_temperature(engine, model_dir, temperature, logprob_atol):
    reference, _ = load_student(model_dir)
    torch.manual_seed(1)
    for s in engine.generate(PROMPTS, 2, 8, temperature, False):
        torch.testing.assert_close(torch.tensor(s.logprobs), recomputed(reference, s, temperature),
                                   atol=logprob_atol, rtol=0)


def test_finish_reasons_agree_with_end_of_sequence_and_the_length_cap(engine, tokenizer, shape, logprob_atol):
    engine.load_weights(uniform_policy(tokenizer, shape).state_dict())
    torch.manual_seed(2)
    samples = engine.generate(PROMPTS, 12, 48, 1.0, False)
    eos = tokenizer.eos_token_id
    for s in samples:
        assert eos not in s.response_ids[:-1]
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == eos
        else:
            assert s.finish_reason == "length" and len(s.response_ids) == 48 and s.response_ids[-1] != eos
        # Uniform over the vocabulary: every token's log-prob is exactly -log(vocabulary).
        uniform = -torch.log(torch.tensor(float(len(tokenizer)))).item()
        assert s.logprobs == pytest.approx([uniform] * len(s.logprobs), abs=logprob_atol)
    assert {s.finish_reason for s in samples} == {"stop", "length"}


@pytest.mark.parametrize("name", ["hf", "hf_compact", "hf_static"])
def test_the_hf_engines_keep_the_saved_min_new_tokens(name, model_dir, tokenizer, shape, logprob_atol):
    # The forced-length benchmarks save min_new_tokens in the student's generation config; both hf engines must
    # keep end-of-sequence out until then and record the log-probs of the distribution without it.
    engine = ENGINES[name](model_dir, RolloutConfig(threads=torch.get_num_threads()))
    engine.load_weights(uniform_policy(tokenizer, shape).state_dict())
    engine.model.generation_config.min_new_tokens = 10
    torch.manual_seed(5)
    samples = engine.generate(PROMPTS, 12, 16, 1.0, False)
    vocabulary = float(len(tokenizer))
    for s in samples:
        assert len(s.response_ids) >= 10 and tokenizer.eos_token_id not in s.response_ids[:10]
        assert s.logprobs[:10] == pytest.approx([-torch.log(torch.tensor(vocabulary - 1)).item()] * 10,
                                                abs=logprob_atol)
        assert s.logprobs[10:] == pytest.approx([-torch.log(torch.tensor(vocabulary)).item()] * (len(s.logprobs) - 10),
                                                abs=logprob_atol)
    assert {s.finish_reason for s in samples} == {"stop", "length"}


def test_load_weights_changes_what_is_sampled(engine, model_dir, other_weights, logprob_atol):
    # Tiny random policies are all nearly uniform (the same seed may draw the same tokens from either): the
    # log-probs tell which weights sampled.
    original, _ = load_student(model_dir)
    engine.load_weights({k: v.clone() for k, v in other_weights.state_dict().items()})
    torch.manual_seed(3)
    for s in engine.generate(PROMPTS, 2, 6, 1.0, False):
        torch.testing.assert_close(torch.tensor(s.logprobs), recomputed(other_weights, s, 1.0), atol=logprob_atol,
                                   rtol=0)
        assert not torch.allclose(torch.tensor(s.logprobs), recomputed(original, s, 1.0), atol=logprob_atol)


def test_load_weights_refuses_another_shape_and_keeps_the_old_weights(engine, tokenizer, shape):
    before = engine.generate(PROMPTS, 1, 6, 1.0, True)
    bigger = build_student(shape.model_copy(update={"hidden_size": 2 * shape.hidden_size}), tokenizer, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        engine.load_weights(bigger.state_dict())
    assert engine.generate(PROMPTS, 1, 6, 1.0, True) == before


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_worker_checks_the_version_and_times_its_engine(name, model_dir, other_weights):
    worker = RolloutWorker(model_dir, RolloutConfig(engine=name, threads=torch.get_num_threads()), seed=0)
    assert isinstance(worker.engine, ENGINES[name])
    worker.generate(PROMPTS, 2, 4, 1.0, False, expected_version=0)
    with pytest.raises(StaleWeightsError, match="v0.*v1"):
        worker.generate(PROMPTS, 2, 4, 1.0, False, expected_version=1)
    worker.load_weights(other_weights.state_dict(), version=1)
    samples = worker.generate(PROMPTS, 2, 4, 1.0, False, expected_version=1)
    timing = worker.timing()
    assert timing["generate_s"] > 0 and timing["load_weights_s"] > 0
    assert timing["response_tokens"] == sum(len(s.response_ids) for s in samples)


def test_bf16_rollout_holds_bf16_weights_scores_in_float32_and_turns_tis_on(model_dir):
    from rlhf.core.config.run_config import RunConfig

    engine = HFEngine(model_dir, RolloutConfig(dtype="bfloat16", threads=torch.get_num_threads()))
    assert engine.model.dtype == torch.bfloat16
    reference, _ = load_student(model_dir)
    torch.manual_seed(4)
    for s in engine.generate(PROMPTS, 2, 6, 1.0, False):
        # bf16 logits, float32 log-softmax: near the float32 policy's, not equal (the mismatch TIS corrects).
        torch.testing.assert_close(torch.tensor(s.logprobs), recomputed(reference, s, 1.0), atol=5e-2, rtol=0)
    assert RunConfig(rollout={"dtype": "bfloat16"}).algorithm.tis_cap == 2.0
    assert RunConfig(rollout={"dtype": "bfloat16"}, algorithm={"tis_cap": 3.0}).algorithm.tis_cap == 3.0
    assert RunConfig(rollout={"dtype": "bfloat16"}, algorithm={"tis_cap": None}).algorithm.tis_cap is None
    assert RunConfig().algorithm.tis_cap is None
