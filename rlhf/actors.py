"""Starting Ray and the rollout and reward actor groups (the trainer group lives in rlhf/trainer.py).

The rollout and reward workers are ``WorkerPool``s: every call has the run's timeout, and a worker whose process
dies is restarted and its part of the call re-issued (rlhf/worker_pool.py).
"""
from __future__ import annotations

import os

import ray

from reward.worker import RewardWorker
from rlhf.base import cluster
from rlhf.base.config import RunConfig
from rlhf.base.tasks.arithmetic import MAX_LEVEL, MIN_LEVEL
from rlhf.base.worker_pool import WorkerPool
from rollout.worker import RolloutWorker


def start_ray(cfg: RunConfig) -> None:
    """Start or join Ray as ``cluster.address`` says. A local instance is sized for this run's actors (they
    time-share the cores: phases run one after another)."""
    wanted = cfg.trainer.num_ranks * cfg.trainer.threads + cfg.rollout.num_workers
    if cfg.algorithm.advantage == "gae":  # PPO's critic ranks
        wanted += cfg.critic.num_ranks * cfg.critic.threads
    cluster.connect(cfg.cluster.address, max(os.cpu_count() or 1, wanted), cfg.cluster.connect_timeout_s,
                    {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})


def make_rollout_workers(cfg: RunConfig, model_dir: str) -> WorkerPool:
    """Workers start (and restart) from the policy in ``model_dir``, weights version 0; after an update the pool's
    owner sets ``pool.restore`` to install the current weights in a replacement."""
    resources = cluster.role_resources(cfg, "rollout")
    cluster.check_fits("rollout", cfg.rollout.num_workers, resources)
    actor = ray.remote(**resources.options())(RolloutWorker)
    return WorkerPool("rollout", lambda i: actor.remote(model_dir, cfg.rollout.threads, cfg.seed + 1000 * (i + 1)),
                      cfg.rollout.num_workers, cfg.call_timeout_s, cfg.max_worker_restarts)


def make_reward_workers(cfg: RunConfig, rm_path: str | None, reward_fn=None) -> WorkerPool:
    """``reward_fn``: the Python function behind the ``custom`` component, pickled to each worker by Ray."""
    # By default no CPU reservation: scoring runs between generation and training, when the cores are free anyway.
    resources = cluster.role_resources(cfg, "reward")
    cluster.check_fits("reward", cfg.reward.num_workers, resources)
    actor = ray.remote(**resources.options())(RewardWorker)
    # Scoring has the cores to itself (rollout and trainers wait for it), so it may use the rollout's threads.
    r = cfg.reward
    adaptive = {**r.adaptive.model_dump(), "difficulty_range": r.adaptive.difficulty_range or (MIN_LEVEL, MAX_LEVEL)}
    args = (r.components, r.correct, r.unparseable, rm_path, cfg.rollout.threads, cfg.rollout_rows, r.rm_url,
            r.rm_token_env, cfg.reward_model.use_reference, reward_fn, cfg.task.verifier, cfg.task.answer_regex,
            r.seqcls_path, adaptive, cfg.label.model_dump())
    return WorkerPool("reward", lambda i: actor.remote(*args), r.num_workers, cfg.call_timeout_s,
                      cfg.max_worker_restarts)


def shards(items: list, parts: int) -> list[list]:
    """Split into ``parts`` contiguous, equal-as-possible pieces (contiguity keeps a prompt's samples together)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def generate(workers: WorkerPool, prompts: list[str], n: int, max_new_tokens: int, temperature: float, greedy: bool,
             version: int, timeout_s: float) -> list:
    """``n`` samples per prompt from the rollout workers (prompts split evenly), in prompt order."""
    args = [(part, n, max_new_tokens, temperature, greedy, version) if part else None
            for part in shards(prompts, len(workers))]
    return [sample for part in workers.call("generate", args, "rollout generate", timeout_s) if part
            for sample in part]


def launch_generate(workers: WorkerPool, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                    greedy: bool, version: int) -> list:
    """Submit ``generate``'s calls without waiting (asynchronous rollout): one Ray object ref per worker with
    prompts, in prompt order. Collected with ``worker_pool.get_all``: a worker that dies meanwhile stops the run
    with a clear error instead of being restarted (its calls were issued outside the pool's retry loop)."""
    return [worker.generate.remote(part, n, max_new_tokens, temperature, greedy, version)
            for worker, part in zip(workers.workers, shards(prompts, len(workers))) if part]
