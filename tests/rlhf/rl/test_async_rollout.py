"""One-step-off asynchronous rollout end to end on Ray with a tiny student: a few RL steps through rlhf.Trainer,
an evaluation while a batch is in flight, then the logged staleness and weights versions."""
import json
import os

import pytest
import ray

import rlhf
from rlhf.rl.ranks.policy import ASYNC_TRAINER_NICENESS

pytest.importorskip("deepspeed")


def test_one_step_off_async_steps_log_staleness_one_and_ordered_versions(tmp_path):
    cfg = rlhf.RunConfig(
        output_dir=str(tmp_path / "run"),
        model={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
        task={"train_prompts": 64, "eval_prompts": 8},
        warmup={"steps": 4, "batch_size": 8},
        rollout={"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "asynchronous": True},
        trainer={"num_ranks": 1, "micro_batch_size": 8, "mini_batches_per_step": 2, "lr": 1e-3},
        algorithm={"steps": 3, "tis_cap": 2.0},
        eval={"max_new_tokens": 8})
    with rlhf.Trainer(cfg, log=lambda line: None) as trainer:
        trainer.warmup()
        steps = [trainer.step()]
        # Batch 2 is being generated now (from v0); the evaluation queues behind it and the v1 sync, and the
        # rollout workers refuse a generate call whose expected version they do not hold.
        mid = trainer.evaluate()
        steps += [trainer.step(), trainer.step()]
        # The trainer rank yields the CPU to generation (the rollout workers run at this process's niceness).
        rank = trainer._rl_loop().policy.actors[0]
        nice = ray.get(rank.__ray_call__.remote(lambda self: os.getpriority(os.PRIO_PROCESS, 0)))
        assert nice == min(os.getpriority(os.PRIO_PROCESS, 0) + ASYNC_TRAINER_NICENESS, 19)

    assert [m["step"] for m in steps] == [1, 2, 3]
    # Batch 1 and batch 2 both come from v0 (batch 2 launched before update 1); batch 3 from v1, after sync 1.
    assert [m["charts/rollout_weights_version"] for m in steps] == [0, 0, 1]
    assert [m["perf/staleness"] for m in steps] == [0, 1, 1]
    assert [m["charts/weights_version"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["perf/optimizer_steps"] == 2.0 and 0 < m["losses/tis_weight"] <= 2.0
    # The first batch is on-policy: the trainer's log-probs match the sampler's.
    assert steps[0]["perf/logprob_mismatch"] < 1e-3
    assert mid["n"] == 8
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["perf/staleness"] for m in logged] == [0, 1, 1]
