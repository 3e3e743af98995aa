"""The update half of an RL step, one class for every estimator: advantages from what the estimator needs, then
the trainer ranks' update (and the critic's, for an estimator that needs one).

GRPO, Dr. GRPO, RLOO, REINFORCE++ and PPO differ only here, and only through ``ADVANTAGE_ESTIMATORS``' entry:
``critic`` in its needs brings the critic's values in (and a critic update towards the returns); a KL in the
reward (``algorithm.reward_kl``: REINFORCE++, or ``kl_in_reward``) brings the reference log-probs in, as k1 token
rewards; ``teacher_kl`` in the reward components brings the teacher's log-probs in (on-policy distillation: each
token's log-ratio to the teacher, centred and weighted, added to any estimator's advantages). During the first ``critic_warmup_steps`` the critic trains alone and the policy stays as it is.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from reward.scoring.components import TEACHER_KL
from rlhf.core.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, whiten
from rlhf.core.algorithms.aggregation import loss_token_weights
from rlhf.core.algorithms.kl import distillation_advantages, kl_reward
from rlhf.core.data.batch import TrainBatch, make_train_batch
from rlhf.core.config.run_config import RunConfig


class PolicyUpdate:
    """``policy``: the trainer group (train_step, reference_logprobs); ``critic``: the critic group, which the
    estimator must need exactly when it is given."""

    def __init__(self, cfg: RunConfig, pad_id: int, policy, critic=None, teacher=None):
        """``teacher``: the teacher group (``logprobs``) when ``reward.components`` has ``teacher_kl``."""
        self.cfg, self.pad_id, self.policy, self.critic, self.teacher = cfg, pad_id, policy, critic, teacher
        self.estimator = ADVANTAGE_ESTIMATORS[cfg.algorithm.advantage]
        if ("critic" in self.estimator.needs) != (critic is not None):
            raise ValueError(f"advantage {cfg.algorithm.advantage} needs {sorted(self.estimator.needs) or 'nothing'};"
                             f" a critic was {'given' if critic is not None else 'not given'}")

    def __call__(self, step: int, samples: list, rewards: torch.Tensor, group_size: int,
                 difficulties: list | None = None) -> tuple[dict, bool]:
        """Update on ``samples`` with their sequence ``rewards``; returns (metrics, whether the policy moved).
        ``difficulties``: each sample's prompt difficulty, for per-difficulty figures."""
        cfg, a = self.cfg, self.cfg.algorithm
        start = time.perf_counter()
        # The batch layout first: values, the reference's log-probs and advantages are per token in it.
        batch = make_train_batch(samples, torch.zeros(len(samples)), self.pad_id, a.loss_aggregation,
                                 cfg.rollout.max_new_tokens, cfg.trainer.mini_batches_per_step)
        mask = batch.response_mask
        inputs = AdvantageInputs(rewards, mask, group_size, gamma=a.gamma, lam=a.lam)
        metrics: dict = {}
        if self.critic is not None:
            inputs.values = self.critic.values(batch) * mask
        # The trainer's own log-probs before this update (veRL's recomputed old log-probs), not the sampler's: the
        # two differ wherever sampler and trainer do (bf16 or vLLM rollout, asynchronous steps).
        policy = self.policy.policy_logprobs(batch) if a.reward_kl or self.teacher is not None else None
        if a.reward_kl:
            inputs.token_rewards = kl_reward(policy, self.policy.reference_logprobs(batch), mask, a.kl_coef)
            metrics["reward/kl_penalty"] = (-inputs.token_rewards.sum() / mask.sum().clamp(min=1)).item()
        advantages, returns = self.estimator.compute(inputs)
        if self.critic is not None and a.whiten_advantages:
            advantages = whiten(advantages, mask)
        if self.teacher is not None:
            advantages = advantages + self._distillation(batch, policy, difficulties, metrics)
        # Each sample's advantage (the mean over its response tokens), for the saved samples (rlhf/outputs/samples.py).
        self.sample_advantages = ((advantages * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
        if self.critic is not None:
            metrics.update(value_figures(inputs.values, returns, mask))
            # Every token's value error counts equally, whatever the policy loss's aggregation.
            metrics.update(self.critic.train_step(batch.with_(
                old_values=inputs.values, returns=returns,
                loss_weights=loss_token_weights(mask, "token-mean", cfg.rollout.max_new_tokens))))
            metrics["charts/policy_frozen"] = float(step <= a.critic_warmup_steps)
        metrics["perf/advantages_s"] = time.perf_counter() - start
        if step <= a.critic_warmup_steps:
            return metrics, False
        metrics.update(self.policy.train_step(batch.with_(advantages=advantages * mask)))
        return metrics, True

    def _distillation(self, batch: TrainBatch, student: torch.Tensor, difficulties: list | None,
                      metrics: dict) -> torch.Tensor:
        """The teacher_kl component's per-token advantage term (kl.distillation_advantages), with its figures, from
        the ``student``'s log-probs (the trainer's, before this update)."""
        mask = batch.response_mask
        teacher = self.teacher.logprobs(batch)
        failed = teacher.isnan().any(dim=1)  # a remote teacher's rows that failed: no distillation term
        metrics["distill/teacher_failed_rows"] = float(failed.sum())
        scored = mask * ~failed.unsqueeze(1)
        teacher = torch.where(failed.unsqueeze(1), student, teacher)
        metrics.update(reverse_kl_figures((student - teacher) * scored, scored, difficulties))
        return distillation_advantages(student, teacher, scored, self.cfg.reward.components[TEACHER_KL])

    def save_state(self, path: Path) -> None:
        """The policy (``path/policy``, Hugging Face format), the trainer ranks' state (``path/trainer``) and the
        critic's (``path/critic``): a resumed run continues with the critic it had, not a fresh value head."""
        self.policy.save_pretrained(str(path / "policy"))
        self.policy.save_state(str(path / "trainer"))
        if self.critic is not None:
            self.critic.save_state(str(path / "critic"))

    def load_state(self, path: Path) -> None:
        self.policy.load_state(str(path / "trainer"))
        if self.critic is not None:
            self.critic.load_state(str(path / "critic"))

    def shutdown(self) -> None:
        for group in (self.teacher, self.critic, self.policy):
            if group is not None:
                group.shutdown()


def reverse_kl_figures(reverse_kl: torch.Tensor, mask: torch.Tensor, difficulties: list | None) -> dict:
    """The student's per-token reverse KL to the teacher, log p_student - log p_teacher at the sampled tokens,
    averaged over response tokens: ``distill/reverse_kl``, and per difficulty bin."""
    figures = {"distill/reverse_kl": (reverse_kl.sum() / mask.sum().clamp(min=1)).item()}
    for level in sorted({d for d in difficulties or [] if d is not None}):
        rows = torch.tensor([d == level for d in difficulties])
        figures[f"difficulty/{level}/reverse_kl"] = (reverse_kl[rows].sum() / mask[rows].sum().clamp(min=1)).item()
    return figures


def value_figures(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict:
    """How well the critic's values (before this step's update) predicted the returns, over response tokens.
    Explained variance 1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant, < 0 worse."""
    on = mask.bool()
    v, r = values[on], returns[on]
    var_r = r.var(unbiased=False)
    explained = (1 - (r - v).var(unbiased=False) / var_r).item() if var_r > 0 else 0.0
    return {
        "charts/values_mean": v.mean().item() if v.numel() else 0.0,
        "charts/returns_mean": r.mean().item() if r.numel() else 0.0,
        "charts/explained_variance": explained,
    }
