"""The reward workers as one group: every sample of a step scored, the batch split evenly across the workers."""
from __future__ import annotations

import ray

from rlhf.core.data.datasets import PromptRow
from rlhf.core.distributed.worker_pool import WorkerPool, get_all
from rlhf.core.distributed.split import shards


class RewardGroup:
    """``send_records``: ship each prompt's source record (only a custom reward function reads them)."""

    def __init__(self, pool: WorkerPool, send_records: bool):
        self.pool, self.send_records = pool, send_records

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    def score(self, rows: list[PromptRow], samples: list) -> list[dict]:
        """One score dict per sample (reward/scoring/worker.py); ``rows`` are the prompts, each with n samples in turn."""
        n, parts = len(samples) // len(rows), len(self.pool)

        def per_sample(values: list) -> list[list]:
            return shards([v for v in values for _ in range(n)], parts)

        records = per_sample([r.as_dict() for r in rows]) if self.send_records else [None] * parts
        args = list(zip(per_sample([r.prompt for r in rows]), shards([s.text for s in samples], parts),
                        per_sample([r.answer for r in rows]), records, per_sample([r.difficulty for r in rows]),
                        shards([s.verified_text for s in samples], parts)))
        return [s for part in self.pool.call("score", args, "reward score") for s in part]

    def set_rm_weights(self, state_dict: dict, version: int) -> None:
        """A refreshed RM's weights to every reward worker (one copy in the object store), between two batches; a
        worker restarted later gets them too, before it scores anything."""
        ref = ray.put(state_dict)
        self.pool.call("set_rm_weights", [(ref, version)] * len(self.pool), "reward-model weight swap")
        self.pool.restore = lambda worker: get_all([worker.set_rm_weights.remote(ref, version)],
                                                   ["restarted reward worker"], "reward-model weight swap",
                                                   self.pool.timeout_s)

    def verify(self, texts: list[str], references: list[str]) -> list[dict]:
        """The verifier's verdicts alone (held-out evaluation)."""
        args = list(zip(shards(texts, len(self.pool)), shards(references, len(self.pool))))
        return [v for part in self.pool.call("verify", args, "reward verify") for v in part]

    def shutdown(self) -> None:
        self.pool.shutdown()
