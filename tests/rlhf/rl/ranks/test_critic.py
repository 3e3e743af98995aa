"""The PPO critic: a value-model DeepSpeed group (ZeRO-2) on 1 and 2 Ray ranks, and a PPO run end to end.

The group fits its values to fixed returns: the error must fall step by step, the 2-rank update must match the
1-rank one (the loss weights are whole-batch, so the split must not matter), and the saved critic must load with
plain transformers. Then the tiny config runs a few PPO steps through the CLI.
"""
from __future__ import annotations

import json

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from rlhf.core.algorithms.aggregation import loss_token_weights  # noqa: E402
from rlhf.core.data.batch import TrainBatch  # noqa: E402
from rlhf.cli import main  # noqa: E402
from rlhf.rl.ranks.critic import CriticGroup  # noqa: E402
# The tiny random causal LM that stands in for the warm-up student the critic starts from.
from tests.rlhf.rl.ranks.test_trainer import model_dir  # noqa: E402,F401
from tests.configs import run_config  # noqa: E402
from tests.paths import REPO  # noqa: E402

CFG = {"lr": 1e-2, "adam_eps": 1e-4, "micro_batch_size": 4, "value_clip": 0.5, "seed": 0, "threads": 1,
       "timeout_s": 120, "zero_stage": 2}


def _batch():
    """4 right-padded rows; returns 1.0 on the first two rows' responses, -1.0 on the others'. On one rank the
    rows (8, 10, 3 and 11 tokens) pack into 3 (rlhf/core/data/packing.py); on two, each rank's pair stays padded.
    Advantages and rollout log-probs 0: the critic reads neither."""
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 5), (2, 8), (2, 1), (5, 6)]  # (prompt, response) tokens; one response of length one
    width = max(p + r for p, r in lengths) + 1
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros(len(lengths), width)
    for row, (p, r) in enumerate(lengths):
        input_ids[row, :p + r] = torch.randint(1, 32, (p + r,), generator=g)
        attention_mask[row, :p + r] = 1
        response_mask[row, p:p + r] = 1
    returns = torch.tensor([1.0, 1.0, -1.0, -1.0]).unsqueeze(1) * response_mask
    zeros = torch.zeros(len(lengths), width)
    return TrainBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                      rollout_logprobs=zeros, advantages=zeros,
                      loss_weights=loss_token_weights(response_mask, "token-mean", 8), returns=returns)


def _fit(model_dir: str, num_ranks: int, steps: int, save_to: str | None = None) -> tuple[list[float], list]:
    """Train a fresh critic group ``steps`` times towards the batch's returns; the mean |V - R| before each step
    and the values after the first."""
    batch = _batch()
    mask = batch.response_mask
    group = CriticGroup(model_dir, run_config(CFG, role="critic"), num_ranks, timeout_s=120)
    try:
        errors, first_values, clipfracs = [], None, []
        for step in range(steps):
            values = group.values(batch) * mask
            if step == 1:
                first_values = values
            errors.append(((values - batch.returns).abs() * mask).sum().item() / mask.sum().item())
            metrics = group.train_step(batch.with_(old_values=values))
            clipfracs.append(metrics["losses/value_clipfrac"])
            assert metrics["losses/value_error"] == pytest.approx(errors[-1], abs=1e-4)
        if save_to:
            group.save_pretrained(save_to)
    finally:
        group.shutdown()
    return errors, [first_values, clipfracs]


@pytest.fixture(scope="module")
def ray_cluster():
    # Enough logical CPUs for the PPO run's actors (2 policy ranks, 2 critic ranks, a rollout worker); they
    # time-share the cores. A few attempts: on an overloaded box the raylet can miss Ray's 30 s start-up window.
    for attempt in range(3):
        try:
            ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


def test_critic_fits_returns_on_one_and_two_ranks_alike(ray_cluster, model_dir, tmp_path):
    one, (one_values, _) = _fit(model_dir, 1, 6, save_to=str(tmp_path / "critic"))
    two, (two_values, clipfracs) = _fit(model_dir, 2, 2)
    # The error falls towards the returns (from ~1, the size of the returns, with a fresh head; at this lr it
    # overshoots a little on the way, so not every step is lower).
    assert one[1] < one[0] and one[-1] < 0.3 * one[0], one
    # One update on two ZeRO-2 ranks gives the same values as on one rank: neither the batch split nor packing
    # matters.
    torch.testing.assert_close(two_values, one_values, atol=1e-4, rtol=0)
    assert two[:2] == pytest.approx(one[:2], abs=1e-4)
    assert all(0.0 <= c <= 1.0 for c in clipfracs)
    # The saved critic is a plain Hugging Face token classifier with one label (safetensors), on any machine.
    critic = transformers.AutoModelForTokenClassification.from_pretrained(str(tmp_path / "critic"))
    assert critic.config.num_labels == 1 and (tmp_path / "critic" / "model.safetensors").is_file()


def test_ppo_run_end_to_end_writes_critic_metrics(ray_cluster, tmp_path):
    """With LoRA on the critic (critic.lora; tests/rlhf/core/models/test_lora_heads.py checks what it trains and
    saves)."""
    out = tmp_path / "ppo"
    assert main(["run", str(REPO / "configs" / "tiny.yaml"), f"output_dir={out}", "algorithm.advantage=gae",
                 "algorithm.steps=3", "algorithm.critic_warmup_steps=1", "algorithm.kl_in_reward=true",
                 "critic.zero_stage=2", "critic.micro_batch_size=8", "critic.lora.r=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "accuracy" in summary["eval_before"] and "accuracy" in summary["eval_after"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for m in lines:
        for key in ("losses/value_loss", "losses/value_clipfrac", "charts/values_mean", "charts/returns_mean",
                    "charts/explained_variance", "reward/kl_penalty", "perf/critic_train_s"):
            assert key in m, key
    # Step 1 trains the critic alone: no policy update, no new weights; steps 2-3 update the policy.
    assert [m["charts/policy_frozen"] for m in lines] == [1.0, 0.0, 0.0]
    assert [m["charts/weights_version"] for m in lines] == [0, 1, 2]
    assert [m["perf/staleness"] for m in lines] == [0, 0, 0]  # synchronous: sampled by the weights being updated
    assert "losses/policy_loss" not in lines[0] and "losses/policy_loss" in lines[1]
    assert "losses/kl" in lines[1]  # the KL to the reference is logged, though it is in the reward, not the loss
