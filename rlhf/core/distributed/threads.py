"""Thread budgets: how many threads each of a run's actors computes with, so that actors running at the same time
never ask for more threads than the cores they share.

Oversubscription collapses small matrix products on a CPU (a 16x576 by 576x1536 GEMM: 0.5 ms on one thread, 8-41
ms on two threads whose cores other processes hold, as BLAS threads wait on each other), and a run's rollout
workers, reward workers, trainer ranks and teacher workers all sit on the same cores. The driver works out each
role's share (``run_budget``) from what the config asks (``rollout.threads``, ``trainer.threads``...) and which
roles run at once (``run_phases``), and starts every actor with it in its environment (``thread_env``:
OMP/MKL/OpenBLAS read theirs when they load, before any code of ours runs); the actor sets torch's intra-op and
inter-op threads to it and logs them (``apply``). ``settings`` reads them back.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rlhf.core.config.run_config import RunConfig

logger = logging.getLogger("distilrl")

# The driver's share for an actor; the BLAS libraries' own variables are set beside it (thread_env).
SHARE_ENV = "DISTILRL_THREADS"
BLAS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_budget(cores: int, asks: dict[str, tuple[int, int]], phases: list[tuple[str, ...]]) -> dict[str, int]:
    """Threads per actor of each role. ``asks``: role -> (actors, threads each asks for); ``phases``: the groups of
    roles that compute at the same time. Within a phase whose actors ask for more than ``cores`` in all, each role's
    ask is scaled by cores / total, rounded down, at least 1; a role in several phases gets its smallest share, and
    never more than it asked for."""
    budget = {role: threads for role, (_, threads) in asks.items()}
    for phase in phases:
        total = sum(asks[role][0] * asks[role][1] for role in phase)
        for role in phase:
            budget[role] = min(budget[role], max(1, asks[role][1] * cores // total))
    return budget


def busiest_phase(budget: dict[str, int], asks: dict[str, tuple[int, int]], phases: list[tuple[str, ...]]) -> int:
    """The most threads any phase runs with under ``budget`` (more than the cores only where a phase has more
    actors than cores)."""
    return max((sum(asks[role][0] * budget[role] for role in phase) for phase in phases), default=0)


def run_phases(cfg: "RunConfig") -> tuple[dict[str, tuple[int, int]], list[tuple[str, ...]]]:
    """The roles of ``cfg``'s run, each as (actors, threads asked), and which compute at the same time. The RL step
    runs generation, scoring, the critic, the teacher's log-probs and the policy update one after another (each a
    blocking call of its group), and the reward model's ranks train in a stage (or a refresh) of their own;
    asynchronous rollout overlaps generation with each of the others. Reward and teacher workers ask for
    ``rollout.threads``, as they always have."""
    asks = {"rollout": (cfg.rollout.num_workers, cfg.rollout.threads),
            "reward": (cfg.reward.num_workers, cfg.rollout.threads),
            "trainer": (cfg.trainer.num_ranks, cfg.trainer.threads),
            "reward_model": (cfg.reward_model.num_ranks, cfg.reward_model.threads)}
    if cfg.algorithm.uses_critic:
        asks["critic"] = (cfg.critic.num_ranks, cfg.critic.threads)
    if cfg.reward.components.get("teacher_kl") and cfg.reward.teacher_model_path:  # a local teacher's workers
        asks["teacher"] = (cfg.reward.teacher_workers, cfg.rollout.threads)
    others = [role for role in asks if role != "rollout"]
    if cfg.rollout.asynchronous:
        return asks, [("rollout", role) for role in others]
    return asks, [("rollout",)] + [(role,) for role in others]


def shared_cores() -> int | None:
    """The cores this run's actors share: this process's (its CPU affinity) when Ray runs on this one node; None on
    a cluster of several nodes, where actors of one phase need not share a node and each keeps its ask."""
    import ray

    if ray.is_initialized() and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        return None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_budget(cfg: "RunConfig", cores: int | None = None) -> dict[str, int]:
    """Each role's threads for ``cfg``'s run on ``cores`` (default ``shared_cores()``; None: each keeps its ask)."""
    asks, phases = run_phases(cfg)
    cores = shared_cores() if cores is None else cores
    if cores is None:
        return {role: threads for role, (_, threads) in asks.items()}
    budget = thread_budget(cores, asks, phases)
    if busiest_phase(budget, asks, phases) > cores:
        logger.warning("thread budget: more actors compute at once than the %d cores hold, one thread each: %s",
                       cores, ", ".join(f"{role} {asks[role][0]}" for role in asks))
    return budget


def group_share(threads: int, actors: int) -> int:
    """Threads per actor of a group that computes alone (a rank group started without a run's budget, e.g. the
    reward model's ranks in their own stage): its ask, within the shared cores."""
    cores = shared_cores()
    if cores is None:
        return threads
    return thread_budget(cores, {"group": (actors, threads)}, [("group",)])["group"]


def thread_env(threads: int) -> dict[str, str]:
    """An actor's environment for a share of ``threads``."""
    return {SHARE_ENV: str(threads), **{name: str(threads) for name in BLAS_ENV}}


def apply(role: str, threads: int) -> dict:
    """Set this process's torch threads to its share (``DISTILRL_THREADS`` where the driver set one, else
    ``threads``) and the BLAS variables to match (read by libraries loaded later and child processes); log and
    return the settings."""
    share = int(os.environ.get(SHARE_ENV, threads))
    # Not SHARE_ENV itself: a process that builds several actors in turn (a test) must not keep the first's share.
    os.environ.update({name: str(share) for name in BLAS_ENV})
    torch.set_num_threads(share)
    try:
        # Nothing here runs inter-op parallel work (no torch.jit.fork); a pool per actor would only add threads.
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process (torch allows it once, before any parallel work): left as it is
    now = settings()
    logger.info("%s threads: %s", role, now)
    return now


def settings() -> dict:
    """This process's torch intra-op and inter-op threads and the BLAS variables, as set now."""
    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
            **{name: os.environ.get(name) for name in (SHARE_ENV, *BLAS_ENV)}}
