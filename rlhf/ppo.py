"""PPO with a critic (``algorithm.advantage: gae``): the GRPO loop's actors plus a critic group, and its own step.

One PPO step, as data: rollout workers sample -> reward workers score -> the critic values every response token
-> (KL in the reward: the reference log-probs from the policy ranks) -> token rewards (the reward on the last
response token, minus kl_coef * KL on every token) -> GAE advantages and returns -> the critic update towards
the returns (clipped value loss) -> the policy update with the whitened advantages -> new weights to the rollout
workers. During the first ``critic_warmup_steps`` steps the critic trains alone: the policy, and so the rollout
workers' weights, stay as they are.

Generation, scoring, weight sync, evaluation and the policy ranks are ``GRPOLoop``'s; only the step differs.
"""
from __future__ import annotations

import time

import torch

from rlhf import distill
from rlhf.base.algorithms import gae_advantages, kl_penalty, loss_token_weights, overlong_penalty, token_rewards, whiten
from rlhf.base.batch import make_train_batch
from rlhf.pipeline import LaunchedRollout
from rlhf.base.config import RunConfig
from rlhf.critic import CriticGroup
from rlhf.base.data import PromptRow
from rlhf.driver import GRPOLoop, rollout_figures


class PPOLoop(GRPOLoop):
    """The actors of one PPO run (the GRPO loop's, and the critic ranks) and the PPO step over them."""

    def __init__(self, cfg: RunConfig, model_dir: str, tokenizer, rollout: list, rm_dir: str | None,
                 reward_fn=None):
        super().__init__(cfg, model_dir, tokenizer, rollout, rm_dir, reward_fn)
        c = cfg.critic
        try:
            # From the warm-up student's backbone: its features already encode the task, only the head is new.
            self.critic = CriticGroup(model_dir, {
                "zero_stage": c.zero_stage, "lr": c.lr, "weight_decay": c.weight_decay,
                "max_grad_norm": c.max_grad_norm, "micro_batch_size": c.micro_batch_size, "threads": c.threads,
                "seed": cfg.seed, "timeout_s": self.timeout, "value_clip": cfg.algorithm.value_clip,
            }, c.num_ranks, self.timeout, strategy=cfg.cluster.trainer_strategy,
                placement_timeout_s=cfg.cluster.placement_timeout_s)
        except Exception:
            super().shutdown()
            raise

    def step(self, step: int, rows: list[PromptRow], launched: LaunchedRollout | None = None) -> dict:
        """One PPO step on ``rows``; ``launched`` as in ``GRPOLoop.step`` (asynchronous rollout)."""
        cfg, a, n = self.cfg, self.cfg.algorithm, self.cfg.rollout.samples_per_prompt
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        samples = self.collect(launched) if launched else self.generate([r.prompt for r in rows], n, greedy=False)
        generated_by = launched.version if launched else self.version
        staleness = self.version - generated_by  # before this step's update moves self.version on
        timings["perf/generate_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        scores = self.score(rows, samples)
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
        timings["perf/score_s"] = time.perf_counter() - t

        shaping = {}
        if a.overlong_buffer:
            penalty = overlong_penalty(torch.tensor([len(s.response_ids) for s in samples]),
                                       cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
            rewards = rewards + penalty
            shaping["reward/overlong_penalty"] = penalty.mean().item()

        # The batch layout first (advantages filled in below): values and KL are per token, in the same layout.
        t = time.perf_counter()
        batch = make_train_batch(samples, torch.zeros(len(samples)), self.tokenizer.pad_token_id,
                                 a.loss_aggregation, cfg.rollout.max_new_tokens, cfg.trainer.mini_batches_per_step)
        mask = batch["response_mask"]
        values = self.critic.values(batch) * mask
        kl, kl_metrics = None, {}
        if a.kl_in_reward:
            # The sampling log-probs stand for the policy's: the update has not moved it yet.
            ref_logprobs = self.trainer.reference_logprobs(batch)
            kl = kl_penalty(batch["rollout_logprobs"], ref_logprobs, a.kl_estimator) * mask
            kl_metrics["reward/kl_penalty"] = (a.kl_coef * kl.sum() / mask.sum().clamp(min=1)).item()
        advantages, returns = gae_advantages(token_rewards(rewards, mask, kl, a.kl_coef), values, mask, a.gamma,
                                             a.lam)
        if a.whiten_advantages:
            advantages = whiten(advantages, mask)
        timings["perf/values_s"] = time.perf_counter() - t

        # Every token's value error counts equally, whatever the policy loss's aggregation.
        critic_metrics = self.critic.train_step({
            **batch, "old_values": values, "returns": returns,
            "loss_weights": loss_token_weights(mask, "token-mean", cfg.rollout.max_new_tokens)})

        policy_metrics = {}
        timings["perf/sync_s"] = 0.0
        if step > a.critic_warmup_steps:
            policy_metrics = self.trainer.train_step({**batch, "advantages": advantages})
            t = time.perf_counter()
            self.sync_weights()
            timings["perf/sync_s"] = time.perf_counter() - t
        timings["perf/step_s"] = time.perf_counter() - t0

        audit = {}
        if self.auditor is not None and step % cfg.reward.audit_every == 0:
            audit = distill.audit(self.auditor, rows, samples, scores, cfg.reward)
        return {
            "step": step,
            **rollout_figures(rewards, scores, samples),
            "charts/weights_version": self.version,
            "charts/rollout_weights_version": generated_by,
            "perf/staleness": staleness,
            "charts/policy_frozen": float(step <= a.critic_warmup_steps),
            **_value_figures(values, returns, mask),
            **shaping,
            **kl_metrics,
            **critic_metrics,
            **policy_metrics,
            **audit,
            **timings,
        }

    def save_state(self, path) -> list:
        """GRPOLoop's checkpoint plus the critic ranks' state (``path/critic``): a resumed PPO run continues with
        the critic it had, not a fresh value head."""
        rollout_rng = super().save_state(path)
        self.critic.save_state(str(path / "critic"))
        return rollout_rng

    def load_state(self, path, rollout_rng: list, version: int, guard: dict) -> None:
        super().load_state(path, rollout_rng, version, guard)
        self.critic.load_state(str(path / "critic"))

    def shutdown(self) -> None:
        self.critic.shutdown()
        super().shutdown()


def _value_figures(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict:
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
