"""Weight sync by collective broadcast, driven from here (``rollout.weight_sync: broadcast``).

Trainer rank 0 and the rollout workers form a process group of their own (rlhf/core/distributed/weight_sync.py); each sync
is one ``broadcast_weights`` call on every trainer rank (ZeRO-3 gathers with all of them) and one
``receive_weights`` on every worker, waited for together with the run's timeout. A worker that was restarted
(got its weights through the object store, ``RolloutGroup._restore``) makes the group stale, and the next sync
forms a fresh generation first. A sync that fails because a worker died restarts it and is tried once more in a
fresh group.

With the vllm engine the transfer is vLLM's own (``VLLMTransferSync``, rlhf/core/distributed/vllm_transfer.py):
CUDA IPC where trainer and rollout share GPUs, NCCL to every tensor-parallel worker otherwise; the backend is the
one ``rollout.weight_transfer`` names (chosen from the placement at start, rlhf/core/distributed/cluster.py).
"""
from __future__ import annotations

import logging

import ray

from rlhf.core.config.run_config import RunConfig
from rlhf.core.distributed.worker_pool import WorkerPool, get_all
from rlhf.rl.ranks.policy import TrainerGroup

logger = logging.getLogger("distilrl")


class BroadcastSync:
    def __init__(self, cfg: RunConfig, trainer: TrainerGroup, pool: WorkerPool):
        self.trainer, self.pool = trainer, pool
        self.timeout_s = cfg.call_timeout_s
        self.bucket_bytes = int(cfg.rollout.sync_bucket_mb * 2**20)
        self.generation = 0
        self.stale = True  # no group yet
        self._members: list = []  # the worker handles of the current generation

    def _form(self) -> None:
        """A fresh generation: trainer rank 0 and every current worker rendezvous under a new key prefix."""
        rank0 = self.trainer.actors[0]
        host, port, manifest = get_all([rank0.weight_sync_endpoint.remote(self.timeout_s)], ["trainer rank 0"],
                                       "weight sync endpoint", self.timeout_s)[0]
        self.generation += 1
        size = len(self.pool) + 1
        refs = [rank0.join_weight_sync.remote(size, self.generation, self.timeout_s)]
        refs += [w.join_weight_sync.remote(host, port, i + 1, size, self.generation, manifest, self.timeout_s)
                 for i, w in enumerate(self.pool.workers)]
        get_all(refs, self._names(), "weight sync group start", self.timeout_s)
        self._members, self.stale = list(self.pool.workers), False

    def _names(self) -> list[str]:
        return ([f"trainer rank {r}" for r in range(len(self.trainer.actors))]
                + [f"rollout worker {i}" for i in range(len(self.pool))])

    def submit(self, version: int) -> tuple[list, list[str]]:
        """Start one sync of ``version``: (refs of every trainer rank's and worker's part, whose they are)."""
        if self.stale or self._members != self.pool.workers:
            self._form()
        refs = [a.broadcast_weights.remote(version, self.bucket_bytes) for a in self.trainer.actors]
        refs += [w.receive_weights.remote(version) for w in self.pool.workers]
        return refs, self._names()

    def sync(self, version: int) -> None:
        """Broadcast ``version`` to every worker and wait; once more in a fresh group if a worker died meanwhile."""
        refs, names = self.submit(version)
        try:
            get_all(refs, names, "weight broadcast", self.timeout_s)
        except Exception as err:  # noqa: BLE001 - whatever failed, only a dead worker is worth a second try
            ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)  # let every member give up first
            restarts = self.pool.restarts
            self.pool.call("__ray_ready__", [()] * len(self.pool), "rollout worker check after a failed sync")
            if self.pool.restarts == restarts:
                raise
            logger.warning("weight broadcast v%d failed (%s); a worker was restarted, syncing again in a fresh "
                           "group", version, str(err).splitlines()[0])
            self.stale = True
            refs, names = self.submit(version)
            get_all(refs, names, "weight broadcast", self.timeout_s)


class VLLMTransferSync(BroadcastSync):
    """The same driver-side shape (``submit``, ``sync`` with one retry in a fresh transfer after a worker
    restart), over vLLM's transfer engine: every trainer rank starts it toward the current workers (rank 0 the
    rendezvous, for NCCL at its node's address), then each sync is ``send_vllm_weights`` on every rank; the
    workers' part runs inside those calls (the trainer drives them), so only the trainer ranks are waited for."""

    def __init__(self, cfg: RunConfig, trainer: TrainerGroup, pool: WorkerPool):
        super().__init__(cfg, trainer, pool)
        self.backend = cfg.rollout.weight_transfer
        self.tensor_parallel_size = cfg.rollout.tensor_parallel_size

    def _form(self) -> None:
        endpoint = None
        if self.backend == "nccl":
            endpoint = get_all([self.trainer.actors[0].transfer_endpoint.remote()], ["trainer rank 0"],
                               "weight transfer endpoint", self.timeout_s)[0]
        self.generation += 1
        refs = [a.join_vllm_transfer.remote(self.backend, self.pool.workers, self.tensor_parallel_size,
                                            self.bucket_bytes, self.timeout_s, endpoint)
                for a in self.trainer.actors]
        get_all(refs, self._names()[:len(refs)], "vllm weight transfer start", self.timeout_s)
        self._members, self.stale = list(self.pool.workers), False

    def submit(self, version: int) -> tuple[list, list[str]]:
        if self.stale or self._members != self.pool.workers:
            self._form()
        refs = [a.send_vllm_weights.remote(version) for a in self.trainer.actors]
        return refs, self._names()[:len(refs)]
