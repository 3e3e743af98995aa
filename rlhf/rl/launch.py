"""Starting Ray and the run's actor groups, and the RL loop built from them (``build_loop``); ``RunActors``: one
run's actors, started on first use and stopped together.

The rollout and reward workers are ``WorkerPool``s: every call has the run's timeout, and a worker whose process
dies is restarted and its part of the call re-issued (rlhf/core/distributed/worker_pool.py). The trainer ranks (and PPO's
critic ranks) are DeepSpeed rank groups (rlhf/rl/ranks/policy.py, rlhf/rl/ranks/critic.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import ray

from reward.scoring.components import TEACHER_KL, sequence_components
from reward.teachers.logprobs import check_same_vocabulary
from reward.teachers import make_teacher
from reward.scoring.verifiers import make_verifier
from reward.scoring.worker import RewardWorker
from rlhf.core.distributed import cluster
from rlhf.core.config.run_config import ConfigError, RunConfig
from rlhf.core.distributed.worker_pool import WorkerPool
from rlhf.rl.ranks.critic import CriticGroup
from rlhf.rl.step import RLStep
from rlhf.rl.groups.reward import RewardGroup
from rlhf.rl.groups.rollout import RolloutGroup
from rlhf.rl.groups.teacher import make_teacher_group
from rlhf.rl.ranks.policy import TrainerGroup
from rlhf.rl.rm_refresh import RewardModelRefresh
from rlhf.rl.update import PolicyUpdate
from rlhf.rl.groups.weight_broadcast import BroadcastSync, VLLMTransferSync
from rollout.engines import ENGINES
from rollout.environments import ENVIRONMENTS
from rollout.worker import RolloutWorker


def start_ray(cfg: RunConfig) -> None:
    """Start or join Ray as ``cluster.address`` says. A local instance is sized for this run's actors (they
    time-share the cores: phases run one after another)."""
    wanted = cfg.trainer.num_ranks * cfg.trainer.threads + cfg.rollout.num_workers
    if cfg.algorithm.uses_critic:  # PPO's critic ranks
        wanted += cfg.critic.num_ranks * cfg.critic.threads
    if cfg.reward.refresh.enabled:  # the RM's own ranks, beside the policy's from the first refresh on
        wanted += cfg.reward_model.num_ranks * cfg.reward_model.threads
    cluster.connect(cfg.cluster.address, max(os.cpu_count() or 1, wanted), cfg.cluster.connect_timeout_s,
                    {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})


def make_rollout_workers(cfg: RunConfig, model_dir: str) -> WorkerPool:
    """Workers start (and restart) from the policy in ``model_dir``, weights version 0; after an update the pool's
    owner sets ``pool.restore`` to install the current weights in a replacement."""
    resources = cluster.role_resources(cfg, "rollout")
    cluster.check_fits("rollout", cfg.rollout.num_workers, resources)
    # The transfer backend and vLLM's row bound follow the placement; what cannot work is refused here.
    settings = cluster.rollout_settings(cfg, cluster.role_resources(cfg, "trainer"), resources).rollout
    options = resources.options()
    if cfg.rollout.partial_rollouts:  # weight syncs run beside generate (rollout/worker.py)
        options["concurrency_groups"] = {"weights": 1}
    actor = ray.remote(**options)(RolloutWorker)
    environment = None if cfg.rollout.environment == "none" else ENVIRONMENTS[cfg.rollout.environment]
    return WorkerPool("rollout", lambda i: actor.remote(model_dir, settings, cfg.seed + 1000 * (i + 1),
                                                     ENGINES[cfg.rollout.engine], environment),
                      cfg.rollout.num_workers, cfg.call_timeout_s, cfg.max_worker_restarts)


def make_reward_workers(cfg: RunConfig, rm_path: str | None, reward_fn=None) -> WorkerPool:
    """``reward_fn``: the Python function behind the ``custom`` component, pickled to each worker by Ray."""
    # By default no CPU reservation: scoring runs between generation and training, when the cores are free anyway.
    resources = cluster.role_resources(cfg, "reward")
    cluster.check_fits("reward", cfg.reward.num_workers, resources)
    actor = ray.remote(**resources.options())(RewardWorker)
    # The registry entries resolved here: a component or verifier a script registered reaches the actors by value.
    components = sequence_components(cfg.reward.components)
    verifier = make_verifier(cfg.task.verifier, cfg.task.answer_regex)
    return WorkerPool("reward", lambda i: actor.remote(cfg, rm_path, reward_fn, components, verifier),
                      cfg.reward.num_workers, cfg.call_timeout_s, cfg.max_worker_restarts)



def build_loop(cfg: RunConfig, model_dir: str, tokenizer, rollout: WorkerPool, rm_dir: str | None,
               reward_fn=None) -> RLStep:
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
            if not cfg.reward.teacher_endpoint:
                check_same_vocabulary(tokenizer, cfg.reward.teacher_model_path)
            teacher = make_teacher_group(cfg, Path(cfg.output_dir) / "teacher_cache")
            started.append(teacher)
        update = PolicyUpdate(cfg, tokenizer.pad_token_id, policy, critic, teacher)
    except Exception:
        for group in reversed(started):
            group.shutdown()
        raise
    auditor = make_teacher(cfg.label) if cfg.reward.audit_every else None
    refresher = None
    if cfg.reward.refresh.enabled:  # an HTTP teacher's replies cached where labelling caches them
        judge = make_teacher(cfg.label, Path(cfg.output_dir) / "labels" / "teacher_cache")
        refresher = RewardModelRefresh(cfg, judge, reward, rm_dir)
    broadcast = None
    if cfg.rollout.weight_sync == "broadcast":
        settings = cluster.rollout_settings(cfg, cluster.role_resources(cfg, "trainer"),
                                            cluster.role_resources(cfg, "rollout"))
        sync = VLLMTransferSync if settings.rollout.weight_transfer else BroadcastSync
        broadcast = sync(settings, policy, rollout)
    return RLStep(cfg, tokenizer, RolloutGroup(cfg, rollout, policy.full_state_dict_ref, broadcast), reward, update,
                  auditor, refresher)


class RunActors:
    """One run's Ray actors: the rollout workers (started by the first stage that samples), then the reward
    workers and trainer ranks of the RL step (``rl_loop``). ``start_dir`` writes the starting policy on first call
    and returns its directory: every actor loads it from there. Ray is stopped on ``stop`` only if it was started
    here (a Ray the script started itself is the script's to stop)."""

    def __init__(self, cfg: RunConfig, start_dir: Callable[[], str]):
        self.cfg, self._start_dir = cfg, start_dir
        self.rollout: WorkerPool | None = None
        self.loop: RLStep | None = None
        self.closed = False
        self._owns_ray = False

    def start_ray(self) -> None:
        self._owns_ray = self._owns_ray or not ray.is_initialized()
        start_ray(self.cfg)

    def rollout_workers(self) -> WorkerPool:
        if self.closed:
            raise RuntimeError("this Trainer is closed")
        if not self.rollout:
            start_dir = self._start_dir()
            self.start_ray()
            self.rollout = make_rollout_workers(self.cfg, start_dir)
        return self.rollout

    def stop_rollout_workers(self) -> None:
        """Stop the rollout workers, if started: the next use starts them again (from a new starting policy)."""
        if self.rollout:
            self.rollout.shutdown()
            self.rollout = None

    def start_loop(self, tokenizer, reward_model_dir: Path | None, reward_fn=None) -> RLStep:
        """The RL step's actors beside the rollout workers (the caller checks ``loop`` is None first)."""
        rollout = self.rollout_workers()
        if self.cfg.reward.components.get("rm") and not (reward_model_dir or self.cfg.reward.rm_endpoint):
            raise ConfigError("reward.components uses rm but there is no reward model yet: call "
                              "train_reward_model() first, or set reward_model.path or reward.rm_endpoint")
        self.loop = build_loop(self.cfg, self._start_dir(), tokenizer, rollout,
                               str(reward_model_dir) if reward_model_dir else None, reward_fn)
        return self.loop

    def stop(self) -> None:
        """Stop every actor (and Ray, if started here); the run cannot start them again."""
        self.closed = True
        try:
            if self.loop is not None:
                self.loop.shutdown()
            if self.rollout:
                self.rollout.shutdown()
        finally:
            self.loop, self.rollout = None, None
            if self._owns_ray:
                ray.shutdown()
                self._owns_ray = False
