"""Starting Ray and the run's actor groups, and the RL loop built from them (``build_loop``).

The rollout and reward workers are ``WorkerPool``s: every call has the run's timeout, and a worker whose process
dies is restarted and its part of the call re-issued (rlhf/core/distributed/worker_pool.py). The trainer ranks (and PPO's
critic ranks) are DeepSpeed rank groups (rlhf/rl/ranks/policy.py, rlhf/rl/ranks/critic.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import ray

from reward.scoring.components import REWARD_COMPONENTS
from reward.teachers.logprobs import TEACHER_KL, check_same_vocabulary
from reward.teachers import make_teacher
from reward.scoring.verifiers import make_verifier
from reward.scoring.worker import RewardWorker
from rlhf.core.distributed import cluster
from rlhf.core.config.run_config import RunConfig
from rlhf.core.distributed.worker_pool import WorkerPool
from rlhf.rl.ranks.critic import CriticGroup
from rlhf.rl.step import RLLoop
from rlhf.rl.groups.reward import RewardGroup
from rlhf.rl.groups.rollout import RolloutGroup
from rlhf.rl.groups.teacher import make_teacher_group
from rlhf.rl.ranks.policy import TrainerGroup
from rlhf.rl.update import PolicyUpdate
from rlhf.rl.groups.weight_broadcast import BroadcastSync
from rollout.engines import ENGINES
from rollout.worker import RolloutWorker


def start_ray(cfg: RunConfig) -> None:
    """Start or join Ray as ``cluster.address`` says. A local instance is sized for this run's actors (they
    time-share the cores: phases run one after another)."""
    wanted = cfg.trainer.num_ranks * cfg.trainer.threads + cfg.rollout.num_workers
    if cfg.algorithm.uses_critic:  # PPO's critic ranks
        wanted += cfg.critic.num_ranks * cfg.critic.threads
    cluster.connect(cfg.cluster.address, max(os.cpu_count() or 1, wanted), cfg.cluster.connect_timeout_s,
                    {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})


def make_rollout_workers(cfg: RunConfig, model_dir: str) -> WorkerPool:
    """Workers start (and restart) from the policy in ``model_dir``, weights version 0; after an update the pool's
    owner sets ``pool.restore`` to install the current weights in a replacement."""
    resources = cluster.role_resources(cfg, "rollout")
    cluster.check_fits("rollout", cfg.rollout.num_workers, resources)
    actor = ray.remote(**resources.options())(RolloutWorker)
    return WorkerPool("rollout", lambda i: actor.remote(model_dir, cfg.rollout, cfg.seed + 1000 * (i + 1),
                                                     ENGINES[cfg.rollout.engine]),
                      cfg.rollout.num_workers, cfg.call_timeout_s, cfg.max_worker_restarts)


def make_reward_workers(cfg: RunConfig, rm_path: str | None, reward_fn=None) -> WorkerPool:
    """``reward_fn``: the Python function behind the ``custom`` component, pickled to each worker by Ray."""
    # By default no CPU reservation: scoring runs between generation and training, when the cores are free anyway.
    resources = cluster.role_resources(cfg, "reward")
    cluster.check_fits("reward", cfg.reward.num_workers, resources)
    actor = ray.remote(**resources.options())(RewardWorker)
    # The registry entries resolved here: a component or verifier a script registered reaches the actors by value.
    components = {name: REWARD_COMPONENTS[name] for name, w in cfg.reward.components.items()
                  if w != 0 and name != TEACHER_KL}
    verifier = make_verifier(cfg.task.verifier, cfg.task.answer_regex)
    return WorkerPool("reward", lambda i: actor.remote(cfg, rm_path, reward_fn, components, verifier),
                      cfg.reward.num_workers, cfg.call_timeout_s, cfg.max_worker_restarts)



def build_loop(cfg: RunConfig, model_dir: str, tokenizer, rollout: WorkerPool, rm_dir: str | None,
               reward_fn=None) -> RLLoop:
    """The RL loop over the run's actors: the rollout workers given, reward workers, the trainer ranks (from the
    policy in ``model_dir``), the critic ranks where the estimator needs a critic, and the auditing teacher."""
    started: list = []
    try:
        reward = RewardGroup(make_reward_workers(cfg, rm_dir, reward_fn), bool(cfg.reward.components.get("custom")))
        started.append(reward)
        policy = TrainerGroup(model_dir, cfg, cfg.trainer.num_ranks, cfg.call_timeout_s,
                              resources=cluster.role_resources(cfg, "trainer"), strategy=cfg.cluster.trainer_strategy,
                              placement_timeout_s=cfg.cluster.placement_timeout_s)
        started.append(policy)
        critic = None
        if cfg.algorithm.uses_critic:
            # From the warm-up student's backbone: its features already encode the task, only the head is new.
            critic = CriticGroup(model_dir, cfg, cfg.critic.num_ranks, cfg.call_timeout_s,
                                 strategy=cfg.cluster.trainer_strategy,
                                 placement_timeout_s=cfg.cluster.placement_timeout_s)
            started.append(critic)
        teacher = None
        if cfg.reward.components.get(TEACHER_KL):
            if not cfg.reward.teacher_url:
                check_same_vocabulary(tokenizer, cfg.reward.teacher_model_path)
            teacher = make_teacher_group(cfg, Path(cfg.output_dir) / "teacher_cache")
            started.append(teacher)
        update = PolicyUpdate(cfg, tokenizer.pad_token_id, policy, critic, teacher)
    except Exception:
        for group in reversed(started):
            group.shutdown()
        raise
    auditor = make_teacher(cfg.label) if cfg.reward.audit_every else None
    broadcast = BroadcastSync(cfg, policy, rollout) if cfg.rollout.weight_sync == "broadcast" else None
    return RLLoop(cfg, tokenizer, RolloutGroup(cfg, rollout, policy.full_state_dict_ref, broadcast), reward, update,
                  auditor)
