"""The DeepSpeed rank and Ray rank-group machinery that every trainer shares (policy, critic, reward model).

``DeepSpeedRank`` is one data-parallel rank: it joins the process group, wraps a model in a DeepSpeed engine
(ZeRO-2/3, AdamW), gathers full weights, writes Hugging Face checkpoints and resumable engine state.
``RankGroup`` starts ``num_ranks`` such ranks as Ray actors in one placement group and waits for every call with a
timeout. The trainers built on them: rlhf/rl/ranks/policy.py (policy), rlhf/rl/ranks/critic.py (PPO's critic), reward/model/ranks.py.
"""
from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import replace
from datetime import timedelta

import torch

from rlhf.core.distributed import cluster
from rlhf.core.distributed import threads as thread_budget  # not ``threads``: RankGroup's argument of that name

from rlhf.core.models import lora

from rlhf.core.data import packing
from rlhf.core.data.batch import TrainBatch
from rlhf.core.checkpoints.atomic import atomic_dir
from rlhf.core.config.run_config import EngineConfig
from rlhf.core.checkpoints.resume import load_rng_file, set_torch_rng_state, torch_rng_state
from rlhf.core.models.safe_load import weights_only_torch_load
from rlhf.core.distributed.split import row_slices
from rlhf.core.distributed.worker_pool import get_all

class DeepSpeedRank:
    """One data-parallel DeepSpeed rank: joins the process group, wraps a model in an engine, gathers and saves it.

    The common core of the trainers (policy here, reward model in reward/model/ranks.py). Creating one joins the
    process group, so all ``world_size`` ranks must be created together; a subclass then sets ``model_dir`` (the
    source of the side files save_pretrained copies) and calls ``_wrap(model)``.
    """

    # Files in model_dir that save_pretrained must not copy (e.g. a causal LM's generation config beside a reward
    # model).
    _side_files_to_skip: tuple[str, ...] = ()

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, engine: EngineConfig,
                 seed: int, timeout_s: float, niceness: int = 0):
        """``engine``: the role's config section (trainer, critic, reward_model); ``niceness`` is added to the
        process's CPU niceness (the driver's choice for asynchronous rollout, rlhf/rl/ranks/policy.py)."""
        self.engine_cfg = engine
        self.rank, self.world_size = rank, world_size
        cuda = torch.cuda.is_available()
        # Under Ray each rank sees only its own GPU, so its local rank is 0; under torchrun all are visible.
        local_rank = rank % torch.cuda.device_count() if cuda else 0
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        if not cuda:
            # DeepSpeed picks its accelerator when first imported; without this it may guess wrong on a CPU box.
            os.environ["DS_ACCELERATOR"] = "cpu"
        else:
            torch.cuda.set_device(local_rank)
        import deepspeed

        if not cuda:
            # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce extension on first use: minutes of
            # C++ on a small box, to speed up collectives that are negligible at the sizes run on CPU. Gloo does.
            # (importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm has an attribute named torch, the
            # torch package itself, which that statement would return and patch instead.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        self._deepspeed = deepspeed
        if niceness:
            os.nice(niceness)
        thread_budget.apply(type(self).__name__, engine.threads)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        torch.manual_seed(seed)
        self.bf16 = engine.bf16 and cuda

    def _wrap(self, model: torch.nn.Module) -> None:
        """Make ``self.engine`` (AdamW, gradient clipping, ZeRO ``zero_stage``) over ``model``."""
        cfg = self.engine_cfg
        ds_config = {
            # One update per train_step, whatever the batch size: we mark the accumulation boundary ourselves
            # (see train_step), so DeepSpeed's own count is 1 and its train_batch_size is only nominal.
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.micro_batch_size * self.world_size,
            "gradient_clipping": cfg.max_grad_norm,
            "optimizer": cfg.optimizer_section(),
            "zero_optimization": cfg.zero_section(),
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        warm = cfg.lr_warmup_steps
        # Optimizer step k (from 1) runs at lr * min(1, k / warm). (DeepSpeed's own WarmupLR spends its first two
        # steps at its minimum lr.) DeepSpeed steps the schedule after each optimizer step and checkpoints it.
        schedule = (lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: min(1.0, (done + 1) / warm))) if warm else None
        # Only what trains: with LoRA the optimizer state is the adapters' alone.
        self.engine, *_ = self._deepspeed.initialize(model=model, model_parameters=lora.trainable_parameters(model),
                                                     config=ds_config, lr_scheduler=schedule)
        self.device = self.engine.device

    def _micro_batches(self, batch: dict[str, torch.Tensor] | TrainBatch):
        """(first row, micro-batch on the device, RowPacking or None) over ``batch``'s right-padded rows
        (packing.micro_batches): padding-free where the model's attention kernel is known to take packed rows."""
        can_pack = self.engine.module.config._attn_implementation in packing.PACKABLE_ATTENTION
        return packing.micro_batches(batch, self.engine_cfg.micro_batch_size, self.device, can_pack)

    def _per_token(self, batch: dict[str, torch.Tensor], compute) -> torch.Tensor:
        """``compute(micro-batch)``, a per-token (rows, L) result, over ``batch``'s rows (input_ids,
        attention_mask), back in the batch's padded layout: (B, L) on the CPU, 0 at padding."""
        can_pack = self.engine.module.config._attn_implementation in packing.PACKABLE_ATTENTION
        return packing.per_token(batch, self.engine_cfg.micro_batch_size, self.device, can_pack, compute)

    def _sum_across_ranks(self, sums: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a small CPU tensor of per-rank figures; returns it on the CPU."""
        if torch.distributed.is_initialized() and self.world_size > 1:
            reduced = sums.to(self.device)
            torch.distributed.all_reduce(reduced)
            return reduced.cpu()
        return sums

    # --------------------------------------------------------------------------------------------------- weights

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's full weights (HF names, as ``model.state_dict()`` gives them; LoRA adapters merged in) as CPU
        tensors on rank 0; None on the others. Collective: under ZeRO-3 every rank must take part in gathering."""
        state_dict = self._gathered_state_dict()
        return lora.hf_state_dict(self.engine.module, state_dict) if state_dict is not None else None

    def _gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """``engine.module.state_dict()`` whole, as CPU tensors on rank 0; None on the others. Collective."""
        module = self.engine.module
        if self.engine_cfg.zero_stage == 3:
            # Gathers the whole model on every rank at once: simple, and fine while one full copy fits a device.
            with self._deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return _cpu_copy(module.state_dict()) if self.rank == 0 else None
        return _cpu_copy(module.state_dict()) if self.rank == 0 else None

    def save_pretrained(self, path: str) -> None:
        """Write a Hugging Face checkpoint (safetensors) to ``path`` from rank 0. Collective (see full_state_dict).

        Written into ``path + ".tmp"`` and renamed, so a crash never leaves a half-written checkpoint at ``path``.
        """
        state_dict = self._gathered_state_dict()
        if self.rank != 0:
            return
        with atomic_dir(path) as tmp:
            if lora.is_peft(self.engine.module):  # merged weights, and the adapters alone in tmp/adapter
                lora.save_merged_with_adapter(self.engine.module, state_dict, tmp)
            else:
                self.engine.module.save_pretrained(tmp, state_dict=state_dict)
            # Tokenizer files and the like, so the checkpoint is usable on its own; weights come only from state_dict.
            copy_side_files(self.model_dir, tmp, skip=self._side_files_to_skip)

    # ---------------------------------------------------------------------------------------- resumable state

    def save_state(self, path: str) -> None:
        """This rank's engine state (weights with ZeRO partitions, optimizer, scheduler) in DeepSpeed's checkpoint
        layout under ``path``, and its torch RNG state. Collective: every rank writes its own partition."""
        # With LoRA the frozen base weights are left out: they are the model directory's, reloaded at start.
        self.engine.save_checkpoint(path, tag=_DS_TAG, save_latest=False,
                                    exclude_frozen_parameters=lora.is_peft(self.engine.module))
        torch.save(torch_rng_state(), os.path.join(path, f"rng_rank{self.rank}.pt"))

    def load_state(self, path: str) -> None:
        """Restore what ``save_state`` wrote (the same number of ranks and ZeRO stage). Collective."""
        with weights_only_torch_load():  # DeepSpeed asks torch.load for weights_only=False: never unpickle code
            loaded, _ = self.engine.load_checkpoint(path, tag=_DS_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True,
                                                    load_module_strict=not lora.is_peft(self.engine.module))
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed state for rank {self.rank} in {path}")
        set_torch_rng_state(load_rng_file(os.path.join(path, f"rng_rank{self.rank}.pt")))


# DeepSpeed's checkpoint "tag" (subdirectory) inside a run checkpoint's trainer/ directory.
_DS_TAG = "deepspeed"


def _cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU clones, one per distinct tensor: tied weights (embeddings = lm_head) stay one shared tensor,
    as in the model, which save_pretrained expects."""
    copies: dict[tuple[int, int], torch.Tensor] = {}
    out = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def copy_side_files(source_dir: str, target_dir, skip: tuple[str, ...] = ()) -> None:
    """Copy tokenizer files and the like from ``source_dir`` into a checkpoint being written: every plain file that
    is not a weight file, not already written there, and not named in ``skip``."""
    for name in os.listdir(source_dir):
        source = os.path.join(source_dir, name)
        if (os.path.isfile(source) and name not in skip and not os.path.exists(os.path.join(target_dir, name))
                and not name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json"))):
            shutil.copy2(source, target_dir)


# ----------------------------------------------------------------------------------------------------- the group


class RankGroup:
    """``num_ranks`` Ray actors of a ``DeepSpeedRank`` subclass forming one data-parallel DeepSpeed group.

    Every call waits at most ``timeout_s`` and raises a TimeoutError naming the call, rather than hanging when a
    rank dies or a collective stalls. Subclasses add train_step; ``_shards`` splits a batch's rows across ranks.
    """

    def __init__(self, rank_cls: type, args: tuple, threads: int, num_ranks: int, timeout_s: float,
                 resources: cluster.Resources | None = None, strategy: str = "PACK", placement_timeout_s: float = 120.0,
                 role: str = "trainer"):
        """Start ``rank_cls(rank, num_ranks, master_addr, master_port, *args)`` on each rank, each rank in its own
        bundle of one placement group (``strategy`` decides how the bundles spread over nodes). ``resources``: what
        each rank asks for; by default ``threads`` CPUs and one GPU when the cluster has one per rank."""
        import ray

        self._ray = ray
        self.num_ranks, self.timeout_s = num_ranks, timeout_s
        if resources is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= num_ranks else 0
            resources = cluster.Resources(num_cpus=threads, num_gpus=gpus)
        if resources.threads is None:  # started without the run's budget (the reward model's ranks): on its own
            resources = replace(resources, threads=thread_budget.group_share(threads, num_ranks))
        self.actors, self.placement_group = [], None
        try:
            self.placement_group = cluster.reserve(role, num_ranks, resources, strategy, placement_timeout_s)
            # Rank 0 hosts the rendezvous, at its own node's address: the other ranks may run on other nodes.
            master_addr, master_port = cluster.rendezvous_address(self.placement_group)
            actor_cls = ray.remote(rank_cls)
            self.actors = [actor_cls.options(**resources.options(), **cluster.in_bundle(self.placement_group, rank))
                           .remote(rank, num_ranks, master_addr, master_port, *args) for rank in range(num_ranks)]
            # Actor constructors run asynchronously; wait for all of them so start-up errors surface here.
            self._get([actor.__ray_ready__.remote() for actor in self.actors], "start-up")
        except Exception:
            self.shutdown()  # the ranks that did start would otherwise hold their CPUs/GPUs
            raise

    def _shards(self, batch: dict[str, torch.Tensor] | TrainBatch, rows: int,
                hint: str) -> list[dict[str, torch.Tensor]] | list[TrainBatch]:
        """Contiguous equal row slices of every tensor in ``batch``, one per rank; ``hint`` ends the error."""
        if rows % self.num_ranks:
            raise ValueError(f"batch of {rows} rows does not split evenly across {self.num_ranks} trainer ranks: "
                             f"{hint}")
        parts = row_slices(rows, self.num_ranks)
        if isinstance(batch, TrainBatch):
            return [batch.rows(part) for part in parts]
        return [{k: v[part] for k, v in batch.items()} for part in parts]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self._get([actor.full_state_dict.remote() for actor in self.actors], "full_state_dict")[0]

    def save_pretrained(self, path: str) -> None:
        self._get([actor.save_pretrained.remote(path) for actor in self.actors], "save_pretrained")

    def save_state(self, path: str) -> None:
        self._get([actor.save_state.remote(path) for actor in self.actors], "save_state")

    def load_state(self, path: str) -> None:
        self._get([actor.load_state.remote(path) for actor in self.actors], "load_state")

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        cluster.release(self.placement_group)
        self.placement_group = None

    def _get(self, refs: list, what: str, first_rank: int = 0) -> list:
        """Results of one call per rank (``refs[i]`` from rank first_rank + i); a rank that died raises a one-line
        WorkerDiedError naming it, a stuck one a TimeoutError (rlhf.worker_pool.get_all)."""
        return get_all(refs, [f"trainer rank {first_rank + i}" for i in range(len(refs))], f"trainer {what}",
                       self.timeout_s)
