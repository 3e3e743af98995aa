"""Training the distilled reward model on the project's DeepSpeed trainer ranks (ZeRO-2/3, one Ray actor per rank).

The same core as the policy trainer (``rlhf.core.distributed.ranks.DeepSpeedRank`` / ``RankGroup``): one ``train_step`` is one
optimizer update on one batch of preference pairs. The group counts the whole batch's targets (``loss_counts``)
before splitting its rows across ranks, and every part divides by those counts, so the parts' losses sum to the
whole-batch loss however the batch is split; each rank multiplies by world_size to undo DeepSpeed's averaging.

A batch (``collate_pairs`` builds one) holds, for B pairs, right-padded long tensors chosen_input_ids,
chosen_attention_mask, rejected_input_ids, rejected_attention_mask; margin (B,); {chosen,rejected}_{quality,rv,cd}
(B,) with NaN where the teacher gave none; optionally {chosen,rejected}_{rv,cd}_probs (B, 10), NaN rows where absent.
"""
from __future__ import annotations

import math
import time
from dataclasses import fields
from typing import Callable, Iterable

import torch

from reward.model.losses import NUM_SCORES, SIDES, loss_counts, reward_model_loss
from reward.model.distilled import DistilledRewardModel, RewardOutput, encode_pair, is_reward_model_dir, pad_right
from reward.model.pair_packing import pack_pairs, worth_packing
from rlhf.core.models import lora
from rlhf.core.config.run_config import RewardModelConfig
from rlhf.core.distributed.ranks import DeepSpeedRank, RankGroup

TOKEN_KEYS = tuple(f"{side}_{k}" for side in SIDES for k in ("input_ids", "attention_mask"))
TARGET_KEYS = ("margin",) + tuple(f"{side}_{name}" for side in SIDES for name in ("quality", "rv", "cd"))
PROBS_KEYS = tuple(f"{side}_{name}_probs" for side in SIDES for name in ("rv", "cd"))
REWARD_HEADS = ("score", "rv_head", "cd_head")  # DistilledRewardModel's quality, RV and CD heads


class RewardModelTrainer(DeepSpeedRank):
    """One data-parallel rank training a ``DistilledRewardModel``.

    ``init_dir`` is a causal LM (the warm-up student: backbone taken, heads fresh) or a saved reward model (all
    heads restored). With ``cfg.lora`` only LoRA adapters on the backbone and the heads train; the saved model is
    merged (a plain Hugging Face directory), the adapters and heads also in its ``adapter/`` directory. Creating it
    joins the process group, so all ``world_size`` ranks must be created together.
    """

    # A causal LM's generation settings mean nothing beside a reward model.
    _side_files_to_skip = ("generation_config.json",)

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, init_dir: str,
                 cfg: RewardModelConfig, seed: int, timeout_s: float, trained_heads: list[str] | None = None):
        """``trained_heads``: the heads the training data and loss weights teach (quality, rv, cd), saved with the
        model so that evaluation reports correlations only for those; None: not recorded."""
        super().__init__(rank, world_size, master_addr, master_port, cfg, seed, timeout_s)
        self.model_dir = init_dir
        self.loss_weights = {"bt": cfg.bt_weight, "quality": cfg.quality_weight, "rv": cfg.rv_weight,
                             "cd": cfg.cd_weight, "kl": cfg.kl_weight}
        model = load_reward_model(init_dir, seed=seed)
        # Saved with the model, so whoever scores with it later gives it the same kind of input: the pairs'
        # responses carry the reference answer (reward.model.distilled.with_reference) when use_reference is set.
        model.config.reference_in_input = cfg.use_reference
        if trained_heads is not None:
            model.config.trained_heads = list(trained_heads)
        # Packed pairs need a kernel that takes a custom 4D mask (flash-attention does not).
        self._can_pack = model.config._attn_implementation in ("sdpa", "eager")
        self._pad_id = model.config.pad_token_id or 0  # padding is masked out: any id will do
        if cfg.lora:  # adapters on the backbone; the heads train whole, and save_pretrained writes merged weights
            model = lora.wrap(model, cfg.lora.model_dump(), heads=REWARD_HEADS, key="reward_model.lora")
        self._wrap(model)

    def train_step(self, batch: dict[str, torch.Tensor], counts: dict[str, float] | None = None) -> dict[str, float]:
        """One optimizer update on this rank's pairs. Collective: every rank calls it with the same number of pairs.

        ``counts``: the whole batch's ``loss_counts`` (default: this shard's, right for a single rank). Returns
        whole-batch metrics (the same on all ranks): the parts' shares are all-reduced.
        """
        missing = [k for k in TOKEN_KEYS + TARGET_KEYS if k not in batch]
        if missing:
            raise ValueError(f"reward-model batch lacks {missing}")
        counts = loss_counts(batch) if counts is None else counts
        size, engine = self.engine_cfg.micro_batch_size, self.engine
        start = time.perf_counter()
        engine.train()
        pairs = batch["margin"].shape[0]
        starts = list(range(0, pairs, size))
        sums: dict[str, float] = {}
        for i, first in enumerate(starts):
            mb = {k: v[first:first + size] for k, v in batch.items()}
            out_chosen, out_rejected = self._forward_pairs(mb)
            loss, metrics = reward_model_loss(out_chosen, out_rejected, mb, self.loss_weights, counts)
            # Only the last micro-batch triggers the optimizer step, however many there are in this call.
            engine.set_gradient_accumulation_boundary(i == len(starts) - 1)
            # DeepSpeed averages gradients over ranks; x world_size turns that into the sum of the ranks' shares,
            # each already divided by whole-batch counts. scale_wrt_gas=False: the counts account for micro-batches.
            engine.backward(loss * self.world_size, scale_wrt_gas=False)
            engine.step()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value

        names = sorted(sums)
        reduced = self._sum_across_ranks(torch.tensor([sums[n] for n in names], dtype=torch.float64))
        metrics = dict(zip(names, reduced.tolist()))
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["rm/grad_norm"] = float(grad_norm)
        metrics["perf/train_s"] = time.perf_counter() - start
        return metrics

    def _forward_pairs(self, mb: dict[str, torch.Tensor]) -> tuple[RewardOutput, RewardOutput]:
        """Chosen and rejected rows in one forward (one parameter gather under ZeRO-3), split afterwards; packed
        so that their shared prefix is computed once where that saves enough (``reward.model.pair_packing``)."""
        ids = [mb["chosen_input_ids"], mb["rejected_input_ids"]]
        masks = [mb["chosen_attention_mask"], mb["rejected_attention_mask"]]
        chosen, rejected = ([row[m.bool()].tolist() for row, m in zip(t, mask)] for t, mask in zip(ids, masks))
        rows = len(chosen)
        if self._can_pack and worth_packing(chosen, rejected):
            packed = {k: v.to(self.device) for k, v in pack_pairs(chosen, rejected, self._pad_id).items()}
            out = self.engine(**packed)
        else:
            input_ids, mask = pad_right(chosen + rejected, self._pad_id)
            out = self.engine(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
        return (RewardOutput(**{f.name: getattr(out, f.name)[:rows] for f in fields(out)}),
                RewardOutput(**{f.name: getattr(out, f.name)[rows:] for f in fields(out)}))


def load_reward_model(init_dir: str, seed: int = 0) -> DistilledRewardModel:
    """A saved reward model as it is, or a fresh one on a causal LM's backbone (pad id from its tokenizer)."""
    if is_reward_model_dir(init_dir):
        model = DistilledRewardModel.from_pretrained(init_dir, dtype=torch.float32, use_safetensors=True)
    else:
        model = DistilledRewardModel.from_causal_lm(init_dir, pad_token_id=_tokenizer_pad_id(init_dir), seed=seed)
    model.config.use_cache = False
    return model


def _tokenizer_pad_id(model_dir: str) -> int | None:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None  # no tokenizer saved beside the model: the config's own pad id (if any) stands
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------------- the group


class RewardModelTrainerGroup(RankGroup):
    """``num_ranks`` RewardModelTrainer Ray actors forming one data-parallel DeepSpeed group."""

    def __init__(self, init_dir: str, cfg: RewardModelConfig, num_ranks: int, timeout_s: float, seed: int = 0,
                 trained_heads: list[str] | None = None):
        """``cfg``: the reward_model section; its micro_batch_size is the pairs per forward on one rank."""
        super().__init__(RewardModelTrainer, (init_dir, cfg, seed, timeout_s, trained_heads), cfg.threads, num_ranks,
                         timeout_s)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        counts = loss_counts(batch)  # of the whole batch, before it is split
        shards = self._shards(batch, batch["margin"].shape[0],
                              f"make the reward-model batch size (pairs) a multiple of {self.num_ranks}")
        metrics = self._get([actor.train_step.remote(shard, counts) for actor, shard in zip(self.actors, shards)],
                            "reward-model train_step")
        # Every rank holds the same whole-batch figures; the step takes as long as its slowest rank.
        return {**metrics[0], "perf/train_s": max(m["perf/train_s"] for m in metrics)}


def train_reward_model(batches: Iterable[dict[str, torch.Tensor]], init_dir: str, cfg: RewardModelConfig,
                       num_ranks: int, out_dir: str, log: Callable[[dict], None] | None = None, epochs: int = 1,
                       timeout_s: float = 600.0, seed: int = 0,
                       trained_heads: list[str] | None = None) -> list[dict[str, float]]:
    """Train for ``epochs`` passes over ``batches`` (pre-tokenised, e.g. from ``collate_pairs``; re-iterated each
    epoch), save the model (and the tokenizer files of ``init_dir``) to ``out_dir``, return each step's metrics.
    ``log`` receives each step's metrics with ``rm/epoch`` and ``rm/step`` added."""
    batches = list(batches)
    if not batches:
        raise ValueError("no reward-model training batches")
    group = RewardModelTrainerGroup(init_dir, cfg, num_ranks, timeout_s, seed, trained_heads)
    history = []
    try:
        for epoch in range(epochs):
            for batch in batches:
                metrics = {**group.train_step(batch), "rm/epoch": float(epoch), "rm/step": float(len(history) + 1)}
                history.append(metrics)
                if log is not None:
                    log(metrics)
        group.save_pretrained(out_dir)
    finally:
        group.shutdown()
    return history


# ---------------------------------------------------------------------------------------------------- batches


def collate_pairs(tokenizer, rows: list[dict], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """A training batch from rows of {prompt, chosen, rejected, margin, chosen_quality, rejected_quality,
    chosen_rv, rejected_rv, chosen_cd, rejected_cd, optional {side}_{rv,cd}_probs} (``reward.model.labelling`` pairs).

    Missing or None values become NaN (margin: 0); a probs tensor is included when any row has that soft label.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {}
    for side in SIDES:
        encoded = [encode_pair(tokenizer, row["prompt"], row[side], max_length) for row in rows]
        batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = pad_right(encoded, pad_id)
    batch["margin"] = torch.tensor([_number(row.get("margin"), 0.0) for row in rows])
    for key in TARGET_KEYS[1:]:
        # Teacher quality is on the 0-9 scale; the quality head regresses onto 0-1 so that its regression pull and
        # the Bradley-Terry margin (also a 0-1 difference) act on the same scale. RV and CD heads keep 0-9.
        scale = 1.0 / 9.0 if key.endswith("_quality") else 1.0
        batch[key] = torch.tensor([_number(row.get(key)) * scale for row in rows])
    for key in PROBS_KEYS:
        if any(row.get(key) is not None for row in rows):
            batch[key] = torch.tensor([_probs(row.get(key)) for row in rows])
    return batch


def _number(value, missing: float = math.nan) -> float:
    return missing if value is None else float(value)


def _probs(value) -> list[float]:
    if value is None:
        return [math.nan] * NUM_SCORES
    if len(value) != NUM_SCORES:
        raise ValueError(f"a soft label needs {NUM_SCORES} probabilities (scores 0..9), got {len(value)}")
    return [float(p) for p in value]
