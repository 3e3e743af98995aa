"""Preference optimisation (DPO, IPO, SimPO) on the project's DeepSpeed ranks, one Ray actor per rank.

The same core as the policy trainer (``DeepSpeedRank`` / ``RankGroup``): one ``train_step`` is one optimizer
update on one batch of pairs. A batch holds 2P rows, each pair's chosen response then its rejected one
(``collate_preference_pairs``), so every cut into ranks and micro-batches at an even row keeps a pair together;
each part divides its pairs' loss by the whole batch's pair count, so the parts sum to the batch loss however it
is split, and each rank multiplies by world_size to undo DeepSpeed's gradient averaging.

The reference model is the policy's own base weights with the LoRA adapters off when ``model.lora`` is set (no
second copy), a frozen copy otherwise, and none for a reference-free loss (SimPO).
"""
from __future__ import annotations

import time

import torch

from rlhf.core.algorithms.preference_losses import (PREFERENCE_LOSSES, PreferenceInputs, sequence_logprobs,
                                                    with_sft_term)
from rlhf.core.algorithms.tokens import token_logprobs
from rlhf.core.config.run_config import RunConfig
from rlhf.core.data import packing
from rlhf.core.distributed.ranks import DeepSpeedRank, RankGroup
from rlhf.core.models import lora
from rlhf.core.models.safetensors_dir import load_pretrained

ROW_KEYS = ("input_ids", "attention_mask", "response_mask")
# Per-rank sums, all-reduced into whole-batch figures (means divide by pairs).
_SUMMED = ("loss", "correct", "chosen_reward", "rejected_reward", "pairs", "chosen_nll")


def engine_settings(cfg: RunConfig):
    """The trainer section as the preference ranks use it: ``dpo.lr`` (if set) and ``dpo.micro_batch_pairs`` x 2
    rows per forward."""
    update = {"micro_batch_size": 2 * cfg.dpo.micro_batch_pairs}
    if cfg.dpo.lr is not None:
        update["lr"] = cfg.dpo.lr
    return cfg.trainer.model_copy(update=update)


class PreferenceTrainer(DeepSpeedRank):
    """One data-parallel rank: a DeepSpeed engine over the policy, and the reference beside it when the loss needs
    one. Creating it joins the process group, so all ``world_size`` ranks must be created together."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_dir: str,
                 cfg: RunConfig):
        super().__init__(rank, world_size, master_addr, master_port, engine_settings(cfg), cfg.seed,
                         cfg.call_timeout_s)
        from transformers import AutoModelForCausalLM

        self.settings, self.loss = cfg.dpo, PREFERENCE_LOSSES[cfg.dpo.loss]
        self.model_dir = model_dir
        policy = load_pretrained(AutoModelForCausalLM, model_dir, "dpo policy", dtype=torch.float32)
        policy.config.use_cache = False
        if cfg.trainer.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        if cfg.model.lora:
            policy = lora.wrap(policy, cfg.model.lora.model_dump())
        self._wrap(policy)
        self.reference = None
        if self.loss.reference and cfg.model.lora:
            self.reference = lora.AdaptersOff(self.engine.module)
        elif self.loss.reference:
            self.reference = load_pretrained(AutoModelForCausalLM, model_dir, "dpo reference model",
                                             dtype=torch.bfloat16 if self.bf16 else torch.float32)
            self.reference.config.use_cache = False
            self.reference.to(self.device).eval().requires_grad_(False)

    def train_step(self, batch: dict[str, torch.Tensor], total_pairs: int, chosen_tokens: float
                   ) -> dict[str, float]:
        """One optimizer update on this rank's pairs: ``batch`` holds input_ids, attention_mask (2p, L) long,
        response_mask (2p, L) float, chosen then rejected row of each pair, and offset (p,) float. ``total_pairs``,
        ``chosen_tokens`` (response tokens of its chosen rows): the whole batch's, across ranks. Collective. Returns
        whole-batch figures (the same on every rank); ``dpo/loss`` includes the SFT term, ``dpo/chosen_nll`` is
        the chosen responses' mean negative log-likelihood per token."""
        missing = [k for k in ROW_KEYS + ("offset",) if k not in batch]
        if missing:
            raise ValueError(f"preference batch lacks {missing}")
        start, engine = time.perf_counter(), self.engine
        rows = batch["input_ids"].shape[0]
        reference = self._reference_logprobs(batch)
        engine.train()
        width = batch["input_ids"].shape[1]
        # Each token carries its row number into the micro-batches: a packed row holds several sequences.
        tokens = {**{k: batch[k] for k in ROW_KEYS},
                  "row_ids": torch.arange(rows).unsqueeze(1).expand(rows, width)}
        micro_batches = list(self._micro_batches(tokens))
        sums = torch.zeros(len(_SUMMED), dtype=torch.float64)
        for i, (first, mb, _) in enumerate(micro_batches):
            count = min(engine.train_micro_batch_size_per_gpu(), rows - first)
            engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            pairs = slice(first // 2, (first + count) // 2)
            sums += self._micro_step(mb, first, count, reference[first:first + count] if reference is not None
                                     else None, batch["offset"][pairs].to(self.device), total_pairs,
                                     chosen_tokens / total_pairs)
            engine.step()
        total = dict(zip(_SUMMED, self._sum_across_ranks(sums).tolist()))
        pairs = max(total["pairs"], 1.0)
        metrics = {"dpo/loss": total["loss"], "dpo/accuracy": total["correct"] / pairs,
                   "dpo/chosen_reward": total["chosen_reward"] / pairs,
                   "dpo/rejected_reward": total["rejected_reward"] / pairs,
                   "dpo/margin": (total["chosen_reward"] - total["rejected_reward"]) / pairs,
                   "dpo/chosen_nll": total["chosen_nll"] / pairs,
                   "perf/train_s": time.perf_counter() - start}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["dpo/grad_norm"] = float(grad_norm)
        return metrics

    def _micro_step(self, mb: dict, first: int, count: int, reference: torch.Tensor | None, offset: torch.Tensor,
                    total_pairs: int, chosen_length: float) -> torch.Tensor:
        """Forward and backward on rows [first, first + count) (count/2 pairs); returns their ``_SUMMED`` sums.
        ``chosen_length``: the whole batch's mean chosen response tokens, so the SFT term over all pairs is the mean
        NLL over all the batch's chosen tokens (TRL's; a per-pair mean would weigh a terse answer's tokens most)."""
        logits = self.engine(**packing.model_inputs(mb)).logits
        logp = packing.zero_sequence_starts(token_logprobs(logits, mb["input_ids"]), mb)
        sequences, chosen_sum = micro_batch_sequences(logp, mb, first, count, self.loss.length_normalised)
        chosen_per_token = chosen_sum / chosen_length
        inputs = PreferenceInputs(sequences[0::2], sequences[1::2], beta=self.settings.beta,
                                  gamma=self.settings.gamma, offset=offset)
        if reference is not None:
            inputs.ref_chosen, inputs.ref_rejected = reference[0::2].to(self.device), reference[1::2].to(self.device)
        losses = with_sft_term(self.loss.compute(inputs), chosen_per_token, self.settings.sft_weight)
        loss = losses.sum() / total_pairs
        # x world_size: DeepSpeed averages over ranks; scale_wrt_gas=False: the division by total_pairs already
        # accounts for the micro-batches.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        chosen, rejected = inputs.rewards()
        return torch.stack([loss.detach(), (chosen > rejected).float().sum(), chosen.sum(), rejected.sum(),
                            torch.tensor(float(losses.numel()), device=losses.device),
                            -chosen_per_token.detach().sum()]).double().cpu()

    @torch.no_grad()
    def _reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The reference's sequence log-probs of the rows (2p,), or None for a reference-free loss."""
        if self.reference is None:
            return None
        per_token = self._per_token(batch, lambda mb: packing.zero_sequence_starts(
            token_logprobs(self.reference(**packing.model_inputs(mb)).logits, mb["input_ids"]), mb))
        return sequence_logprobs(per_token, batch["response_mask"], average=self.loss.length_normalised)


class PreferenceTrainerGroup(RankGroup):
    """``trainer.num_ranks`` PreferenceTrainer Ray actors forming one data-parallel DeepSpeed group."""

    def __init__(self, model_dir: str, cfg: RunConfig, timeout_s: float):
        super().__init__(PreferenceTrainer, (model_dir, cfg), cfg.trainer.threads, cfg.trainer.num_ranks, timeout_s)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One update on a batch from ``collate_preference_pairs``: its pairs split evenly across the ranks."""
        pairs = batch["offset"].shape[0]
        if pairs % self.num_ranks:
            raise ValueError(f"batch of {pairs} pairs does not split evenly across {self.num_ranks} trainer ranks: "
                             f"make dpo.batch_pairs a multiple of trainer.num_ranks")
        share = pairs // self.num_ranks
        shards = [{**{k: batch[k][2 * r * share:2 * (r + 1) * share] for k in ROW_KEYS},
                   "offset": batch["offset"][r * share:(r + 1) * share]} for r in range(self.num_ranks)]
        chosen_tokens = float(batch["response_mask"][0::2].sum())
        metrics = self._get([actor.train_step.remote(shard, pairs, chosen_tokens)
                             for actor, shard in zip(self.actors, shards)], "preference train_step")
        return {**metrics[0], "perf/train_s": max(m["perf/train_s"] for m in metrics)}


def micro_batch_sequences(logp: torch.Tensor, mb: dict[str, torch.Tensor], first: int, count: int,
                          average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's sequence log-prob, summed or ``average``d, (count,); each chosen row's summed, (count/2,))
    from a micro-batch's per-token log-probs, padded or packed: ``mb`` holds response_mask and row_ids (the batch
    row of each token), its rows starting at batch row ``first``."""
    # Padding slots of a packed micro-batch carry row id 0, which is -first here: clamped (their mask is 0).
    rows = (mb["row_ids"] - first).clamp(min=0)
    sequences = sequence_logprobs(logp, mb["response_mask"], rows, count, average)
    sums = sequence_logprobs(logp, mb["response_mask"], rows, count) if average else sequences
    return sequences, sums[0::2]


def collate_preference_pairs(tokenizer, pairs: list[dict], max_length: int, margin_weight: float = 0.0
                             ) -> dict[str, torch.Tensor]:
    """A batch from pairs {prompt, chosen, rejected, optional margin}: rows prompt + response + EOS (as the rollout
    and the warm-up tokenise them), each pair's chosen row then its rejected row, right-padded; response_mask 1 on
    the response tokens and EOS; offset = margin_weight x margin (0 where a pair has none). A row longer than
    ``max_length`` loses the start of its prompt: the response is what the loss is about."""
    rows, masks = [], []
    for pair in pairs:
        prompt = tokenizer(pair["prompt"], add_special_tokens=False).input_ids
        for side in ("chosen", "rejected"):
            response = tokenizer(pair[side], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids, mask = (prompt + response)[-max_length:], ([0] * len(prompt) + [1] * len(response))[-max_length:]
            rows.append(ids)
            masks.append(mask)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {"input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "response_mask": torch.zeros((len(rows), width))}
    for i, (ids, mask) in enumerate(zip(rows, masks)):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, :len(ids)] = 1
        batch["response_mask"][i, :len(ids)] = torch.tensor(mask, dtype=torch.float)
    batch["offset"] = torch.tensor([margin_weight * float(p.get("margin") or 0.0) for p in pairs])
    return batch
