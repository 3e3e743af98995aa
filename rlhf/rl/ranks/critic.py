"""The critic for PPO: a Qwen value model on DeepSpeed data-parallel ranks (ZeRO-2/3, one Ray actor per rank).

The value model is ``AutoModelForTokenClassification`` with one label: the policy's backbone with a scalar head
on every position, so it saves and loads as a plain Hugging Face checkpoint (safetensors). It starts from the
warm-up student's backbone (head fresh) or from a saved value model. With ``critic.lora`` only LoRA adapters on the
backbone and the head train (rlhf/core/models/lora.py); checkpoints then hold those alone.

Values are aligned as ``token_logprobs`` is: position t holds V(state before token t), read from the
head at position t - 1, so ``values[:, t]`` and the log-prob of token t describe the same decision.

``CriticTrainer`` is one rank (a ``DeepSpeedRank``, like the policy and reward-model trainers); ``CriticGroup``
starts ``num_ranks`` of them as Ray actors. One ``train_step`` is one optimizer update of the clipped value loss
(``clipped_value_loss``) towards the GAE returns; its loss weights come with the batch, computed over
the whole batch (``loss_token_weights``), so the update is the same however the rows are split.
"""
from __future__ import annotations

import time

import torch

from rlhf.core.algorithms.aggregation import loss_token_weights
from rlhf.core.algorithms.tokens import token_logprobs
from rlhf.core.algorithms.value_loss import clipped_value_loss

from rlhf.core.models import lora
from rlhf.core.models.safetensors_dir import load_pretrained

from rlhf.core.data import packing
from rlhf.core.data.batch import TrainBatch
from rlhf.core.config.run_config import RunConfig
from rlhf.core.distributed import threads
from rlhf.core.distributed.ranks import DeepSpeedRank, RankGroup

# The value head of Hugging Face's token classifiers (Qwen2, Llama: ``score``).
VALUE_HEADS = ("score",)

# Per-rank sums, all-reduced into whole-batch figures.
_SUMMED = ("value_loss", "clipped", "error", "response_tokens")


def load_value_model(init_dir: str):
    """A saved value model as it is, or a fresh scalar head on a causal LM's backbone (the warm-up student)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(init_dir)
    fresh_head: tuple[str, ...] = ()
    if not any(a.endswith("ForTokenClassification") for a in (config.architectures or [])):
        fresh_head = ("score.",)  # the only weights a causal LM's files lack
        config.num_labels = 1
        # No dropout before the head: a value estimate that changes from one forward to the next adds noise to
        # every advantage (Hugging Face's token classifiers default to 0.1).
        config.classifier_dropout = 0.0
    model = load_pretrained(AutoModelForTokenClassification, init_dir, "critic's initial model", fresh_head,
                            config=config, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ValueError(f"{init_dir} holds a token classifier with {model.config.num_labels} labels, not a value "
                         f"model (1 label)")
    model.config.use_cache = False
    return model


def token_values(model, mb: dict[str, torch.Tensor] | TrainBatch) -> torch.Tensor:
    """(rows, L) values aligned with the micro-batch's ``input_ids`` (packed or not, see rlhf/core/data/packing.py):
    position t holds the head's output at t - 1, each sequence's first position gets 0."""
    head = model(**packing.model_inputs(mb)).logits[..., 0].float()
    return packing.zero_sequence_starts(torch.nn.functional.pad(head[:, :-1], (1, 0), value=0.0), mb)


class CriticTrainer(DeepSpeedRank):
    """One data-parallel rank of the critic. Creating it joins the process group, so all ``world_size`` ranks must
    be created together."""

    # A causal LM's generation settings mean nothing beside a value model.
    _side_files_to_skip = ("generation_config.json",)

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, init_dir: str,
                 cfg: RunConfig):
        super().__init__(rank, world_size, master_addr, master_port, cfg.critic, cfg.seed, cfg.call_timeout_s)
        # Clip range of the value loss around the values the advantages were computed with; 0: no clipping.
        self.value_clip = cfg.algorithm.value_clip
        self.model_dir = init_dir
        model = load_value_model(init_dir)
        if cfg.critic.lora:  # adapters on the backbone; the value head is fresh, so it trains whole
            model = lora.wrap(model, cfg.critic.lora.model_dump(), heads=VALUE_HEADS, key="critic.lora")
        self._wrap(model)

    @torch.no_grad()
    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Values (B, L) of this rank's rows, 0 where ``attention_mask`` is 0. Collective under ZeRO-3: every rank
        calls it with the same number of rows."""
        self.engine.eval()
        return self._per_token(batch, lambda mb: token_values(self.engine, mb))

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer update of the value loss on this rank's rows. Collective: every rank calls it with a shard
        of the same number of rows. ``batch`` carries old_values and returns; its loss weights are the value
        loss's. Returns whole-batch metrics (the same on every rank)."""
        if batch.old_values is None or batch.returns is None:
            raise ValueError("critic batch lacks old_values or returns")
        engine = self.engine
        start = time.perf_counter()
        engine.train()
        sums = torch.zeros(len(_SUMMED), dtype=torch.float64)
        micro_batches = list(self._micro_batches(batch))
        for i, (_, mb, _) in enumerate(micro_batches):
            values = token_values(engine, mb)
            per_token, clipped = clipped_value_loss(values, mb.old_values, mb.returns, self.value_clip)
            loss = (per_token * mb.loss_weights).sum()
            engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            # x world_size undoes DeepSpeed's averaging over ranks (see PolicyTrainer._micro_step).
            engine.backward(loss * self.world_size, scale_wrt_gas=False)
            engine.step()
            mask = mb.response_mask
            with torch.no_grad():
                sums += torch.stack([loss.detach(), (clipped * mask).sum(),
                                     ((values.detach() - mb.returns).abs() * mask).sum(),
                                     mask.sum()]).double().cpu()

        total = dict(zip(_SUMMED, self._sum_across_ranks(sums).tolist()))
        tokens = max(total["response_tokens"], 1.0)
        metrics = {
            "losses/value_loss": total["value_loss"],
            "losses/value_clipfrac": total["clipped"] / tokens,
            # Mean |V - R| on this step's rows, as the update saw them (before its own optimizer step).
            "losses/value_error": total["error"] / tokens,
            "perf/critic_train_s": time.perf_counter() - start,
        }
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["losses/critic_grad_norm"] = float(grad_norm)
        return metrics


class CriticGroup(RankGroup):
    """``num_ranks`` CriticTrainer Ray actors forming one data-parallel DeepSpeed group."""

    def __init__(self, init_dir: str, cfg: RunConfig, num_ranks: int, timeout_s: float, **placement):
        """``placement``: RankGroup's resources, strategy and placement_timeout_s."""
        # Its share of the run's thread budget: beside the rollout workers when rollout is asynchronous.
        share = threads.run_budget(cfg).get("critic", cfg.critic.threads)
        super().__init__(CriticTrainer, (init_dir, cfg), share, num_ranks, timeout_s, role="critic", **placement)

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """Values (B, L) of every row of ``batch``, split across the ranks."""
        shards = self._shards(batch.inputs(), batch.input_ids.shape[0],
                              f"make rollout rows per step a multiple of critic.num_ranks={self.num_ranks}")
        return torch.cat(self._get([actor.values.remote(s) for actor, s in zip(self.actors, shards)],
                                   "critic values"))

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        shards = self._shards(batch, batch.input_ids.shape[0],
                              f"make rollout rows per step a multiple of critic.num_ranks={self.num_ranks}")
        metrics = self._get([actor.train_step.remote(s) for actor, s in zip(self.actors, shards)],
                            "critic train_step")
        return {**metrics[0], "perf/critic_train_s": max(m["perf/critic_train_s"] for m in metrics)}
