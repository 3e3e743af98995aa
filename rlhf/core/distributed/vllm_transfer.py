"""Weight sync through vLLM's own transfer engines (vLLM 0.34: vllm/distributed/weight_transfer/), for the vllm
rollout engine with ``rollout.weight_sync: broadcast``.

vLLM ships both sides. The trainer side (``IPCTrainerWeightTransferEngine``, ``NCCLTrainerWeightTransferEngine``)
runs in every trainer rank over a ``WeightSource`` (here: the policy's full tensors in manifest order, LoRA merged,
ZeRO-3 gathered one at a time, as the object-store sync sees them) and drives the inference side through a client
with four calls (``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights``,
``finish_weight_update``); here that client is the rollout workers' Ray handles, each passing the call to its
vLLM engine (rollout/vllm_engine.py). Two backends:

- ``ipc`` where a trainer rank shares its GPU with a rollout worker (colocated): CUDA IPC handles of packed
  buckets, no copy through host memory and no process group (NCCL refuses two ranks on one GPU);
- ``nccl`` across GPUs: rank 0 broadcasts packed buckets to a group of itself and every vLLM worker; an engine
  with tensor parallelism has ``tensor_parallel_size`` workers, each a member at ``rank_offset + its rank``, so
  rollout worker i's engine starts at 1 + i x tensor_parallel_size.

Importing vllm happens inside the functions: this module loads without it (CPU tests exercise the pure parts).
"""
from __future__ import annotations

import math
from functools import cached_property

import ray
import torch


def transfer_world_size(workers: int, tensor_parallel_size: int) -> int:
    """Members of the NCCL transfer group: trainer rank 0 and every vLLM worker of every rollout worker."""
    return 1 + workers * tensor_parallel_size


def worker_init_infos(init_info: dict, workers: int, tensor_parallel_size: int) -> list[dict]:
    """The init info for each rollout worker's engine: vLLM's trainer side builds one for a single engine (its
    ``rank_offset`` the first inference rank); engine i's workers come ``tensor_parallel_size`` ranks later each.
    IPC's carries no ranks and goes to all alike."""
    if "rank_offset" not in init_info:
        return [dict(init_info) for _ in range(workers)]
    first = init_info["rank_offset"]
    return [{**init_info, "rank_offset": first + i * tensor_parallel_size} for i in range(workers)]


def buffer_bytes(tensor_bytes: list[int], bucket_bytes: int) -> int:
    """The packed buffer's size: ``rollout.sync_bucket_mb``, or the largest tensor where that is larger (vLLM's
    packed IPC producer refuses a tensor that does not fit its one buffer; the embedding often is the largest)."""
    return max([bucket_bytes, *tensor_bytes])


class RolloutClient:
    """vLLM's ``VLLMWeightSyncClient`` over the rollout workers: each call goes to every worker (their
    ``weight_transfer``), waited for with the run's timeout. ``version`` is what ``finish_weight_update`` makes
    the workers hold (the sender sets it before each send)."""

    def __init__(self, workers: list, tensor_parallel_size: int, timeout_s: float):
        self.workers, self.tp, self.timeout_s = list(workers), tensor_parallel_size, timeout_s
        self.version: int | None = None

    def _all(self, method: str, payloads: list) -> None:
        ray.get([w.weight_transfer.remote(method, p) for w, p in zip(self.workers, payloads)],
                timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("init_weight_transfer_engine", worker_init_infos(init_info, len(self.workers), self.tp))

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [None] * len(self.workers))

    def update_weights(self, update_info) -> None:
        self._all("update_weights", [update_info] * len(self.workers))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        self._all("finish_weight_update", [version] * len(self.workers))


class PolicyTensors:
    """The policy's full tensors as vLLM's ``WeightSource`` wants them: ``metadata`` (name, dtype, full shape:
    every rank owns every tensor) and ``iter_full``, a fresh pass each call (``tensors()``: the tensors in metadata
    order, collective under ZeRO-3). Built by weight_sync.policy_tensors."""

    def __init__(self, metadata: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors):
        self.metadata, self._tensors = metadata, tensors

    def iter_full(self):
        return zip([name for name, _, _ in self.metadata], self._tensors())


def source(tensors: PolicyTensors):
    """``tensors`` as a subclass of vLLM's ``WeightSource`` (its engines check the type's methods)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class Source(WeightSource):
        def __init__(self):
            self.tensors = tensors

        @cached_property
        def metadata(self):
            return [ParamMeta(name, dtype, shape) for name, dtype, shape in self.tensors.metadata]

        def iter_full(self):
            return self.tensors.iter_full()

    return Source()


def trainer_engine(backend: str, rank: int, client: RolloutClient, weights, bucket_bytes: int,
                   endpoint: tuple[str, int] | None, world_size: int):
    """vLLM's trainer-side engine for ``backend``, started (the rendezvous with the workers done)."""
    bucket_bytes = buffer_bytes([dtype.itemsize * math.prod(shape) for _, dtype, shape in weights.tensors.metadata],
                                bucket_bytes)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine

        info = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=bucket_bytes)
        return IPCTrainerWeightTransferEngine.trainer_init(info, client=client, source=weights)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo,
                                                                   NCCLTrainerWeightTransferEngine)

        host, port = endpoint
        info = NCCLTrainerInitInfo(rank=rank, master_address=host, master_port=port, world_size=world_size,
                                   packed=True, packed_buffer_size_bytes=bucket_bytes)
        return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=weights)
    raise ValueError(f"no vLLM weight transfer backend {backend!r} (ipc or nccl)")
