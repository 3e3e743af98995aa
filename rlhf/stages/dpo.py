"""The preference-optimisation stage (``dpo`` in ``stages``, ``distilrl dpo``): DPO, IPO or SimPO on pairs.

The pairs are the labelling stage's teacher pairs (``labels/train``; held out: ``labels/eval``), with the
teacher's margin, and/or your own in TRL's layouts (``dpo.train_file``, read as ``distilrl train-rm --data``
reads them). The policy starts from the run's starting student (the warm-up's, or ``model.*``), trains on the
trainer section's DeepSpeed ranks (rlhf/rl/ranks/preference.py), and is written to ``output_dir/dpo`` in Hugging
Face format. Before and after, on the held-out pairs: how often the policy's per-token log-likelihood ranks the
chosen response above the rejected one (``pair_accuracy``); after, how often its implicit reward does
(``reward_accuracy``, against the starting student as the reference).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch

from reward.model.labelling import judged_rows, make_pairs
from rlhf.core.config.run_config import ConfigError, RunConfig
from rlhf.core.models.safetensors_dir import load_pretrained
from rlhf.core.progress import Progress


def dpo_stage(cfg: RunConfig, init_dir: str, out: Path, log: Callable[[str], None],
              record: Callable[[dict, int], None] | None = None) -> tuple[str, dict]:
    """Train the policy in ``init_dir`` on the configured pairs; returns (the trained policy's directory,
    figures for summary.json). ``record`` receives each step's ``dpo/*`` figures."""
    from transformers import AutoTokenizer

    from rlhf.rl.ranks.preference import PreferenceTrainerGroup, collate_preference_pairs

    dc = cfg.dpo
    if dc.batch_pairs % cfg.trainer.num_ranks:
        raise ConfigError(f"dpo.batch_pairs={dc.batch_pairs} does not split across trainer.num_ranks="
                          f"{cfg.trainer.num_ranks}: make it a multiple")
    train, held_out, sources = preference_pairs(cfg, init_dir, Path(out), log)
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    random.Random(cfg.seed + 13).shuffle(train)
    size = dc.batch_pairs
    batches = [collate_preference_pairs(tokenizer, train[i:i + size], dc.max_length, dc.margin_weight)
               for i in range(0, len(train) - size + 1, size)]
    if not batches:
        raise ConfigError(f"{len(train)} training pairs make no batch of dpo.batch_pairs={size}: lower it")
    log(f"{dc.loss} on {' and '.join(sources)}: {len(batches)} steps of {size} pairs x {dc.epochs} epochs, "
        f"{cfg.trainer.num_ranks} DeepSpeed ranks")
    before = pair_figures(init_dir, None, tokenizer, held_out, dc) if held_out else {}
    policy_dir = str(Path(out) / "dpo")
    history = []
    progress = Progress(len(batches) * dc.epochs, "dpo", "step", log)
    group = PreferenceTrainerGroup(init_dir, cfg, cfg.call_timeout_s)
    try:
        with progress:
            for epoch in range(dc.epochs):
                for batch in batches:
                    metrics = {**group.train_step(batch), "dpo/epoch": float(epoch)}
                    history.append(metrics)
                    if record is not None:
                        record(metrics, len(history))
                    progress.update(loss=metrics["dpo/loss"], acc=metrics["dpo/accuracy"])
        group.save_pretrained(policy_dir)
    finally:
        group.shutdown()
    figures = {"loss": dc.loss, "train_pairs": len(train), "eval_pairs": len(held_out), "steps": len(history),
               "final_loss": history[-1]["dpo/loss"]}
    if held_out:
        after = pair_figures(policy_dir, init_dir, tokenizer, held_out, dc)
        figures.update(pair_accuracy_before=before["pair_accuracy"], pair_accuracy_after=after["pair_accuracy"],
                       reward_accuracy=after["reward_accuracy"])
        log(f"{dc.loss} on held-out pairs: pair accuracy {before['pair_accuracy']:.3f} -> "
            f"{after['pair_accuracy']:.3f}, implicit-reward accuracy {after['reward_accuracy']:.3f}")
    return policy_dir, figures


def preference_pairs(cfg: RunConfig, init_dir: str, out: Path, log: Callable[[str], None]
                     ) -> tuple[list[dict], list[dict], list[str]]:
    """(training pairs, held-out pairs, where they came from): the teacher's (labels/train and labels/eval) where
    the run has them and ``dpo.teacher_pairs`` is on, and your own file's (``dpo.train_file``)."""
    from rlhf.stages.reward_model import own_preference_data

    dc = cfg.dpo
    labels = out / "labels"
    has_labels = dc.teacher_pairs and all((labels / n / "rows.jsonl").exists() for n in ("train", "eval"))
    if not has_labels and not dc.train_file:
        raise FileNotFoundError(f"stage dpo needs pairs: the labelling stage's in {labels}/train and /eval (add "
                                f"stage label before it) or your own (dpo.train_file, distilrl dpo --data)")
    train, held_out, sources = [], [], []
    if has_labels:
        rows = judged_rows(labels / "train")
        train += make_pairs(rows, cfg.seed)
        held_out += make_pairs(judged_rows(labels / "eval"), cfg.seed + 1)
        sources.append(f"{len(train)} teacher pairs")
    if dc.train_file:
        own_train, own_eval = own_preference_data(cfg, init_dir, log, dc)
        train += own_train.pairs
        held_out += own_eval.pairs
        sources.append(f"{len(own_train.pairs)} of your own ({own_train.layout})")
    return train, held_out, sources


@torch.no_grad()
def pair_figures(policy_dir: str, reference_dir: str | None, tokenizer, pairs: list[dict], dc,
                 batch_pairs: int = 16) -> dict:
    """On ``pairs``, in this process: ``pair_accuracy``, the share whose chosen response has the higher per-token
    mean log-prob under the policy; with a reference, ``reward_accuracy``, the share whose chosen response has the
    higher implicit reward (sequence log-ratio to the reference, summed or per token as ``dc.loss`` takes it)."""
    from transformers import AutoModelForCausalLM

    from rlhf.core.algorithms.preference_losses import PREFERENCE_LOSSES, sequence_logprobs
    from rlhf.core.algorithms.tokens import token_logprobs
    from rlhf.rl.ranks.preference import collate_preference_pairs

    def load(path: str):
        return load_pretrained(AutoModelForCausalLM, path, "dpo evaluation model", dtype=torch.float32).eval()

    policy, reference = load(policy_dir), load(reference_dir) if reference_dir else None
    average = PREFERENCE_LOSSES[dc.loss].length_normalised
    right = {"pair_accuracy": 0, "reward_accuracy": 0}
    for i in range(0, len(pairs), batch_pairs):
        batch = collate_preference_pairs(tokenizer, pairs[i:i + batch_pairs], dc.max_length)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logp = token_logprobs(policy(**inputs).logits, batch["input_ids"])
        mean = sequence_logprobs(logp, batch["response_mask"], average=True)
        right["pair_accuracy"] += int((mean[0::2] > mean[1::2]).sum())
        if reference is not None:
            ratio = sequence_logprobs(logp - token_logprobs(reference(**inputs).logits, batch["input_ids"]),
                                      batch["response_mask"], average=average)
            right["reward_accuracy"] += int((ratio[0::2] > ratio[1::2]).sum())
    figures = {"pair_accuracy": right["pair_accuracy"] / len(pairs)}
    if reference is not None:
        figures["reward_accuracy"] = right["reward_accuracy"] / len(pairs)
    return figures
