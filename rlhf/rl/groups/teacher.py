"""On-policy distillation's teacher as the update sees it: the local teacher's log-prob workers as one group (a
batch's rows split across them), or a remote teacher called from the driver."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import ray
import torch

from reward.teachers.logprobs import RemoteTeacherLogprobs, TeacherLogprobWorker
from rlhf.core.data.batch import TrainBatch
from rlhf.core.distributed import cluster, threads
from rlhf.core.config.run_config import RunConfig
from rlhf.core.distributed.worker_pool import WorkerPool
from rlhf.core.distributed.split import row_slices


class TeacherGroup:
    """``reward.teacher_workers`` actors, each holding the teacher in ``reward.teacher_model_path``."""

    def __init__(self, cfg: RunConfig):
        r = cfg.reward
        # The reward workers' placement, with the teacher workers' own thread share.
        resources = replace(cluster.role_resources(cfg, "reward"), threads=threads.run_budget(cfg)["teacher"])
        actor = ray.remote(**resources.options())(TeacherLogprobWorker)
        self.pool = WorkerPool("teacher", lambda i: actor.remote(r.teacher_model_path, cfg.rollout.threads,
                                                                 cfg.trainer.micro_batch_size, cfg.rollout.temperature),
                               r.teacher_workers, cfg.call_timeout_s, cfg.max_worker_restarts)

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """The teacher's (B, L) log-probs of the batch's rows."""
        inputs = batch.inputs()
        args = [({k: v[part] for k, v in inputs.items()},) if part.stop > part.start else None
                for part in row_slices(batch.input_ids.shape[0], len(self.pool))]
        return torch.cat([p for p in self.pool.call("logprobs", args, "teacher logprobs") if p is not None])

    def shutdown(self) -> None:
        self.pool.shutdown()


def make_teacher_group(cfg: RunConfig, cache_dir: Path):
    """The local teacher's workers, or the remote teacher (``reward.teacher_endpoint``) called from the driver, its
    replies cached in ``cache_dir``."""
    e = cfg.reward.teacher_endpoint
    if e is not None:
        return RemoteTeacher(RemoteTeacherLogprobs(e.url, e.model, e.api_key_env, e.concurrency, cache_dir=cache_dir,
                                                   timeout_s=e.timeout_s, max_retries=e.max_retries))
    return TeacherGroup(cfg)


class RemoteTeacher:
    """A remote teacher as the update sees a teacher group."""

    def __init__(self, client: RemoteTeacherLogprobs):
        self.client = client

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return self.client.logprobs(batch.inputs())

    def shutdown(self) -> None:
        pass
