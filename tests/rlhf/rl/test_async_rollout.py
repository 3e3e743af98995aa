"""One-step-off asynchronous rollout end to end on Ray with a tiny student: four RL steps through rlhf.Trainer, an
evaluation while a batch is in flight and a checkpoint while the next one is; then the logged staleness and
weights versions, and a resume from that checkpoint that repeats the uninterrupted run bit for bit."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch

import rlhf
from rlhf.rl.ranks.policy import ASYNC_TRAINER_NICENESS

pytest.importorskip("deepspeed")


def _config(out: Path) -> rlhf.RunConfig:
    # The tiny student never answers right: the overlong penalty (from 2 tokens on) gives rewards that differ
    # within groups, hence real updates, through which a resume that lost any state would show.
    return rlhf.RunConfig(
        output_dir=str(out),
        model={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
        task={"train_prompts": 64, "eval_prompts": 8},
        warmup={"steps": 4, "batch_size": 8},
        rollout={"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "asynchronous": True},
        trainer={"num_ranks": 1, "micro_batch_size": 8, "mini_batches_per_step": 2, "lr": 1e-2},
        algorithm={"steps": 4, "tis_cap": 2.0, "overlong_buffer": 6},
        eval={"max_new_tokens": 8})


@pytest.fixture(scope="module")
def one_step_off(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_step_off") / "run"
    with rlhf.Trainer(_config(out), log=lambda line: None) as trainer:
        trainer.warmup()
        steps = [trainer.step()]
        # Batch 2 is being generated now (from v0); the evaluation queues behind it and the v1 sync, and the
        # rollout workers refuse a generate call whose expected version they do not hold.
        mid = trainer.evaluate()
        steps.append(trainer.step())
        trainer.save_checkpoint()  # batch 3 in flight (from v1): waited for, stored, and trained on next
        steps += [trainer.step(), trainer.step()]
        rank = trainer._rl_loop().policy.actors[0]
        nice = ray.get(rank.__ray_call__.remote(lambda self: os.getpriority(os.PRIO_PROCESS, 0)))
        trainer.save()
    return SimpleNamespace(out=out, steps=steps, mid=mid, nice=nice)


def test_one_step_off_async_steps_log_staleness_one_and_ordered_versions(one_step_off):
    steps, out = one_step_off.steps, one_step_off.out
    # The trainer rank yields the CPU to generation (the rollout workers run at this process's niceness).
    assert one_step_off.nice == min(os.getpriority(os.PRIO_PROCESS, 0) + ASYNC_TRAINER_NICENESS, 19)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    # Batch 1 and batch 2 both come from v0 (batch 2 launched before update 1); batch k from v(k-2) after that.
    assert [m["charts/rollout_weights_version"] for m in steps] == [0, 0, 1, 2]
    assert [m["perf/staleness"] for m in steps] == [0, 1, 1, 1]
    assert [m["charts/weights_version"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        assert m["perf/optimizer_steps"] == 2.0 and 0 < m["losses/tis_weight"] <= 2.0
    # The first batch is on-policy: the trainer's log-probs match the sampler's.
    assert steps[0]["perf/logprob_mismatch"] < 1e-3
    assert one_step_off.mid["n"] == 8
    assert [m["perf/staleness"] for m in _metrics(out)] == [0, 1, 1, 1]
    (batch,) = json.loads((out / "checkpoints" / "step_2" / "in_flight.json").read_text())
    assert batch["version"] == 1 and len(batch["rows"]) == 4 and len(batch["samples"]) == 8


def test_a_resumed_one_step_off_run_repeats_the_uninterrupted_one_bit_for_bit(one_step_off, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_step_off.out, out)
    (out / "summary.json").unlink()  # as if stopped after step 4, before the end: resumes from step 2
    shutil.rmtree(out / "policy")
    with rlhf.Trainer(_config(out), log=lambda line: None, resume=True) as trainer:
        assert trainer.resumed_step == 2
        trainer.step()  # batch 3, put back from the checkpoint; batch 4 launched from the restored v2 and RNG
        trainer.step()
        trainer.save()
    assert [_fixed(m) for m in _metrics(out)] == [_fixed(m) for m in _metrics(one_step_off.out)]
    weights, expected = (_weights(d) for d in (out, one_step_off.out))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _fixed(m: dict) -> dict:
    """A step's figures without its timings."""
    return {k: v for k, v in m.items() if not k.startswith("perf/") or k in ("perf/logprob_mismatch",
                                                                          "perf/staleness")}


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "policy" / "model.safetensors")
