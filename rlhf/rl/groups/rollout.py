"""The rollout workers as one group: sampling (now, or launched ahead), and the policy's weights, with a version.

Weights go from trainer rank 0 to every rollout worker through Ray's object store, or by collective broadcast
(``rollout.weight_sync: broadcast``, rlhf/rl/groups/weight_broadcast.py), tagged with a version the workers check before
sampling. With asynchronous rollout a sync is queued behind the generation in flight (a Ray
actor runs one caller's calls in order) and waited for before the next batch is collected.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from rlhf.core.data import think
from rlhf.core.config.run_config import RunConfig
from rlhf.core.data.datasets import PromptRow
from rlhf.core.data.samples import Sample
from rlhf.core.distributed.split import shards
from rlhf.core.distributed.worker_pool import WorkerPool, get_all
from rlhf.rl.prefetch import LaunchedRollout


def generate(pool: WorkerPool, prompts: list[str], n: int, max_new_tokens: int, temperature: float, greedy: bool,
             version: int, timeout_s: float) -> list:
    """``n`` samples per prompt from the pool's workers (prompts split evenly), in prompt order."""
    parts = shards(prompts, len(pool))
    args = [(part, n, max_new_tokens, temperature, greedy, version) if part else None for part in parts]
    results = pool.call("generate", args, "rollout generate", timeout_s)
    return in_prompt_order([(len(p), r) for p, r in zip(parts, results) if p])


def in_prompt_order(parts: list[tuple[int, list[Sample]]]) -> list[Sample]:
    """The workers' samples, one list per shard of prompts (with the shard's prompt count), as one list whose
    ``prompt_index`` counts over all the prompts of the call, not over the shard each worker saw."""
    samples, offset = [], 0
    for count, part in parts:
        samples += [replace(s, prompt_index=s.prompt_index + offset) for s in part]
        offset += count
    return samples


class RolloutGroup:
    """``pool``'s workers sample for the run; ``trainer_weights()`` gives the object ref of the current policy
    weights (trainer rank 0's), for syncs and for restoring a restarted worker."""

    def __init__(self, cfg: RunConfig, pool: WorkerPool, trainer_weights: Callable[[], object], broadcast=None):
        """``broadcast``: a BroadcastSync that carries the syncs instead of the object store (which still restores
        a restarted worker)."""
        self.cfg, self.pool, self.trainer_weights, self.broadcast = cfg, pool, trainer_weights, broadcast
        self.timeout = cfg.call_timeout_s
        self.version = 0  # weights version the workers hold; bumped by every sync
        self._syncing: list = []  # sync calls submitted and not yet waited for (asynchronous rollout)
        self._syncing_names: list[str] = []  # whose they are
        self._weights = None  # the object ref of the weights being synced, while a sync is in progress
        pool.restore = self._restore

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    def generate(self, prompts: list[str], n: int, greedy: bool) -> list:
        """``n`` samples per prompt now, in prompt order (greedy: held-out evaluation's length limit)."""
        r = self.cfg.rollout
        max_new = self.cfg.eval.max_new_tokens if greedy else r.max_new_tokens
        if r.partial_rollouts:  # the sync's calls run beside generation: the latest weights must have arrived
            self.finish_sync()
        # The think switch goes on the policy's prompts only; rewards and the teacher see the plain prompt.
        prompts = [think.with_switch(p, self.cfg.think.mode) for p in prompts]
        return generate(self.pool, prompts, n, max_new, r.temperature, greedy, self.version, self.timeout)

    def launch(self, rows: list[PromptRow]) -> LaunchedRollout:
        """Start sampling ``rows`` from the weights the workers will hold when they get to it: those of the latest
        sync submitted. Calls bypass the pool: a worker that dies meanwhile stops the run (``collect``)."""
        r = self.cfg.rollout
        prompts = [think.with_switch(row.prompt, self.cfg.think.mode) for row in rows]
        calls = [worker.generate.remote(part, r.samples_per_prompt, r.max_new_tokens, r.temperature, False,
                                        self.version)
                 for worker, part in zip(self.pool.workers, shards(prompts, len(self.pool))) if part]
        return LaunchedRollout(rows, self.version, calls)

    def collect(self, launched: LaunchedRollout) -> list:
        """The samples of a launched generation (waited for now, or earlier by ``wait``), after any weight sync
        still in flight."""
        if launched.samples is not None:
            self.finish_sync()
            return launched.samples
        refs = self._syncing + launched.calls
        names = self._syncing_names + [f"rollout worker {i}" for i in range(len(launched.calls))]
        results = get_all(refs, names, "weight sync and rollout generate", self.timeout)
        parts = results[len(self._syncing):]
        self._syncing, self._syncing_names, self._weights = [], [], None
        return self._in_prompt_order(launched, parts)

    def wait(self, launched: LaunchedRollout) -> LaunchedRollout:
        """``launched`` with its samples, generated to the end (a checkpoint stores them); syncs are left in
        flight, for ``collect`` to wait for at its step as it would have."""
        if launched.samples is not None:
            return launched
        parts = get_all(launched.calls, [f"rollout worker {i}" for i in range(len(launched.calls))],
                        "rollout generate", self.timeout)
        return replace(launched, calls=[], samples=self._in_prompt_order(launched, parts))

    def _in_prompt_order(self, launched: LaunchedRollout, parts: list) -> list:
        counts = [len(p) for p in shards(launched.rows, len(self.pool)) if p]
        return in_prompt_order(list(zip(counts, parts)))

    def sync(self, version: int | None = None) -> None:
        """The trainer's weights to every worker, tagged with the next version (or ``version`` when resuming).
        Asynchronous rollout does not wait: the workers load them after the generation in flight."""
        self.version = self.version + 1 if version is None else version
        if self.broadcast is not None:
            if not self.cfg.rollout.asynchronous:
                return self.broadcast.sync(self.version)
            refs, names = self.broadcast.submit(self.version)
            self._syncing, self._syncing_names = self._syncing + refs, self._syncing_names + names
            return
        self._weights = self.trainer_weights()
        if self.cfg.rollout.partial_rollouts:  # beside the generation in flight, which takes them between steps
            self._syncing += [w.load_weights.options(concurrency_group="weights").remote(self._weights, self.version)
                              for w in self.pool.workers]
            self._syncing_names += [f"rollout worker {i}" for i in range(len(self.pool))]
            return
        if self.cfg.rollout.asynchronous:
            self._syncing += [w.load_weights.remote(self._weights, self.version) for w in self.pool.workers]
            self._syncing_names += [f"rollout worker {i}" for i in range(len(self.pool))]
            return
        try:
            self.pool.call("load_weights", [(self._weights, self.version)] * len(self.pool), "weight sync")
        finally:
            self._weights = None  # holding a full copy in the object store costs memory

    def finish_sync(self) -> None:
        """Wait for a sync in flight (before generating from the current weights)."""
        if self._syncing:
            get_all(self._syncing, self._syncing_names, "weight sync", self.timeout)
            self._syncing, self._syncing_names, self._weights = [], [], None

    def _restore(self, worker) -> None:
        """A restarted worker starts from the initial policy: give it the current weights and version, from the
        sync in progress or else from trainer rank 0 (which holds exactly them between syncs)."""
        if self.version == 0:
            return
        weights = self._weights if self._weights is not None else self.trainer_weights()
        get_all([worker.load_weights.remote(weights, self.version)], ["restarted rollout worker"], "weight restore",
                self.timeout)
        if self.broadcast is not None:
            self.broadcast.stale = True  # the replacement joins a fresh group at the next sync

    def rng_states(self) -> list:
        return self.pool.call("rng_state", [()] * len(self.pool), "rollout rng_state")

    def set_rng_states(self, states: list) -> None:
        if len(states) != len(self.pool):
            raise ValueError(f"the checkpoint has {len(states)} rollout worker RNG states for {len(self.pool)} "
                             f"workers")
        self.pool.call("set_rng_state", [(state,) for state in states], "rollout set_rng_state")
