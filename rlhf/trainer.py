"""The policy trainer: one DeepSpeed (ZeRO-2/3) data-parallel rank per Ray actor, and the group that drives them.

One call to ``train_step`` is the update on one rollout batch: one optimizer step per mini-batch (and epoch).
The driver builds the batch (see ``PolicyTrainer.train_step`` for its fields) with loss weights from
``algorithms.loss_token_weights`` over each mini-batch, so a mini-batch's loss is sum(w * per_token_loss) however
its rows are split across ranks and micro-batches; each rank scales its share so that DeepSpeed's gradient
averaging yields exactly that mini-batch gradient.

``PolicyTrainer`` is a plain class (usable in-process, one per process, e.g. under torchrun or in a test);
``TrainerGroup`` wraps it with ``ray.remote`` and starts one actor per rank. Their engine set-up, weight gathering,
checkpointing and Ray group mechanics live in ``DeepSpeedRank`` and ``RankGroup``, which the reward-model trainer
(reward/rm_trainer.py) shares.
"""
from __future__ import annotations

import importlib
import os
import shutil
import time
from datetime import timedelta

import torch

from rlhf import algorithms, cluster, packing
from rlhf.batch import without_zero_advantage_rows
from rlhf.checkpoint import atomic_dir

# The DeepSpeed engine's settings, shared by every trainer built on ``DeepSpeedRank`` (policy, reward model).
ENGINE_DEFAULTS = {
    "zero_stage": 2,
    "lr": 1e-6,
    "lr_warmup_steps": 0,  # linear warm-up from 0 to lr over this many optimizer steps
    "weight_decay": 0.0,
    "adam_eps": 1e-8,
    "max_grad_norm": 1.0,
    "micro_batch_size": 1,
    "bf16": False,
    "threads": 1,
    "seed": 0,
    "timeout_s": 600.0,
    # Recompute activations in the backward pass instead of keeping them (GPU memory for long responses).
    "gradient_checkpointing": False,
    # Extra keys for DeepSpeed's "zero_optimization" section (offload, bucket sizes, persistence threshold, ...).
    "zero_options": {},
    # Added to the rank process's CPU niceness at start (0: unchanged). The driver sets it for asynchronous rollout,
    # where generation and the update run at once (see driver.ASYNC_TRAINER_NICENESS).
    "niceness": 0,
}

DEFAULTS = {
    **ENGINE_DEFAULTS,
    "clip_low": 0.2,
    "clip_high": 0.2,
    "kl_coef": 0.0,
    "kl_estimator": "k3",
    # PPO's KL in the reward: the reference model is loaded (kl_coef > 0) for ``reference_logprobs`` and the KL is
    # logged, but it is not added to the loss again.
    "kl_in_reward": False,
    # Entropy bonus: loss_t = pg_t - entropy_coef * H_t + kl_coef * KL_t (algorithms.policy_token_loss).
    "entropy_coef": 0.0,
    # Rollout's sampling temperature: log-probs are taken from logits / temperature on both sides, so the ratio and
    # the mismatch metric compare the same distribution.
    "temperature": 1.0,
    # Mini-batches a rollout batch splits into (TrainerGroup.train_step), and passes over them: one optimizer step
    # per mini-batch and pass.
    "mini_batches": 1,
    "epochs": 1,
    # Truncated importance sampling cap (algorithms.truncated_importance_weights); None: off.
    "tis_cap": None,
}

def kl_in_loss(cfg: dict) -> bool:
    """Whether the policy loss carries a KL term: a reference model is loaded (kl_coef > 0) and the KL is not put in
    the reward instead (PPO's kl_in_reward)."""
    return cfg["kl_coef"] > 0 and not cfg["kl_in_reward"]


BATCH_KEYS = ("input_ids", "attention_mask", "response_mask", "rollout_logprobs", "advantages", "loss_weights")

# Per-rank sums, all-reduced across ranks before they become whole-batch metrics (means divide by response_tokens).
_SUMMED = ("policy_loss", "kl", "clipped", "entropy", "mismatch", "tis_weight", "tis_capped", "response_tokens")


class DeepSpeedRank:
    """One data-parallel DeepSpeed rank: joins the process group, wraps a model in an engine, gathers and saves it.

    The common core of the trainers (policy here, reward model in reward/rm_trainer.py). Creating one joins the
    process group, so all ``world_size`` ranks must be created together; a subclass then sets ``model_dir`` (the
    source of the side files save_pretrained copies) and calls ``_wrap(model)``.
    """

    # Files in model_dir that save_pretrained must not copy (e.g. a causal LM's generation config beside a reward
    # model).
    _side_files_to_skip: tuple[str, ...] = ()

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, cfg: dict):
        self.cfg = cfg
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
        if cfg["niceness"]:
            os.nice(cfg["niceness"])
        torch.set_num_threads(cfg["threads"])
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                   timeout=timedelta(seconds=cfg["timeout_s"]))
        torch.manual_seed(cfg["seed"])
        self.bf16 = bool(cfg["bf16"]) and cuda

    def _wrap(self, model: torch.nn.Module) -> None:
        """Make ``self.engine`` (AdamW, gradient clipping, ZeRO ``zero_stage``) over ``model``."""
        cfg = self.cfg
        ds_config = {
            # One update per train_step, whatever the batch size: we mark the accumulation boundary ourselves
            # (see train_step), so DeepSpeed's own count is 1 and its train_batch_size is only nominal.
            "train_micro_batch_size_per_gpu": cfg["micro_batch_size"],
            "gradient_accumulation_steps": 1,
            "train_batch_size": cfg["micro_batch_size"] * self.world_size,
            "gradient_clipping": cfg["max_grad_norm"],
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"], "betas": [0.9, 0.999],
                           "eps": cfg["adam_eps"], "torch_adam": True},
            },
            "zero_optimization": {"stage": cfg["zero_stage"], **cfg["zero_options"]},
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        warm = cfg["lr_warmup_steps"]
        # Optimizer step k (from 1) runs at lr * min(1, k / warm). (DeepSpeed's own WarmupLR spends its first two
        # steps at its minimum lr.) DeepSpeed steps the schedule after each optimizer step and checkpoints it.
        schedule = (lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: min(1.0, (done + 1) / warm))) if warm else None
        self.engine, *_ = self._deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                     config=ds_config, lr_scheduler=schedule)
        self.device = self.engine.device

    def _micro_batches(self, batch: dict[str, torch.Tensor]):
        """(first row, micro-batch on the device, RowPacking or None) over ``batch``'s right-padded rows
        (packing.micro_batches): padding-free where the model's attention kernel is known to take packed rows."""
        can_pack = self.engine.module.config._attn_implementation in packing.PACKABLE_ATTENTION
        return packing.micro_batches(batch, self.cfg["micro_batch_size"], self.device, can_pack)

    def _per_token(self, batch: dict[str, torch.Tensor], compute) -> torch.Tensor:
        """``compute(micro-batch)``, a per-token (rows, L) result, over ``batch``'s rows (input_ids,
        attention_mask), back in the batch's padded layout: (B, L) on the CPU, 0 at padding."""
        out = torch.zeros(batch["input_ids"].shape)
        for first, mb, plan in self._micro_batches({k: batch[k] for k in ("input_ids", "attention_mask")}):
            values = compute(mb).float()
            values = plan.unpack(values) if plan is not None else values * mb["attention_mask"]
            out[first:first + values.shape[0], :values.shape[1]] = values.cpu()
        return out

    def _sum_across_ranks(self, sums: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a small CPU tensor of per-rank figures; returns it on the CPU."""
        if torch.distributed.is_initialized() and self.world_size > 1:
            reduced = sums.to(self.device)
            torch.distributed.all_reduce(reduced)
            return reduced.cpu()
        return sums

    # --------------------------------------------------------------------------------------------------- weights

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's full weights (HF names, as ``model.state_dict()`` gives them) as CPU tensors on rank 0;
        None on the others. Collective: under ZeRO-3 every rank must take part in gathering the partitions."""
        module = self.engine.module
        if self.cfg["zero_stage"] == 3:
            # Gathers the whole model on every rank at once: simple, and fine while one full copy fits a device.
            with self._deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return _cpu_copy(module.state_dict()) if self.rank == 0 else None
        return _cpu_copy(module.state_dict()) if self.rank == 0 else None

    def save_pretrained(self, path: str) -> None:
        """Write a Hugging Face checkpoint (safetensors) to ``path`` from rank 0. Collective (see full_state_dict).

        Written into ``path + ".tmp"`` and renamed, so a crash never leaves a half-written checkpoint at ``path``.
        """
        state_dict = self.full_state_dict()
        if self.rank != 0:
            return
        with atomic_dir(path) as tmp:
            self.engine.module.save_pretrained(tmp, state_dict=state_dict)
            # Tokenizer files and the like, so the checkpoint is usable on its own; weights come only from state_dict.
            copy_side_files(self.model_dir, tmp, skip=self._side_files_to_skip)

    # ---------------------------------------------------------------------------------------- resumable state

    def save_state(self, path: str) -> None:
        """This rank's engine state (weights with ZeRO partitions, optimizer, scheduler) in DeepSpeed's checkpoint
        layout under ``path``, and its torch RNG state. Collective: every rank writes its own partition."""
        from rlhf.resume import torch_rng_state

        self.engine.save_checkpoint(path, tag=_DS_TAG, save_latest=False)
        torch.save(torch_rng_state(), os.path.join(path, f"rng_rank{self.rank}.pt"))

    def load_state(self, path: str) -> None:
        """Restore what ``save_state`` wrote (the same number of ranks and ZeRO stage). Collective."""
        from rlhf.resume import load_rng_file, set_torch_rng_state

        loaded, _ = self.engine.load_checkpoint(path, tag=_DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed state for rank {self.rank} in {path}")
        set_torch_rng_state(load_rng_file(os.path.join(path, f"rng_rank{self.rank}.pt")))


# DeepSpeed's checkpoint "tag" (subdirectory) inside a run checkpoint's trainer/ directory.
_DS_TAG = "deepspeed"


class PolicyTrainer(DeepSpeedRank):
    """One data-parallel rank: a DeepSpeed engine over the policy, plus a frozen reference model when kl_coef > 0.

    Creating it joins the process group, so all ``world_size`` ranks must be created together.
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_dir: str, cfg: dict):
        super().__init__(rank, world_size, master_addr, master_port, {**DEFAULTS, **cfg})
        cfg = self.cfg
        from transformers import AutoModelForCausalLM

        self.model_dir = model_dir
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        policy.config.use_cache = False
        if cfg["gradient_checkpointing"]:
            policy.gradient_checkpointing_enable()
        self._wrap(policy)

        self.reference = None
        if cfg["kl_coef"] > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.bfloat16 if self.bf16 else torch.float32, use_safetensors=True)
            self.reference.config.use_cache = False
            self.reference.to(self.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------------ training

    def train_step(self, batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The update on one rollout batch: one optimizer step per mini-batch, ``epochs`` passes over them.
        Collective: every rank must call it, each with a shard of the same number of rows per mini-batch (under
        ZeRO-3 each forward gathers parameters from all ranks).

        ``batch``: one mini-batch, or a list of them in the order they are stepped on; each (CPU tensors, rows
        right-padded) holds input_ids, attention_mask (B, L) long; response_mask, rollout_logprobs, advantages,
        loss_weights (B, L) float, the weights summing that mini-batch's loss. Returns whole-batch metrics (the same
        on all ranks): per-rank sums are all-reduced before they are turned into means over every optimizer step.
        """
        mini_batches = [batch] if isinstance(batch, dict) else list(batch)
        for mb in mini_batches:
            missing = [k for k in BATCH_KEYS if k not in mb]
            if missing:
                raise ValueError(f"batch lacks {missing}")
        cfg, engine = self.cfg, self.engine
        start = time.perf_counter()
        updates = len(mini_batches) * cfg["epochs"]
        # The PPO ratio's denominator (and TIS's numerator): log-probs under the weights before this batch's first
        # update. With one update they are the update's own log-probs, detached; with several, the later updates
        # need them after the weights have moved, so they are computed first, in one pass without gradients.
        if updates > 1:
            mini_batches = [{**mb, "old_logprobs": self._logprobs(mb)} for mb in mini_batches]
        engine.train()
        lr = engine.get_lr()[0]  # of this batch's first update (lr_warmup_steps moves it between updates)
        sums = torch.zeros(len(_SUMMED), dtype=torch.float64)
        skipped_before = engine.skipped_steps
        grad_norms = []
        for _ in range(cfg["epochs"]):
            for mb in mini_batches:
                sums += self._optimizer_step(mb)
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    grad_norms.append(float(grad_norm))

        sums = self._sum_across_ranks(sums)
        total = dict(zip(_SUMMED, sums.tolist()))
        tokens = max(total["response_tokens"], 1.0)
        metrics = {
            "losses/policy_loss": total["policy_loss"] / updates,  # each mini-batch's loss is a mean: average them
            "losses/clipfrac": total["clipped"] / tokens,
            "losses/entropy": total["entropy"] / tokens,
            "perf/logprob_mismatch": total["mismatch"] / tokens,
            "perf/optimizer_steps": float(updates),
            "charts/lr": float(lr),
            "perf/train_s": time.perf_counter() - start,
        }
        if cfg["tis_cap"]:
            metrics["losses/tis_weight"] = total["tis_weight"] / tokens
            metrics["losses/tis_capped"] = total["tis_capped"] / tokens
        if self.reference is not None:
            metrics["losses/kl"] = total["kl"] / tokens
        if grad_norms:
            metrics["losses/grad_norm"] = sum(grad_norms) / len(grad_norms)
        # DeepSpeed checks the global gradient norm before each optimizer step and skips the step (same decision
        # on every rank) when it is NaN or infinite; the driver's guard counts it (rlhf/guards.py).
        metrics["faults/update_skipped"] = float(engine.skipped_steps > skipped_before)
        return metrics

    @torch.no_grad()
    def _logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The current policy's token log-probs (at the sampling temperature) over ``batch``, (B, L) on the CPU."""
        self.engine.eval()
        return self._token_logprobs(self.engine, batch)

    def _token_logprobs(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``model``'s token log-probs (at the sampling temperature) over ``batch``'s rows, (B, L) on the CPU."""

        def logprobs(mb):
            logits = model(**packing.model_inputs(mb)).logits
            return packing.zero_sequence_starts(
                algorithms.token_logprobs(logits / self.cfg["temperature"], mb["input_ids"]), mb)

        return self._per_token(batch, logprobs)

    def _optimizer_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward over one mini-batch's micro-batches, then one optimizer step; returns its sums."""
        engine = self.engine
        sums = torch.zeros(len(_SUMMED), dtype=torch.float64)
        micro_batches = list(self._micro_batches(batch))
        for i, (_, mb, _) in enumerate(micro_batches):
            # Only the last micro-batch triggers the optimizer step, however many there are in this mini-batch.
            engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            sums += self._micro_step(mb)
            engine.step()
        return sums

    def _micro_step(self, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward on one micro-batch; returns its contribution to the ``_SUMMED`` sums."""
        cfg = self.cfg
        mask = mb["response_mask"]
        logits = self.engine(**packing.model_inputs(mb)).logits
        logits = logits / cfg["temperature"]
        logp = packing.zero_sequence_starts(algorithms.token_logprobs(logits, mb["input_ids"]), mb)
        # Without precomputed old log-probs this is the batch's only update: the old policy is the current one and
        # the ratio starts at exactly 1.
        old_logp = mb["old_logprobs"] if "old_logprobs" in mb else logp.detach()
        pg, clipped = algorithms.clipped_policy_loss(logp, old_logp, mb["advantages"], cfg["clip_low"],
                                                     cfg["clip_high"])
        tis = torch.ones_like(logp)
        if cfg["tis_cap"]:
            tis = algorithms.truncated_importance_weights(old_logp, mb["rollout_logprobs"], mask, cfg["tis_cap"])
            pg = pg * tis
        kl = torch.zeros_like(logp)
        if self.reference is not None:
            with torch.no_grad():
                ref_logits = self.reference(**packing.model_inputs(mb)).logits
                ref_logits = ref_logits / cfg["temperature"]
                ref_logp = packing.zero_sequence_starts(algorithms.token_logprobs(ref_logits, mb["input_ids"]), mb)
                del ref_logits
            kl = algorithms.kl_penalty(logp, ref_logp, cfg["kl_estimator"])
        if cfg["entropy_coef"]:
            # In the graph only for the bonus: its backward keeps a float softmax of all logits alive.
            entropy = algorithms.token_entropy(logits)
        else:
            with torch.no_grad():
                # Row by row: a float copy of all logits at once can be as large as the activations (151k vocab).
                entropy = torch.cat([algorithms.token_entropy(row) for row in logits.detach().split(1)])
        entropy = packing.zero_sequence_starts(entropy, mb)
        per_token = algorithms.policy_token_loss(pg, entropy, kl, cfg["entropy_coef"],
                                                 cfg["kl_coef"] if kl_in_loss(cfg) else 0.0)
        loss = (per_token * mb["loss_weights"]).sum()
        # DeepSpeed averages gradients over data-parallel ranks; multiplying by world_size turns that average back
        # into the sum of the ranks' shares, i.e. the gradient of the whole-batch loss. scale_wrt_gas=False: the
        # weights already account for the micro-batch split, so DeepSpeed must not divide by its accumulation count.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

        with torch.no_grad():
            return torch.stack([
                loss.detach(),
                (kl.detach() * mask).sum(),
                (clipped * mask).sum(),
                (entropy.detach() * mask).sum(),
                # Train/inference mismatch: the sampler's log-probs against the trainer's before this batch's update.
                ((old_logp - mb["rollout_logprobs"]).abs() * mask).sum(),
                (tis * mask).sum(),
                ((tis >= cfg["tis_cap"]).float() * mask).sum() if cfg["tis_cap"] else torch.zeros(()),
                mask.sum(),
            ]).double().cpu()

    @torch.no_grad()
    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference model's log-probs (B, L) of this rank's rows (input_ids, attention_mask), aligned as
        ``algorithms.token_logprobs``; for a KL penalty in the reward, which is needed before the update."""
        if self.reference is None:
            raise RuntimeError("no reference model on this rank: it is loaded only when kl_coef > 0")
        return self._token_logprobs(self.reference, batch)


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

    def __init__(self, rank_cls: type, args: tuple, cfg: dict, num_ranks: int, timeout_s: float,
                 resources: cluster.Resources | None = None, strategy: str = "PACK", placement_timeout_s: float = 120.0,
                 role: str = "trainer"):
        """Start ``rank_cls(rank, num_ranks, master_addr, master_port, *args, cfg)`` on each rank, each rank in its
        own bundle of one placement group (``strategy`` decides how the bundles spread over nodes). ``resources``:
        what each rank asks for; by default ``cfg["threads"]`` CPUs and one GPU when the cluster has one per rank."""
        import ray

        self._ray = ray
        self.num_ranks, self.timeout_s = num_ranks, timeout_s
        if resources is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= num_ranks else 0
            resources = cluster.Resources(num_cpus=cfg["threads"], num_gpus=gpus)
        self.actors, self.placement_group = [], None
        try:
            self.placement_group = cluster.reserve(role, num_ranks, resources, strategy, placement_timeout_s)
            # Rank 0 hosts the rendezvous, at its own node's address: the other ranks may run on other nodes.
            master_addr, master_port = cluster.rendezvous_address(self.placement_group)
            actor_cls = ray.remote(rank_cls)
            self.actors = [actor_cls.options(**resources.options(), **cluster.in_bundle(self.placement_group, rank))
                           .remote(rank, num_ranks, master_addr, master_port, *args, cfg) for rank in range(num_ranks)]
            # Actor constructors run asynchronously; wait for all of them so start-up errors surface here.
            self._get([actor.__ray_ready__.remote() for actor in self.actors], "start-up")
        except Exception:
            self.shutdown()  # the ranks that did start would otherwise hold their CPUs/GPUs
            raise

    def _shards(self, batch: dict[str, torch.Tensor], rows: int, hint: str) -> list[dict[str, torch.Tensor]]:
        """Contiguous equal row slices of every tensor in ``batch``, one per rank; ``hint`` ends the error."""
        if rows % self.num_ranks:
            raise ValueError(f"batch of {rows} rows does not split evenly across {self.num_ranks} trainer ranks: "
                             f"{hint}")
        shard = rows // self.num_ranks
        return [{k: v[r * shard:(r + 1) * shard] for k, v in batch.items()} for r in range(self.num_ranks)]

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
        from rlhf.worker_pool import get_all

        return get_all(refs, [f"trainer rank {first_rank + i}" for i in range(len(refs))], f"trainer {what}",
                       self.timeout_s)


class TrainerGroup(RankGroup):
    """``num_ranks`` PolicyTrainer Ray actors forming one data-parallel DeepSpeed group."""

    def __init__(self, model_dir: str, cfg: dict, num_ranks: int, timeout_s: float, **placement):
        """``placement``: RankGroup's resources, strategy and placement_timeout_s."""
        cfg = {**DEFAULTS, **cfg}
        super().__init__(PolicyTrainer, (model_dir,), cfg, num_ranks, timeout_s, **placement)
        self.mini_batches = cfg["mini_batches"]
        # With neither an entropy bonus nor a KL term in the loss, a row whose advantage is 0 everywhere adds exactly
        # 0 to the gradient, so train_step leaves such rows out (batch.without_zero_advantage_rows).
        self.skip_zero_advantage_rows = not cfg["entropy_coef"] and not kl_in_loss(cfg)

    def train_step(self, batch: dict[str, torch.Tensor], mini_batches: int | None = None) -> dict[str, float]:
        """The update on one rollout batch: its rows split into ``mini_batches`` (default: the config's) contiguous
        equal parts, one optimizer step each (the batch's loss weights must sum each part's loss, as
        ``make_train_batch(..., mini_batches)`` makes them), each part split evenly across the ranks.

        Rows that add nothing to the gradient (see ``skip_zero_advantage_rows``) are left out of each part, so the
        update is the same and the per-token means in the metrics (entropy, clip fraction, mismatch) are over the
        rows trained on; ``perf/skipped_rows`` counts the others."""
        mini_batches = mini_batches or self.mini_batches
        rows = batch["input_ids"].shape[0]
        if rows % mini_batches:
            raise ValueError(f"batch of {rows} rows does not split into {mini_batches} equal mini-batches")
        size = rows // mini_batches
        hint = f"make rollout rows per step a multiple of mini-batches x {self.num_ranks} ranks"
        per_rank: list[list[dict[str, torch.Tensor]]] = [[] for _ in self.actors]
        trained = 0
        for first in range(0, rows, size):
            part = {k: v[first:first + size] for k, v in batch.items()}
            if self.skip_zero_advantage_rows and size % self.num_ranks == 0:  # an uneven part is refused below
                part = without_zero_advantage_rows(part, self.num_ranks)
            part_rows = part["input_ids"].shape[0]
            trained += part_rows
            for shards, shard in zip(per_rank, self._shards(part, part_rows, hint)):
                shards.append(shard)
        refs = [actor.train_step.remote(shards) for actor, shards in zip(self.actors, per_rank)]
        metrics = self._get(refs, "train_step")
        # Each rank already all-reduced the sums, so loss and means are whole-batch figures on every rank;
        # only the time differs, and the step takes as long as its slowest rank.
        return {**metrics[0], "perf/train_s": max(m["perf/train_s"] for m in metrics),
                "perf/skipped_rows": float(rows - trained)}

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference model's token log-probs (B, L) of the batch's rows, computed on the ranks that hold it."""
        batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
        shards = self._shards(batch, batch["input_ids"].shape[0],
                              f"make rollout rows per step a multiple of {self.num_ranks}")
        parts = self._get([actor.reference_logprobs.remote(shard) for actor, shard in zip(self.actors, shards)],
                          "reference_logprobs")
        return torch.cat(parts)

    def full_state_dict_ref(self):
        """Like full_state_dict, but returns rank 0's Ray object reference without fetching it, so rollout workers
        can take the weights straight from the object store instead of through the driver."""
        refs = [actor.full_state_dict.remote() for actor in self.actors]
        self._get(refs[1:], "full_state_dict", first_rank=1)  # the other ranks only take part in the gather
        ready, _ = self._ray.wait(refs[:1], timeout=self.timeout_s, fetch_local=False)
        if not ready:
            raise TimeoutError(f"trainer full_state_dict did not finish within {self.timeout_s:.0f} s")
        # Rank 0's answer is ready but not fetched; a ping tells a rank that died from one that answered.
        self._get([self.actors[0].__ray_ready__.remote()], "full_state_dict")
        return refs[0]

