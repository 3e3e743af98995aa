"""Weight sync by collective broadcast: trainer rank 0 sends the policy's tensors to the rollout workers over a
torch.distributed process group of their own (``rollout.weight_sync: broadcast``).

The group is not DeepSpeed's: trainer rank 0 hosts a ``TCPStore`` and each *generation* of the group (a fresh one
after a worker restarts) rendezvouses under its own key prefix, with gloo on CPU and NCCL on GPU. Member 0 is
trainer rank 0, members 1.. the workers. A LoRA policy's adapters are merged on the way (the engine holds the plain
model). Both sides walk the same *manifest* (name, shape, dtype of every tensor,
in the trainer model's order) cut into the same buckets of at most ``bucket_bytes`` (a tensor larger than that
travels alone), so only flat bucket tensors cross the wire. A header with the version and generation goes first
and each receiver checks it. Every wait has the run's timeout: a dead or stuck peer raises, never hangs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from rlhf.core.distributed.colocate import ColocatedTrainerMemory
from rlhf.core.models import lora

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
# A store key that a member who saw the generation fail sets; how often the others look for it, and how long they
# sleep between looks at their own operation (small beside a bucket's transfer).
_ABORTED = "aborted"
_ABORT_POLL_S = 0.05
_SPIN_S = 0.0002


class WeightSyncError(RuntimeError):
    """The broadcast did not carry what the receiver expected (another version, generation or tensor layout)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # str(torch.dtype), e.g. "torch.float32": plain data for Ray to pickle

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _DTYPES[self.dtype].itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_buckets(manifest: list[TensorSpec], bucket_bytes: int) -> list[list[int]]:
    """Manifest indices grouped into consecutive buckets of one dtype and at most ``bucket_bytes`` each (a tensor
    larger than that alone in its bucket). Sender and receivers derive the same plan from the same manifest."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, spec in enumerate(manifest):
        if not buckets or spec.dtype != dtype or size + spec.nbytes > bucket_bytes:
            buckets.append([])
            size, dtype = 0, spec.dtype
        buckets[-1].append(i)
        size += spec.nbytes
    return buckets


def host_store(timeout_s: float) -> tuple[dist.TCPStore, str, int]:
    """Start the rendezvous store in this process (trainer rank 0): the store, and the address and port where the
    workers reach it (this node's address: workers may be on other nodes)."""
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    return store, host, store.port


class BroadcastGroup:
    """One generation of the weight-sync group, as seen by member ``rank`` of ``size``."""

    def __init__(self, store: dist.Store | None, host: str, port: int, rank: int, size: int, generation: int,
                 timeout_s: float, device: torch.device):
        """``store``: trainer rank 0's own (``host_store``); the workers pass None and connect to host:port."""
        self.rank, self.size, self.generation, self.device = rank, size, generation, device
        self.aborted = False
        self.timeout = timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, is_master=False, timeout=self.timeout)
        # A prefix per generation: a fresh group never meets the keys of one that lost a member.
        self.store = prefixed = dist.PrefixStore(f"weight_sync/{generation}/", store)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, size, options)
            # NCCL's is_completed turns true only once the GPU has run the operation: the poll below still holds.
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, size, self.timeout)

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        """Member 0's ``tensor`` into everyone's, waiting at most the timeout.

        A member that dies closes its connections, and gloo raises at once in the members that talk to it (member
        0 for a broadcast) but not in the others, which would wait out the whole timeout. So whoever fails marks the
        generation aborted in the store, and the waiting members poll that mark besides their own operation."""
        if self.aborted:
            raise WeightSyncError(f"weight broadcast ({what}): generation {self.generation} was aborted")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        work = self.group.broadcast([tensor], options)
        deadline = time.monotonic() + self.timeout.total_seconds()
        next_look = time.monotonic() + _ABORT_POLL_S
        while not work.is_completed():
            now = time.monotonic()
            if now > deadline:
                self.abort()
                raise TimeoutError(f"weight broadcast ({what}) did not finish within "
                                   f"{self.timeout.total_seconds():.0f} s")
            if self.aborted:  # abort() from another thread of this member
                raise WeightSyncError(f"weight broadcast ({what}, generation {self.generation}) was aborted")
            if now > next_look:
                next_look = now + _ABORT_POLL_S
                if self.store.check([_ABORTED]):
                    self.abort()
                    raise WeightSyncError(f"weight broadcast ({what}, generation {self.generation}) was aborted "
                                          f"by another member")
            time.sleep(_SPIN_S)
        try:
            work.wait()
        except RuntimeError as err:
            self.abort()
            raise WeightSyncError(f"weight broadcast ({what}, generation {self.generation}) failed: "
                                  f"{str(err).splitlines()[0]}") from None

    def abort(self) -> None:
        """End this generation for every member (the driver forms a fresh one), and this member's part of it now:
        its process group is aborted, so an operation still queued (an NCCL kernel waiting on a dead peer, which
        would hold the GPU's stream and the next generation behind it) ends instead of waiting out the timeout,
        and every later operation on this group is refused."""
        self.aborted = True
        try:
            self.store.set(_ABORTED, "1")
        except RuntimeError:  # the store's host (trainer rank 0) is gone: the others fail on their own
            pass
        try:
            self.group.abort()
        except RuntimeError:  # already torn down
            pass

    def _header(self, version: int, buckets: int) -> torch.Tensor:
        return torch.tensor([version, self.generation, buckets], dtype=torch.int64, device=self.device)

    def send(self, manifest: list[TensorSpec], tensors: Iterable[torch.Tensor], version: int,
             bucket_bytes: int) -> int:
        """Broadcast ``tensors`` (full, in manifest order; each may be freed once the next is asked for: ZeRO-3
        gathers them one at a time) in buckets. Returns the bytes sent."""
        plan = plan_buckets(manifest, bucket_bytes)
        self.broadcast(self._header(version, len(plan)), "header")
        stream, sent = iter(tensors), 0
        for number, bucket in enumerate(plan):
            parts = []
            for i in bucket:
                tensor = next(stream)
                if tuple(tensor.shape) != manifest[i].shape:
                    raise WeightSyncError(f"{manifest[i].name} has shape {tuple(tensor.shape)}, the manifest "
                                          f"{manifest[i].shape}")
                parts.append(tensor.detach().reshape(-1).to(self.device, _DTYPES[manifest[i].dtype]))
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            self.broadcast(flat, f"bucket {number + 1}/{len(plan)}")
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, manifest: list[TensorSpec], version: int, bucket_bytes: int) -> Iterator[list[tuple]]:
        """The tensors member 0 sends, a bucket at a time as [(name, tensor)], after checking they are ``version``
        of this generation. The tensors are views into one receive buffer per dtype, reused by the next bucket:
        copy them where they go before asking for it (no second copy of the whole model on the device)."""
        plan = plan_buckets(manifest, bucket_bytes)
        header = self._header(-1, -1)
        self.broadcast(header, "header")
        got_version, got_generation, got_buckets = header.tolist()
        if (got_version, got_generation, got_buckets) != (version, self.generation, len(plan)):
            self.abort()  # the sender would otherwise wait out its timeout for this member
            raise WeightSyncError(f"weight broadcast carries v{got_version} of generation {got_generation} in "
                                  f"{got_buckets} buckets, this worker expects v{version} of generation "
                                  f"{self.generation} in {len(plan)}")
        buffers: dict[str, torch.Tensor] = {}
        for number, bucket in enumerate(plan):
            specs = [manifest[i] for i in bucket]
            sizes = [_numel(s.shape) for s in specs]
            dtype = specs[0].dtype
            if dtype not in buffers or buffers[dtype].numel() < sum(sizes):
                buffers.pop(dtype, None)  # freed before the larger one is allocated
                largest = max(sum(_numel(manifest[i].shape) for i in b) for b in plan
                              if manifest[b[0]].dtype == dtype)
                buffers[dtype] = torch.empty(largest, dtype=_DTYPES[dtype], device=self.device)
            flat = buffers[dtype][:sum(sizes)]
            self.broadcast(flat, f"bucket {number + 1}/{len(plan)}")
            yield [(spec.name, part.view(spec.shape)) for spec, part in zip(specs, flat.split(sizes))]

    def receive_into(self, manifest: list[TensorSpec], version: int, bucket_bytes: int,
                     targets: dict[str, torch.Tensor]) -> None:
        """Receive ``version`` straight into ``targets`` (name -> the engine's own tensor, copied into in place,
        in its dtype and device). Checked against the manifest before anything arrives: a name or shape that does
        not fit aborts the generation with the weights untouched."""
        wrong = [f"{s.name} {s.shape}" for s in manifest
                 if s.name not in targets or tuple(targets[s.name].shape) != s.shape]
        if wrong:
            self.abort()
            raise WeightSyncError(f"the broadcast's tensors do not fit this engine's model: {wrong[:3]}")
        with torch.no_grad():
            for bucket in self.receive(manifest, version, bucket_bytes):
                for name, tensor in bucket:
                    targets[name].copy_(tensor)


def module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every distinct parameter and persistent buffer of ``module``, in state-dict order; a tied
    weight (lm_head = embeddings) appears once, under its first name."""
    by_name = dict(module.named_parameters())
    by_name.update(module.named_buffers())
    seen, out = set(), []
    for name in module.state_dict(keep_vars=True):
        tensor = by_name.get(name)
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append((name, tensor))
    return out


def hf_sources(module: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """What every tensor a rollout engine holds is made of, by its Hugging Face name, in state-dict order: the
    tensor itself, or for a LoRA model (rlhf/core/models/lora.py) an adapted weight's [W, lora_A, lora_B], merged before
    it is sent: the engine holds the plain model, as the object-store sync's ``full_state_dict`` gives it."""
    named = module_tensors(module)
    return lora.hf_sources(named) if lora.is_peft(module) else {name: [tensor] for name, tensor in named}


def manifest_of(module: torch.nn.Module) -> list[TensorSpec]:
    """The manifest of ``module``'s full tensors as a rollout engine holds them (``hf_sources``; a ZeRO-3
    partitioned parameter counts at its full shape)."""
    return [TensorSpec(name, tuple(getattr(parts[0], "ds_shape", parts[0].shape)), str(parts[0].dtype))
            for name, parts in hf_sources(module).items()]


def full_tensors(module: torch.nn.Module, deepspeed=None) -> Iterator[torch.Tensor]:
    """``module``'s full tensors in manifest order (LoRA adapters merged). With ``deepspeed`` given (ZeRO-3) the
    parameters of each tensor (one, or a weight and its two adapters) are gathered together and released when the
    next is asked for: one tensor's full copy at a time, not the model's. Collective under ZeRO-3: every rank must
    walk it to the end."""
    lora_scaling = lora.scaling(module) if lora.is_peft(module) else 1.0
    for parts in hf_sources(module).values():
        partitioned = [p for p in parts if deepspeed is not None and hasattr(p, "ds_id")]
        if partitioned:
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                yield lora.merge_weight([p.data for p in parts], lora_scaling)
        else:
            yield lora.merge_weight([p.data for p in parts], lora_scaling)


def policy_tensors(module: torch.nn.Module, deepspeed=None):
    """``module``'s full tensors (``manifest_of``, ``full_tensors``) for vLLM's transfer engines."""
    from rlhf.core.distributed.vllm_transfer import PolicyTensors

    metadata = [(s.name, _DTYPES[s.dtype], s.shape) for s in manifest_of(module)]
    return PolicyTensors(metadata, lambda: full_tensors(module, deepspeed))


class WeightBroadcaster(ColocatedTrainerMemory):
    """The sending side, mixed into a trainer rank (``DeepSpeedRank``: ``engine``, ``rank``, ``engine_cfg``,
    ``_deepspeed``, ``device``). Rank 0 hosts the store and is member 0 of the group; under ZeRO-3 every rank takes
    part in ``broadcast_weights`` to gather the parameters, one at a time."""

    _sync_store = None
    _sync_group: BroadcastGroup | None = None
    _vllm_transfer = None  # vLLM's trainer-side transfer engine (rlhf/core/distributed/vllm_transfer.py)

    def weight_sync_endpoint(self, timeout_s: float) -> tuple[str, int, list[TensorSpec]]:
        """(host, port, manifest) on rank 0: where the workers reach the store (started on the first call) and
        the tensors every broadcast carries."""
        if self._sync_store is None:
            self._sync_store, self._sync_host, self._sync_port = host_store(timeout_s)
        return self._sync_host, self._sync_port, manifest_of(self.engine.module)

    def join_weight_sync(self, size: int, generation: int, timeout_s: float) -> None:
        """Become member 0 of a fresh generation of the group (collective with the workers joining it)."""
        self._sync_group = None
        self._sync_group = BroadcastGroup(self._sync_store, self._sync_host, self._sync_port, 0, size, generation,
                                          timeout_s, self.device)

    def broadcast_weights(self, version: int, bucket_bytes: int) -> float:
        """Send the current weights as ``version``; returns the seconds rank 0 took (0 on the others)."""
        module = self.engine.module
        zero3 = self._deepspeed if self.engine_cfg.zero_stage == 3 else None
        tensors = full_tensors(module, zero3)
        start = time.perf_counter()
        try:
            if self.rank == 0:
                if self._sync_group is None:
                    raise RuntimeError("broadcast_weights before join_weight_sync: the driver forms the group first")
                self._sync_group.send(manifest_of(module), tensors, version, bucket_bytes)
        finally:
            for _ in tensors:  # ZeRO-3: the other ranks gather with this one to the end, sent or not
                pass
        self.release_gpu()
        return time.perf_counter() - start

    def transfer_endpoint(self) -> tuple[str, int]:
        """This rank's node address and a free port: where vLLM's NCCL transfer group meets."""
        from rlhf.core.distributed.cluster import node_endpoint

        return node_endpoint()

    def join_vllm_transfer(self, backend: str, workers: list, tensor_parallel_size: int, bucket_bytes: int,
                           timeout_s: float, endpoint: tuple[str, int] | None = None) -> None:
        """Start vLLM's own transfer engine toward the rollout workers (``workers``: their Ray handles) on every
        rank: ``ipc`` (each rank exports its GPU's copy, rank 0 ships the handles) or ``nccl`` (rank 0 broadcasts
        from ``endpoint``, its host and a free port, to every tensor-parallel worker). Replaces an earlier one."""
        from rlhf.core.distributed import vllm_transfer

        if self._vllm_transfer is not None:
            self._vllm_transfer.shutdown()
            self._vllm_transfer = None
        zero3 = self._deepspeed if self.engine_cfg.zero_stage == 3 else None
        client = vllm_transfer.RolloutClient(workers, tensor_parallel_size, timeout_s)
        self._vllm_transfer = vllm_transfer.trainer_engine(
            backend, self.rank, client, vllm_transfer.source(policy_tensors(self.engine.module, zero3)), bucket_bytes,
            endpoint,
            vllm_transfer.transfer_world_size(len(workers), tensor_parallel_size))

    def send_vllm_weights(self, version: int) -> float:
        """Send the current weights as ``version`` through vLLM's transfer engine (every rank: ZeRO-3 gathers and
        IPC's handle exchange are collective); returns the seconds it took."""
        if self._vllm_transfer is None:
            raise RuntimeError("send_vllm_weights before join_vllm_transfer: the driver starts the transfer first")
        start = time.perf_counter()
        self._vllm_transfer.client.version = version
        self._vllm_transfer.send_weights()
        self.release_gpu()
        return time.perf_counter() - start
