"""Multi-turn rollouts keep token ids in and out (rollout/multi_turn.py): the trainer's forward over a trajectory's
ids gives the sampler's log-probs on every model token, observation tokens carry no loss, and each limit ends a
trajectory with its own finish reason."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from rlhf.core.algorithms.advantages import gae_advantages
from rlhf.core.algorithms.tokens import token_logprobs
from rlhf.core.config.data_config import ModelConfig
from rlhf.core.config.rl_config import MultiTurnConfig
from rlhf.core.data.batch import make_train_batch
from rlhf.core.config.run_config import RolloutConfig, RunConfig
from rlhf.core.data.samples import Sample
from rlhf.core.models.build import build_student, build_tokenizer
from reward.scoring.worker import RewardWorker
from rollout.engines import ENGINES
from rollout.environments import Environment, StepResult
from rollout.multi_turn import MultiTurnRollout
from rollout.worker import RolloutWorker

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
TEMPERATURE = 0.9


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE where "a" then "b" re-tokenise as the one token "ab": a text round trip changes the ids."""
    vocab = {"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "ab": 4, "c": 5, "=": 6}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token=None))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


class Echo(Environment):
    """Answers every turn with "b" until ``turns`` turns are done (or never, with ``turns`` None); reports a tool
    error per turn when ``errors``."""

    def __init__(self, turns: int | None = 2, errors: bool = False):
        super().__init__()
        self.left, self.errors = turns, errors

    def step(self, turn: str) -> StepResult:
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                return StepResult("", True)
        return StepResult("bc", False, {"tool_calls": 1, "tool_errors": int(self.errors), "tool_s": 0.01})


@pytest.fixture(scope="module")
def tokenizer():
    return merging_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_student(TINY, tokenizer, seed=0).eval()


def _rollout(engine, tokenizer, make_env, limits: MultiTurnConfig, prompts=("a=", "cab="), n=3, max_new=6):
    def sample(ids, k, max_new_tokens):
        return engine.generate(ids, k, max_new_tokens, TEMPERATURE, False)
    return MultiTurnRollout(tokenizer, make_env, limits).run(sample, list(prompts), n, max_new)


def _eos_likely(model, eos: int):
    """Turns end early: a large end-of-sequence logit, so trajectories reach several turns."""
    return model.lm_head.register_forward_hook(lambda m, i, out: out + 3.0 * torch.nn.functional.one_hot(
        torch.tensor(eos), out.shape[-1]).to(out.dtype))


@pytest.mark.parametrize("name", ["hf_compact", "hf"])
def test_trainer_logprobs_equal_the_samplers_on_model_tokens_where_retokenising_would_differ(
        name, model, tokenizer):
    engine = ENGINES[name].from_model(model, tokenizer)
    torch.manual_seed(0)
    with _eos_likely(model, tokenizer.eos_token_id):
        samples = _rollout(engine, tokenizer, lambda: Echo(3), MultiTurnConfig(max_turns=3, max_total_tokens=40))
    assert max(s.episode["turns"] for s in samples) >= 2  # observations really sit between model turns
    batch = make_train_batch(samples, torch.ones(len(samples)), tokenizer.pad_token_id, "token-mean", 40)
    with torch.no_grad(), _eos_likely(model, tokenizer.eos_token_id):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    recomputed = token_logprobs(logits / TEMPERATURE, batch.input_ids)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(recomputed[mask], batch.rollout_logprobs[mask], atol=2e-5, rtol=0)
    # The same conversation as text, tokenised again, is other tokens: an "a" sampled before the observation's
    # "b" merges into "ab", and the turns' end-of-sequence tokens are gone from the decoded text.
    retokenised = [tokenizer(tokenizer.decode(s.prompt_ids) + s.text, add_special_tokens=False).input_ids
                   for s in samples]
    assert any(r != s.prompt_ids + s.response_ids for r, s in zip(retokenised, samples))
    assert any(4 in r and 4 not in s.response_ids for r, s in zip(retokenised, samples))  # a merge made "ab"


def test_observation_tokens_carry_no_loss(model, tokenizer):
    engine = ENGINES["hf_compact"].from_model(model, tokenizer)
    torch.manual_seed(1)
    with _eos_likely(model, tokenizer.eos_token_id):
        samples = _rollout(engine, tokenizer, lambda: Echo(3), MultiTurnConfig(max_turns=3, max_total_tokens=40))
    batch = make_train_batch(samples, torch.ones(len(samples)), tokenizer.pad_token_id, "token-mean", 40)
    observation = tokenizer("bc", add_special_tokens=False).input_ids
    for row, s in enumerate(samples):
        start = len(s.prompt_ids)
        assert len(s.loss_mask) == len(s.response_ids) == len(s.logprobs)
        env_positions = [start + i for i, m in enumerate(s.loss_mask) if m == 0]
        assert len(env_positions) == len(observation) * (s.episode["turns"] - (s.finish_reason == "stop"))
        for p in env_positions:
            assert batch.response_mask[row, p] == 0 and batch.loss_weights[row, p] == 0
            assert batch.advantages[row, p] == 0 and batch.rollout_logprobs[row, p] == 0
        assert all(batch.response_mask[row, start + i] == 1 for i, m in enumerate(s.loss_mask) if m)
    assert torch.isclose(batch.loss_weights.sum(), torch.tensor(1.0))  # token-mean over model tokens only


class ShapedEcho(Echo):
    """Echo whose every tool turn is worth -0.25 (per-turn shaping)."""

    def step(self, turn: str) -> StepResult:
        result = super().step(turn)
        return result if result.done else StepResult(result.observation, False, {**result.info, "turn_reward": -0.25})


def test_turn_rewards_add_up_over_a_trajectory(model, tokenizer):
    engine = ENGINES["hf_compact"].from_model(model, tokenizer)
    torch.manual_seed(1)
    with _eos_likely(model, tokenizer.eos_token_id):
        samples = _rollout(engine, tokenizer, lambda: ShapedEcho(3), MultiTurnConfig(max_turns=3, max_total_tokens=40))
    for s in samples:  # every turn but a final answer was a tool turn
        assert s.episode["turn_reward"] == pytest.approx(-0.25 * (s.episode["turns"] - (s.finish_reason == "stop")))
    assert any(s.episode["turn_reward"] < 0 for s in samples)


@pytest.mark.parametrize("make_env, limits, reason", [
    (lambda: Echo(1), MultiTurnConfig(), "stop"),
    (lambda: Echo(None), MultiTurnConfig(max_turns=2, max_total_tokens=200), "max_turns"),
    (lambda: Echo(None, errors=True), MultiTurnConfig(max_tool_errors=1, max_total_tokens=200), "tool_error"),
    (lambda: Echo(None), MultiTurnConfig(max_turns=50, max_total_tokens=9), "length"),
])
def test_each_limit_ends_a_trajectory_with_its_finish_reason(model, tokenizer, make_env, limits, reason):
    engine = ENGINES["hf_compact"].from_model(model, tokenizer)
    torch.manual_seed(2)
    with _eos_likely(model, tokenizer.eos_token_id):
        samples = _rollout(engine, tokenizer, make_env, limits, max_new=8)
    stopped = [s for s in samples if s.finish_reason != "length"] if reason != "length" else samples
    assert stopped and {s.finish_reason for s in stopped} == {reason}
    assert all(len(s.response_ids) <= limits.max_total_tokens and s.episode["turns"] <= limits.max_turns
               for s in samples)
    if reason == "max_turns":
        assert all(s.episode["turns"] == 2 for s in stopped)


def test_gae_skips_observation_tokens_between_model_turns():
    # Model tokens at 0 and 3, an observation at 1-2; the reward 1 on the last model token.
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 9.0, 0.2]])  # the observation's values are never read
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.5, lam=1.0)
    # A_3 = 1 - 0.2 = 0.8;  A_0 = (0 + 0.5 * 0.2 - 0.5) + 0.5 * 0.8 = 0.0: turn 1's next state is turn 2's first.
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.0, 0.0, 0.8]]))
    torch.testing.assert_close(returns, torch.tensor([[0.5, 0.0, 0.0, 1.0]]))
    advantages, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.0, 0.0, 0.8]]))  # G - V on every model token


class ScriptedEngine:
    """A rollout engine that calls the calculator on the prompt's chain, then answers with the result it was given
    (token ids in, as the multi-turn rollout hands them)."""

    def __init__(self, model_dir=None, rollout=None):
        self.tokenizer = build_tokenizer("char")

    def generate(self, prompts, n, max_new_tokens, temperature, greedy):
        samples = []
        for index, ids in enumerate(prompts):
            seen = self.tokenizer.decode(ids, skip_special_tokens=True)
            turn = (f"#{seen.split('<result>')[1].split('</result>')[0]}" if "<result>" in seen
                    else f"<call>calculator {seen.rstrip('=')}</call>")
            out = self.tokenizer(turn, add_special_tokens=False).input_ids[:max_new_tokens]
            reason = "length" if len(out) == max_new_tokens else "stop"
            out += [self.tokenizer.eos_token_id] if reason == "stop" else []
            samples += [Sample(index, ids, out, [-0.5] * len(out), reason, turn) for _ in range(n)]
        return samples


def test_a_rollout_worker_in_the_calculator_environment_is_verified_on_the_final_turn():
    rollout = RolloutConfig(environment="calculator", max_new_tokens=40)
    worker = RolloutWorker("unused", rollout, seed=0, engine=ScriptedEngine)
    samples = worker.generate(["7+5-3+9=", "4-2="], 2, 40, 1.0, False, expected_version=0)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    first = samples[0]
    assert first.text == "<call>calculator 7+5-3+9</call><result>18</result>#18" and first.final_text == "#18"
    assert first.finish_reason == "stop" and first.episode == {**first.episode, "turns": 2, "tool_calls": 1}
    observation = len("<result>18</result>")
    turn = len("<call>calculator 7+5-3+9</call>") + 1
    assert first.loss_mask == [1] * turn + [0] * observation + [1] * 4
    verdicts = RewardWorker(RunConfig.model_validate({"reward": {"components": {"verifier": 1.0}}})).score(
        ["7+5-3+9="] * 2, [first.text, "#18 then <result>5</result>"], ["18", "18"],
        answers=[first.verified_text, "#5"])
    assert [v["correct"] for v in verdicts] == [1.0, 0.0]  # the verifier reads the final turn, not the text


def test_multi_turn_rollouts_replay_exactly_from_the_workers_rng_state(model, tokenizer):
    """What resume relies on: a trajectory batch is a function of the weights and the torch generator the worker
    checkpoints (environments and their threads draw nothing from it)."""
    engine = ENGINES["hf_compact"].from_model(model, tokenizer)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    with _eos_likely(model, tokenizer.eos_token_id):
        first = _rollout(engine, tokenizer, lambda: Echo(3), MultiTurnConfig(max_turns=3, max_total_tokens=40))
        torch.set_rng_state(state)
        again = _rollout(engine, tokenizer, lambda: Echo(3), MultiTurnConfig(max_turns=3, max_total_tokens=40))
    assert [(s.response_ids, s.logprobs, s.loss_mask) for s in first] == \
        [(s.response_ids, s.logprobs, s.loss_mask) for s in again]
    assert len({tuple(s.response_ids) for s in first}) > 1  # real sampling, not one fixed answer


def test_a_multi_turn_run_killed_after_a_checkpoint_resumes_to_the_same_metrics_and_weights(tmp_path):
    """Through Ray and the sandboxed calculator: a run that dies (SIGKILL) after step 3, past the step-2
    checkpoint, resumes to exactly what an uninterrupted run gives, tool-call figures included."""
    import signal
    import subprocess
    import sys

    from rlhf.cli import main
    from tests.paths import REPO
    from tests.rlhf.core.test_resume import KILLED_DRIVER, TINY, final_weights, metrics, without_timings

    pytest.importorskip("deepspeed")
    run = ["algorithm.steps=4", "save_every=2", "stages=[warmup, rl]", "rollout.environment=calculator",
           "warmup.tool_fraction=1.0", "warmup.steps=20", "rollout.max_new_tokens=24", "trainer.lr=0.01"]
    straight, out = tmp_path / "straight", tmp_path / "killed"
    assert main(["run", TINY, f"output_dir={straight}", *run]) == 0
    killed = subprocess.run([sys.executable, "-c", KILLED_DRIVER, TINY, f"output_dir={out}", *run], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert main(["run", TINY, f"output_dir={out}", *run, "--resume"]) == 0
    expected, resumed = metrics(straight), metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert "episode/turns" in expected[-1]
    for a, b in zip(expected, resumed):
        assert without_timings(a).keys() == without_timings(b).keys()
        for key, value in without_timings(a).items():
            assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (a["step"], key)
    for name, weight in final_weights(straight).items():
        torch.testing.assert_close(final_weights(out)[name], weight, rtol=0, atol=1e-6, msg=name)
