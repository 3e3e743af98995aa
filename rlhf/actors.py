"""Starting Ray and the rollout and reward actor groups (the trainer group lives in rlhf/trainer.py).

Every remote call goes through ``call_all`` with the run's timeout, so a dead or stuck actor stops the run with
a message naming the call instead of hanging it.
"""
from __future__ import annotations

import os

import ray

from reward.worker import RewardWorker
from rlhf import cluster
from rlhf.config import RunConfig
from rollout.worker import RolloutWorker


def start_ray(cfg: RunConfig) -> None:
    """Start or join Ray as ``cluster.address`` says. A local instance is sized for this run's actors (they
    time-share the cores: phases run one after another)."""
    wanted = cfg.trainer.num_ranks * cfg.trainer.threads + cfg.rollout.num_workers
    cluster.connect(cfg.cluster.address, max(os.cpu_count() or 1, wanted), cfg.cluster.connect_timeout_s,
                    {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})


def call_all(refs: list, what: str, timeout_s: float) -> list:
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s (raise call_timeout_s if the work is "
                           f"just slow)") from None


def make_rollout_workers(cfg: RunConfig, model_dir: str) -> list:
    resources = cluster.role_resources(cfg, "rollout")
    cluster.check_fits("rollout", cfg.rollout.num_workers, resources)
    actor = ray.remote(**resources.options())(RolloutWorker)
    workers = [actor.remote(model_dir, cfg.rollout.threads, cfg.seed + 1000 * (i + 1))
               for i in range(cfg.rollout.num_workers)]
    call_all([w.__ray_ready__.remote() for w in workers], "rollout worker start-up", cfg.call_timeout_s)
    return workers


def make_reward_workers(cfg: RunConfig, rm_path: str | None, reward_fn=None) -> list:
    """``reward_fn``: the Python function behind the ``custom`` component, pickled to each worker by Ray."""
    # By default no CPU reservation: scoring runs between generation and training, when the cores are free anyway.
    resources = cluster.role_resources(cfg, "reward")
    cluster.check_fits("reward", cfg.reward.num_workers, resources)
    actor = ray.remote(**resources.options())(RewardWorker)
    # Scoring has the cores to itself (rollout and trainers wait for it), so it may use the rollout's threads.
    r = cfg.reward
    workers = [actor.remote(r.components, r.correct, r.unparseable, rm_path, cfg.rollout.threads, cfg.rollout_rows,
                            r.rm_url, r.rm_token_env, cfg.reward_model.use_reference, reward_fn)
               for _ in range(r.num_workers)]
    call_all([w.__ray_ready__.remote() for w in workers], "reward worker start-up", cfg.call_timeout_s)
    return workers


def shards(items: list, parts: int) -> list[list]:
    """Split into ``parts`` contiguous, equal-as-possible pieces (contiguity keeps a prompt's samples together)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def generate(workers: list, prompts: list[str], n: int, max_new_tokens: int, temperature: float, greedy: bool,
             version: int, timeout_s: float) -> list:
    """``n`` samples per prompt from the rollout workers (prompts split evenly), in prompt order."""
    calls = [worker.generate.remote(part, n, max_new_tokens, temperature, greedy, version)
             for worker, part in zip(workers, shards(prompts, len(workers))) if part]
    return [sample for part in call_all(calls, "rollout generate", timeout_s) for sample in part]
