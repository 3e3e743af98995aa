"""Fully asynchronous RL with partial rollouts (issue 36): weights installed between decoding steps, each token's
version recorded (rollout/partial.py), per-token staleness bounded (rlhf/core/algorithms/staleness.py), and the
run end to end on Ray: staleness 0 bit-identical to synchronous, staleness 1 overlapped with versions per token
and resumed from a checkpoint that held a batch in flight, bit for bit."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import rlhf
from rlhf.core.algorithms.staleness import bound_staleness
from rlhf.core.config.run_config import ModelConfig, RunConfig
from rlhf.core.data.samples import Sample
from rlhf.core.models.build import build_student, build_tokenizer
from rlhf.registered import check_registered, fit_partial_rollouts
from rollout.engine import generate_compacting
from rollout.partial import generate_partial
from rollout.static_engine import generate_static

SMALL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _models():
    tokenizer = build_tokenizer("char")
    return tokenizer, [build_student(SMALL, tokenizer, seed).eval() for seed in (0, 1)]


@pytest.mark.parametrize("decode", [generate_compacting, generate_static])
def test_tokens_after_a_swap_come_from_the_new_weights_exactly(decode):
    """New weights arrive after the third decoding step: the unfinished responses continue from them, and every
    token's sampler log-prob equals the log-prob its recorded version gives it on its own prefix."""
    tokenizer, models = _models()
    held = {"model": models[0], "version": 0, "calls": 0, "steps": 0}

    def generate(prompts, n, new, stop):
        held["calls"] += 1
        return decode(held["model"], tokenizer, prompts, n, new, 1.0, False, stop_early=stop)

    def waiting() -> bool:
        held["steps"] += 1
        return held["version"] == 0 and held["steps"] == 3

    def install():
        held["model"], held["version"] = models[1], 1

    torch.manual_seed(0)
    samples = generate_partial(generate, ["3+4=", "12-5="], 2, 12, lambda: held["version"], waiting, install,
                               lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    assert held["calls"] == 2 and len(samples) == 4
    assert sum(s.token_versions[-1] == 1 for s in samples) >= 2  # most rows ran on across the swap
    for sample in samples:
        k = len(sample.response_ids)
        assert sample.token_versions == [0] * min(k, 3) + [1] * (k - 3)
        assert sample.finish_reason == ("length" if k == 12 else "stop")
        assert sample.text == tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        ids = torch.tensor([sample.prompt_ids + sample.response_ids])
        start = len(sample.prompt_ids)
        for version, model in enumerate(models):
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, start - 1:-1].float(), -1)
            recomputed = logp.gather(-1, torch.tensor(sample.response_ids)[:, None])[:, 0]
            at = [k for k, v in enumerate(sample.token_versions) if v == version]
            torch.testing.assert_close(torch.tensor(sample.logprobs)[at], recomputed[at], rtol=0, atol=2e-5)


def test_without_a_swap_partial_generation_is_the_engines_own():
    tokenizer, (model, _) = _models()
    torch.manual_seed(3)
    plain = generate_static(model, tokenizer, ["3+4=", "12-5="], 3, 10)
    torch.manual_seed(3)
    partial = generate_partial(lambda p, n, new, stop: generate_static(model, tokenizer, p, n, new, stop_early=stop),
                               ["3+4=", "12-5="], 3, 10, lambda: 5, lambda: False, lambda: None, tokenizer.decode)
    assert [s.response_ids for s in partial] == [s.response_ids for s in plain]
    assert [s.logprobs for s in partial] == [s.logprobs for s in plain]
    assert all(s.token_versions == [5] * len(s.response_ids) for s in partial)


def test_tokens_older_than_the_bound_carry_no_loss():
    def sample(versions, mask=None):
        return Sample(0, [1], list(range(len(versions))), [0.0] * len(versions), "stop", "", loss_mask=mask,
                      token_versions=versions)

    plain = Sample(0, [1], [5], [0.0], "stop", "")
    out, figures = bound_staleness([sample([3, 3, 5, 5]), sample([5, 5], mask=[1, 0]), plain], 5, 1)
    assert out[0].loss_mask == [0, 0, 1, 1] and out[1].loss_mask == [1, 0] and out[2] is plain
    # ages: 2 2 0 0 | 0 0; masked: the two age-2 tokens (the observation at age 0 was masked already)
    assert figures == {"perf/staleness": pytest.approx(4 / 6), "perf/staleness_max": 2,
                       "perf/stale_tokens_masked": pytest.approx(2 / 6), "charts/versions_per_response": 1.5}
    assert bound_staleness([plain], 5, 0) == ([plain], {})


@pytest.mark.parametrize("overrides, says", [
    ({"rollout": {"partial_rollouts": True}}, "rollout.asynchronous=true"),
    ({"rollout": {"partial_rollouts": True, "asynchronous": True, "weight_sync": "broadcast"}}, "object_store"),
    ({"rollout": {"partial_rollouts": True, "asynchronous": True, "environment": "calculator"}}, "environment"),
])
def test_partial_rollouts_refuse_what_they_cannot_do(overrides, says):
    with pytest.raises(ValueError, match=says):
        RunConfig(**overrides)


def test_an_engine_without_a_decode_loop_of_ours_falls_back_to_one_step_off_and_says_so():
    said = []
    for engine in ("hf", "vllm"):
        cfg = RunConfig(rollout={"partial_rollouts": True, "asynchronous": True, "engine": engine, "max_staleness": 2})
        check_registered(cfg)
        fitted = fit_partial_rollouts(cfg, said.append)
        assert not fitted.rollout.partial_rollouts and fitted.rollout.asynchronous and fitted.rollout.max_staleness == 2
        assert cfg.rollout.partial_rollouts  # the caller's config is left as it was
    assert len(said) == 2 and "vllm engine cannot take new weights" in said[1] and "one-step-off" in said[1]
    kept = RunConfig(rollout={"partial_rollouts": True, "asynchronous": True, "engine": "hf_static"})
    assert fit_partial_rollouts(kept, said.append) is kept and len(said) == 2


def _run(out, save_every: int = 0, resume: bool = False, **rollout) -> tuple[list[dict], dict]:
    cfg = rlhf.RunConfig(
        output_dir=str(out), stages=["warmup", "rl"], save_every=save_every,
        model={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
        task={"train_prompts": 64, "eval_prompts": 8}, warmup={"steps": 4, "batch_size": 8},
        rollout={"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 12, **rollout},
        trainer={"num_ranks": 1, "micro_batch_size": 8, "lr": 1e-3}, algorithm={"steps": 3, "tis_cap": 2.0})
    rlhf.run(cfg, log=lambda line: None, resume=resume)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file
    return metrics, load_file(out / "policy" / "model.safetensors")


@pytest.mark.parametrize("engine", ["hf_compact"])
def test_staleness_zero_is_the_synchronous_run_bit_for_bit_and_one_overlaps(tmp_path, engine):
    pytest.importorskip("deepspeed")
    sync, sync_weights = _run(tmp_path / "sync", engine=engine)
    zero, zero_weights = _run(tmp_path / "zero", engine=engine, asynchronous=True, partial_rollouts=True,
                              max_staleness=0)
    for a, b in zip(sync, zero):
        for key in ("reward/mean", "losses/policy_loss", "losses/grad_norm", "charts/response_tokens"):
            assert a[key] == b[key], key
        assert b["perf/staleness"] == 0 and b["perf/stale_tokens_masked"] == 0
    for name, weight in sync_weights.items():
        assert torch.equal(weight, zero_weights[name]), name
    overlapped = {"engine": engine, "asynchronous": True, "partial_rollouts": True, "max_staleness": 1}
    one, one_weights = _run(tmp_path / "one", save_every=2, **overlapped)
    assert [m["step"] for m in one] == [1, 2, 3]
    assert all(0 <= m["perf/staleness"] <= m["perf/staleness_max"] <= 2 for m in one)
    assert all(m["perf/stale_tokens_masked"] <= 1 and m["charts/versions_per_response"] >= 1 for m in one)
    assert one[0]["perf/staleness"] == 0  # the first batch: nothing trained yet

    # Resumed from the step-2 checkpoint, which waited for batch 3 (sampled across the v2 sync) and stored it with
    # its tokens' versions: step 3 trains exactly those samples again, so even this timing-dependent run repeats.
    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    (tmp_path / "resumed" / "summary.json").unlink()
    resumed, resumed_weights = _run(tmp_path / "resumed", save_every=2, resume=True, **overlapped)
    assert [_no_timings(m) for m in resumed] == [_no_timings(m) for m in one]
    assert all(torch.equal(weight, resumed_weights[name]) for name, weight in one_weights.items())


def _no_timings(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("perf/") or "stale" in k or k == "perf/logprob_mismatch"}
