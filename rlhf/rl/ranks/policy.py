"""The policy trainer: one DeepSpeed (ZeRO-2/3) data-parallel rank per Ray actor, and the group that drives them.

One call to ``train_step`` is the update on one rollout batch: one optimizer step per mini-batch (and epoch).
The driver builds the batch (a ``TrainBatch``, rlhf/core/data/batch.py, which states its fields) with loss weights
from ``loss_token_weights`` over each mini-batch, so a mini-batch's loss is sum(w * per_token_loss) however its rows
are split across ranks and micro-batches; each rank scales its share so that DeepSpeed's gradient averaging yields
exactly that mini-batch gradient.

``PolicyTrainer`` is a plain class (usable in-process, one per process, e.g. under torchrun or in a test);
``TrainerGroup`` wraps it with ``ray.remote`` and starts one actor per rank. Their engine set-up, weight gathering,
checkpointing and Ray group mechanics live in ``DeepSpeedRank`` and ``RankGroup`` (rlhf/core/distributed/ranks.py).
"""
from __future__ import annotations

import time

import torch

from rlhf.core.algorithms.kl import kl_penalty
from rlhf.core.algorithms.policy_losses import (POLICY_LOSSES, PolicyLossInputs, off_policy_weights,
                                               policy_token_loss)
from rlhf.core.algorithms.tokens import token_logprobs

from rlhf.core.models import lora, precision
from rlhf.core.models.response_head import response_entropy, response_logits, response_logprobs
from rlhf.core.models.safetensors_dir import load_pretrained

from rlhf.core.data import packing
from rlhf.core.data.batch import TrainBatch, without_zero_advantage_rows
from rlhf.core.config.run_config import AlgorithmConfig, RunConfig
from rlhf.core.distributed.ranks import DeepSpeedRank, RankGroup
from rlhf.core.distributed.weight_sync import WeightBroadcaster


# With asynchronous rollout the trainer ranks update while the rollout workers generate, and where they share CPU
# cores the ranks run at this much lower priority. Generation runs on fewer threads than the update (one, on the
# 2-core quickstart), so at equal priority the scheduler slows both alike, the update finishes first and a core
# idles while generation ends alone. Yielding to generation keeps it at full speed, and the update takes the rest
# of the cores, then all of them once generation is done (benchmarks/RESULTS.md, async_vs_sync). It only orders
# our own processes; on machines where trainer and rollout have their own cores or GPUs it changes nothing.
ASYNC_TRAINER_NICENESS = 5


def kl_in_loss(algorithm: AlgorithmConfig) -> bool:
    """Whether the policy loss carries a KL term: a reference model is loaded (kl_coef > 0) and the KL does not go
    into the reward instead (``algorithm.reward_kl``)."""
    return algorithm.kl_coef > 0 and not algorithm.reward_kl


# Per-rank sums, all-reduced across ranks before they become whole-batch metrics (means divide by response_tokens).
_SUMMED = ("policy_loss", "kl", "clipped", "entropy", "mismatch", "tis_weight", "tis_capped", "response_tokens")



class PolicyTrainer(WeightBroadcaster, DeepSpeedRank):
    """One data-parallel rank: a DeepSpeed engine over the policy, plus a frozen reference model when kl_coef > 0.
    Creating it joins the process group, so all ``world_size`` ranks must be created together."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_dir: str,
                 cfg: RunConfig):
        super().__init__(rank, world_size, master_addr, master_port, cfg.trainer, cfg.seed, cfg.call_timeout_s,
                         ASYNC_TRAINER_NICENESS if cfg.rollout.asynchronous else 0)
        from transformers import AutoModelForCausalLM

        self.algorithm = cfg.algorithm
        self.policy_loss = POLICY_LOSSES[cfg.algorithm.policy_loss]
        # The sampling temperature: log-probs are taken from logits / temperature on both sides, so the ratio and
        # the mismatch metric compare the same distribution.
        self.temperature = cfg.rollout.temperature

        self.model_dir = model_dir
        policy = load_pretrained(AutoModelForCausalLM, model_dir, "policy", dtype=torch.float32)
        policy.config.use_cache = False
        if cfg.trainer.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        lora_settings = cfg.model.lora.model_dump() if cfg.model.lora else None
        if lora_settings:  # only the adapters train (rlhf/core/models/lora.py)
            policy = lora.wrap(policy, lora_settings)
        self._wrap(policy)
        # CPU mixed precision (trainer.precision): the weights stay float32, forwards run under bf16 autocast.
        self.precision = precision.resolve_precision(cfg.trainer.precision, precision.cpu_flags(),
                                                     torch.cuda.is_available())
        self.params, self.lora = precision.model_params(policy), bool(lora_settings)
        self.head_params = precision.head_params(policy)  # counted at response tokens only (_update_flops)
        if self.lora and self.precision == "bf16":  # autocast makes peft's casts of adapter inputs redundant
            lora.cast_inputs(policy, False)
        self.gemm_rate: float | None = None  # FLOP/s in self.precision, measured at the first update

        self.reference = _reference_model(cfg, model_dir, self.engine.module, self.bf16, self.device)
        # A vLLM engine on this GPU wakes its KV cache after each sync: the trainer's state goes to host memory
        # until the next update (rlhf/core/distributed/colocate.py).
        self.colocated = cfg.rollout.sleep_between_rollouts
        self.release_gpu()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The object-store sync's weights; colocated, the GPU is then released for the rollout."""
        try:
            return super().full_state_dict()
        finally:
            self.release_gpu()

    def train_step(self, batch: TrainBatch | list[TrainBatch]) -> dict[str, float]:
        """The update on one rollout batch: one optimizer step per mini-batch, ``epochs`` passes over them.
        Collective: every rank must call it, each with a shard of the same number of rows per mini-batch (under
        ZeRO-3 each forward gathers parameters from all ranks).

        ``batch``: one mini-batch, or a list of them in the order they are stepped on, its loss weights summing
        that mini-batch's loss. Returns whole-batch metrics (the same on all ranks): per-rank sums are all-reduced
        before they are turned into means over every optimizer step.
        """
        mini_batches = [batch] if isinstance(batch, TrainBatch) else list(batch)
        self.reclaim_gpu()  # colocated: the state went to host memory for the rollout
        algorithm, engine = self.algorithm, self.engine
        start = time.perf_counter()
        updates = len(mini_batches) * algorithm.ppo_epochs
        # The PPO ratio's denominator (and TIS's numerator): log-probs under the weights before this batch's first
        # update. With one update they are the update's own log-probs, detached; with several, the later updates
        # need them after the weights have moved, so they are computed first, in one pass without gradients.
        if updates > 1:
            mini_batches = [mb.with_(old_logprobs=self._logprobs({**mb.inputs(), "response_mask": mb.response_mask}))
                            for mb in mini_batches]
        engine.train()
        lr = engine.get_lr()[0]  # of this batch's first update (lr_warmup_steps moves it between updates)
        sums = torch.zeros(len(_SUMMED), dtype=torch.float64)
        skipped_before = engine.skipped_steps
        grad_norms = []
        for _ in range(algorithm.ppo_epochs):
            for mb in mini_batches:
                sums += self._optimizer_step(mb)
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    grad_norms.append(float(grad_norm))

        total = dict(zip(_SUMMED, self._sum_across_ranks(sums).tolist()))
        metrics = _update_metrics(total, updates, lr, time.perf_counter() - start, bool(algorithm.tis_cap),
                                  self.reference is not None, grad_norms)
        # DeepSpeed checks the global gradient norm before each optimizer step and skips the step (same decision
        # on every rank) when it is NaN or infinite; the driver's guard counts it (rlhf/core/guards.py).
        metrics["faults/update_skipped"] = float(engine.skipped_steps > skipped_before)
        if self.device.type == "cpu":
            metrics.update(self._mfu(mini_batches, updates > 1, metrics["perf/train_s"]))
        return metrics

    def _mfu(self, mini_batches: list[TrainBatch], old_logprobs_pass: bool, seconds: float) -> dict:
        """This rank's update MFU against the GEMM rate of the precision it trains in, on its own threads."""
        epochs = self.algorithm.ppo_epochs
        flops = _update_flops(mini_batches, self.params, self.head_params, self.lora,
                              epochs, epochs * (self.reference is not None) + old_logprobs_pass)
        if self.gemm_rate is None:
            self.gemm_rate = precision.gemm_rate(self.precision)
        return precision.mfu_metrics(flops, seconds, self.precision, self.gemm_rate)

    @torch.no_grad()
    def _logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The current policy's token log-probs (at the sampling temperature) over ``batch``, (B, L) on the CPU."""
        self.engine.eval()
        return self._token_logprobs(self.engine, batch)

    def _token_logprobs(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``model``'s token log-probs (at the sampling temperature) over ``batch``'s rows, (B, L) on the CPU."""

        def logprobs(mb):
            with precision.autocast(self.precision):
                return packing.zero_sequence_starts(_logprobs_at(model, mb, self.temperature), mb)

        return self._per_token(batch, logprobs)

    def _optimizer_step(self, batch: TrainBatch) -> torch.Tensor:
        """Forward and backward over one mini-batch's micro-batches, then one optimizer step; returns its sums."""
        engine = self.engine
        sums = torch.zeros(len(_SUMMED), dtype=torch.float64)
        if self.policy_loss.sequence_level or (self.algorithm.tis_cap and self.algorithm.is_level != "token"):
            # Each token carries its row number into the micro-batches: a packed row holds several sequences.
            rows, width = batch.input_ids.shape
            batch = batch.with_(sequence_ids=torch.arange(rows).unsqueeze(1).expand(rows, width))
        micro_batches = list(self._micro_batches(batch))
        for i, (_, mb, _) in enumerate(micro_batches):
            # Only the last micro-batch triggers the optimizer step, however many there are in this mini-batch.
            engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            sums += self._micro_step(mb)
            engine.step()
        return sums

    def _micro_step(self, mb: TrainBatch) -> torch.Tensor:
        """Forward and backward on one micro-batch; returns its contribution to the ``_SUMMED`` sums."""
        a = self.algorithm
        mask = mb.response_mask
        with precision.autocast(self.precision):
            logits = response_logits(self.engine, packing.model_inputs(mb), mask)
        logits = logits / self.temperature
        logp = packing.zero_sequence_starts(response_logprobs(logits, mb.input_ids, mask), mb)
        # Without precomputed old log-probs this is the batch's only update: the old policy is the current one and
        # the ratio starts at exactly 1.
        old_logp = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
        pg, clipped = self.policy_loss.compute(PolicyLossInputs(
            logp, old_logp, mb.advantages, mask, a.clip_low, a.clip_high, a.dual_clip, mb.sequence_ids))
        tis, corrected = torch.ones_like(logp), torch.zeros_like(logp)
        if a.tis_cap:
            tis, corrected = off_policy_weights(old_logp, mb.rollout_logprobs, mask, a.tis_cap, a.is_level,
                                                a.is_mode, a.is_floor, mb.sequence_ids)
            pg = pg * tis
        kl = torch.zeros_like(logp)
        if self.reference is not None:
            with torch.no_grad():
                with precision.autocast(self.precision):
                    ref_logits = response_logits(self.reference, packing.model_inputs(mb), mask)
                ref_logits = ref_logits / self.temperature
                ref_logp = packing.zero_sequence_starts(response_logprobs(ref_logits, mb.input_ids, mask), mb)
                del ref_logits
            kl = kl_penalty(logp, ref_logp, a.kl_estimator)
        if a.entropy_coef:
            # In the graph only for the bonus: its backward keeps a float softmax of the logits alive.
            entropy = response_entropy(logits, mask)
        else:
            with torch.no_grad():
                entropy = response_entropy(logits.detach(), mask)
        entropy = packing.zero_sequence_starts(entropy, mb)
        per_token = policy_token_loss(pg, entropy, kl, a.entropy_coef,
                                      a.kl_coef if kl_in_loss(a) else 0.0)
        loss = (per_token * mb.loss_weights).sum()
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
                ((old_logp - mb.rollout_logprobs).abs() * mask).sum(),
                (tis * mask).sum(),
                (corrected * mask).sum(),
                mask.sum(),
            ]).double().cpu()

    def policy_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The current policy's log-probs (B, L) of this rank's rows (input_ids, attention_mask), in eval mode:
        what the update's ratio starts from, and what the KL in the reward and the distillation term are built from
        (the sampler's differ wherever sampler and trainer do: bf16 or vLLM rollout, asynchronous steps)."""
        self.reclaim_gpu()  # colocated: the engine's state went to host memory for the rollout
        return self._logprobs(batch)

    @torch.no_grad()
    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference model's log-probs (B, L) of this rank's rows (input_ids, attention_mask), aligned as
        ``token_logprobs``; for a KL penalty in the reward, which is needed before the update."""
        if self.reference is None:
            raise RuntimeError("no reference model on this rank: it is loaded only when kl_coef > 0")
        self.reclaim_gpu()  # with LoRA the reference is the engine's own model
        return self._token_logprobs(self.reference, batch)



def _logprobs_at(model, mb: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """``model``'s token log-probs at ``temperature`` over a micro-batch; with a response mask only the response's
    (the head runs only there, rlhf/core/models/response_head.py), 0 elsewhere."""
    if "response_mask" in mb:
        logits = response_logits(model, packing.model_inputs(mb), mb["response_mask"])
        return response_logprobs(logits / temperature, mb["input_ids"], mb["response_mask"])
    return token_logprobs(model(**packing.model_inputs(mb)).logits.float() / temperature, mb["input_ids"])


def _update_flops(mini_batches: list[TrainBatch], params: int, head: int, lora: bool, epochs: int,
                  forwards: int) -> float:
    """Model FLOPs of an update: the body over every token, the output head only over the response tokens (where
    it runs), ``epochs`` trained passes and ``forwards`` without gradient (reference, old log-probs)."""
    tokens = sum(int(mb.attention_mask.sum()) for mb in mini_batches)
    response = sum(int(mb.response_mask.sum()) for mb in mini_batches)
    return (precision.update_flops(params - head, tokens * epochs, lora, tokens * forwards)
            + precision.update_flops(head, response * epochs, lora, response * forwards))


def _reference_model(cfg: RunConfig, model_dir: str, policy, bf16: bool, device):
    """The frozen reference the KL is taken against when kl_coef > 0 (None otherwise): with LoRA the policy itself
    with its adapters off (no second copy), else the starting policy loaded again."""
    from transformers import AutoModelForCausalLM

    if cfg.algorithm.kl_coef <= 0:
        return None
    if cfg.model.lora:
        return lora.AdaptersOff(policy)
    reference = load_pretrained(AutoModelForCausalLM, model_dir, "reference model",
                                dtype=torch.bfloat16 if bf16 else torch.float32)
    reference.config.use_cache = False
    return reference.to(device).eval().requires_grad_(False)


def _update_metrics(total: dict[str, float], updates: int, lr: float, train_s: float, tis: bool, kl: bool,
                    grad_norms: list[float]) -> dict[str, float]:
    """Whole-batch figures from the ranks' summed ``_SUMMED`` values: means over response tokens, the policy loss
    averaged over the optimizer steps (each mini-batch's loss is already a mean)."""
    tokens = max(total["response_tokens"], 1.0)
    metrics = {
        "losses/policy_loss": total["policy_loss"] / updates,
        "losses/clipfrac": total["clipped"] / tokens,
        "losses/entropy": total["entropy"] / tokens,
        "perf/logprob_mismatch": total["mismatch"] / tokens,
        "perf/optimizer_steps": float(updates),
        "charts/lr": float(lr),
        "perf/train_s": train_s,
    }
    if tis:
        metrics["losses/tis_weight"] = total["tis_weight"] / tokens
        metrics["losses/tis_capped"] = total["tis_capped"] / tokens
    if kl:
        metrics["losses/kl"] = total["kl"] / tokens
    if grad_norms:
        metrics["losses/grad_norm"] = sum(grad_norms) / len(grad_norms)
    return metrics


class TrainerGroup(RankGroup):
    """``num_ranks`` PolicyTrainer Ray actors forming one data-parallel DeepSpeed group."""

    def __init__(self, model_dir: str, cfg: RunConfig, num_ranks: int, timeout_s: float, **placement):
        """``placement``: RankGroup's resources, strategy and placement_timeout_s."""
        super().__init__(PolicyTrainer, (model_dir, cfg), cfg.trainer.threads, num_ranks, timeout_s, **placement)
        self.mini_batches = cfg.trainer.mini_batches_per_step
        # With neither an entropy bonus nor a KL term in the loss, a row whose advantage is 0 everywhere adds exactly
        # 0 to the gradient, so train_step leaves such rows out (batch.without_zero_advantage_rows).
        self.skip_zero_advantage_rows = not cfg.algorithm.entropy_coef and not kl_in_loss(cfg.algorithm)

    def train_step(self, batch: TrainBatch, mini_batches: int | None = None) -> dict[str, float]:
        """The update on one rollout batch: its rows split into ``mini_batches`` (default: the config's) contiguous
        equal parts, one optimizer step each (the batch's loss weights must sum each part's loss, as
        ``make_train_batch(..., mini_batches)`` makes them), each part split evenly across the ranks.

        Rows that add nothing to the gradient (see ``skip_zero_advantage_rows``) are left out of each part, so the
        update is the same and the per-token means in the metrics (entropy, clip fraction, mismatch) are over the
        rows trained on; ``perf/skipped_rows`` counts the others."""
        mini_batches = mini_batches or self.mini_batches
        rows = batch.input_ids.shape[0]
        if rows % mini_batches:
            raise ValueError(f"batch of {rows} rows does not split into {mini_batches} equal mini-batches")
        size = rows // mini_batches
        hint = f"make rollout rows per step a multiple of mini-batches x {self.num_ranks} ranks"
        per_rank: list[list[TrainBatch]] = [[] for _ in self.actors]
        trained = 0
        for first in range(0, rows, size):
            part = batch.rows(slice(first, first + size))
            if self.skip_zero_advantage_rows and size % self.num_ranks == 0:  # an uneven part is refused below
                part = without_zero_advantage_rows(part, self.num_ranks)
            part_rows = part.input_ids.shape[0]
            trained += part_rows
            for shards, shard in zip(per_rank, self._shards(part, part_rows, hint)):
                shards.append(shard)
        refs = [actor.train_step.remote(shards) for actor, shards in zip(self.actors, per_rank)]
        metrics = self._get(refs, "train_step")
        # Each rank already all-reduced the sums, so loss and means are whole-batch figures on every rank;
        # only the time differs, and the step takes as long as its slowest rank.
        return {**metrics[0], "perf/train_s": max(m["perf/train_s"] for m in metrics),
                "perf/skipped_rows": float(rows - trained)}

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """The reference model's token log-probs (B, L) of the batch's rows, computed on the ranks that hold it."""
        return self._rank_logprobs("reference_logprobs", batch)

    def policy_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """The current policy's token log-probs (B, L) of the batch's rows (``PolicyTrainer.policy_logprobs``)."""
        return self._rank_logprobs("policy_logprobs", batch)

    def _rank_logprobs(self, method: str, batch: TrainBatch) -> torch.Tensor:
        shards = self._shards(batch.inputs(), batch.input_ids.shape[0],
                              f"make rollout rows per step a multiple of {self.num_ranks}")
        parts = self._get([getattr(actor, method).remote(shard) for actor, shard in zip(self.actors, shards)],
                          method)
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

