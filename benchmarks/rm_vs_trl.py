"""Reward-model throughput, distilrl against TRL's RewardTrainer on the same model and preference pairs.

    python benchmarks/rm_vs_trl.py [--steps 8] [--warmup 2] [--pairs 32] [--quick]

The same reward model (a Qwen2 backbone with a quality head, ``reward.model.distilled.DistilledRewardModel``, saved once; TRL
loads it as the plain ``Qwen2ForSequenceClassification`` it is saved as), the same character tokenizer and the
same pairs (arithmetic prompts, a correct worked answer chosen over a wrong one), the same pairs per optimizer step,
learning rate, AdamW and gradient clipping, and the same loss (Bradley-Terry, -log sigmoid(chosen - rejected): our
other loss terms are weighted 0 here). Training runs twice, on two kinds of pairs: rejected answers that go wrong
at the end (a pair shares all but its last tokens) and at the first step (it shares the prompt and the first
operation), because our trainer computes a pair's shared prefix once. Each run alternates one optimizer step of
each side (TRL's loop drives: a callback times each TRL step, then runs one of ours on a DeepSpeed ZeRO-2 rank in a
Ray actor); the first ``--warmup`` steps are dropped and medians reported. Scoring: ``reward.model.distilled.score_texts``
against the plain Hugging Face way a TRL user scores (tokenizer with padding, ``AutoModelForSequenceClassification``
forward), alternating, same batch size.

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {
    "default": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 1024},
    "quick": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
}
LR = 1e-5
SEED = 0
# Pair kinds measured, by where the rejected answer goes wrong (make_pairs). Our trainer computes the tokens a pair
# shares once (reward.model.pair_packing), so the speed depends on it; TRL computes both sequences whole.
SLIPS = {"late": "a wrong final answer after the same working", "early": "a slip in the first step, carried on"}


def make_pairs(count: int, slip: str = "late") -> list[dict]:
    """Arithmetic prompts; chosen: the worked, correct solution (running totals). Rejected, by ``slip``: "late",
    the same working with a wrong final answer (the two share all but the last tokens); "early", a slip in the
    first running total carried through to the end (they share the prompt and the first operation only)."""
    from rlhf.core.tasks import arithmetic

    rng = random.Random(SEED)
    pairs = []
    for problem in arithmetic.make_problems(count, SEED):
        chosen = arithmetic.solution(problem, verbosity=1)
        error = rng.choice([-3, -2, -1, 1, 2, 3])
        if slip == "late":
            rejected = chosen.rsplit("#", 1)[0] + f"#{problem.answer + error}"
        else:
            totals = [t + error for t in problem.running_totals()[1:]]
            steps = [f"{a}{op}{x}={b}" for a, op, x, b in zip([problem.operands[0]] + totals, problem.ops,
                                                             problem.operands[1:], totals)]
            rejected = ";".join(steps) + f";#{totals[-1]}"
        pairs.append({"prompt": problem.prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def make_reward_model(size: dict, out_dir: Path):
    """The shared RM: a random Qwen2 backbone with fresh heads, saved (with the tokenizer) to ``out_dir``."""
    from reward.model.distilled import DistilledRewardModel
    from rlhf.core.config.run_config import ModelConfig
    from rlhf.core.models.build import build_student, build_tokenizer

    tokenizer = build_tokenizer("char")
    student = build_student(ModelConfig(**size, max_position_embeddings=256), tokenizer, SEED)
    model = DistilledRewardModel.from_causal_lm(student, pad_token_id=tokenizer.pad_token_id, seed=SEED)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return tokenizer, sum(p.numel() for p in model.parameters())


def train(rm_dir: Path, pairs: list[dict], tokenizer, batch: int, steps: int, warmup: int, log) -> dict:
    import ray
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, PrinterCallback, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from reward.model.ranks import RewardModelTrainerGroup, collate_pairs
    from rlhf.core.distributed import cluster
    from rlhf.core.config.run_config import RewardModelConfig

    total = steps + warmup
    threads = os.cpu_count() or 1
    cluster.connect("local", threads, 60, {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})
    ours = RewardModelTrainerGroup(str(rm_dir), RewardModelConfig(
        zero_stage=2, lr=LR, micro_batch_size=batch, threads=threads, max_grad_norm=1.0, bt_weight=1.0,
        quality_weight=0.0, rv_weight=0.0, cd_weight=0.0, kl_weight=0.0), 1, 1800, SEED)
    # Pairs as TRL sees them (the prompt written into both sides, as ours concatenates it) and as our batches.
    texts = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs]
    ours_batches = [collate_pairs(tokenizer, pairs[i:i + batch]) for i in range(0, len(pairs), batch)]
    ours_s, trl_s = [], []

    class Alternate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            trl_s.append(time.perf_counter() - self.start)
            start = time.perf_counter()
            ours.train_step(ours_batches[(len(trl_s) - 1) % len(ours_batches)])
            ours_s.append(time.perf_counter() - start)
            log(f"train step {len(trl_s)}/{total}: trl {trl_s[-1]:.3f} s, distilrl {ours_s[-1]:.3f} s")

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32, use_safetensors=True)
    args = RewardConfig(output_dir=str(rm_dir.parent / "trl"), use_cpu=True, bf16=False, fp16=False,
                        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
                        disable_tqdm=True, seed=SEED, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                        learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
                        warmup_steps=0, max_steps=total, max_length=256, center_rewards_coefficient=None,
                        dataloader_num_workers=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(texts), processing_class=tokenizer,
                            callbacks=[Alternate()])
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        ours.shutdown()
        ray.shutdown()
    ours_median, trl_median = statistics.median(ours_s[warmup:]), statistics.median(trl_s[warmup:])
    return {"distilrl_train_pairs_per_s": round(batch / ours_median, 2),
            "trl_train_pairs_per_s": round(batch / trl_median, 2),
            "train_ratio": round(trl_median / ours_median, 3)}


def score(rm_dir: Path, pairs: list[dict], tokenizer, batch: int, repeats: int) -> dict:
    """Sequences/s scoring every chosen response, ours and the plain Hugging Face way, alternating."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from reward.model.distilled import DistilledRewardModel, score_texts

    torch.set_num_threads(os.cpu_count() or 1)
    prompts, responses = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    ours = DistilledRewardModel.from_pretrained(rm_dir, dtype=torch.float32, use_safetensors=True).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32,
                                                               use_safetensors=True).eval()
    # The way the HF docs score: the whole text, padded; the model reads the last non-pad token.
    texts = [p + r + tokenizer.eos_token for p, r in zip(prompts, responses)]

    @torch.no_grad()
    def hf_scores():
        out = []
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], padding=True, return_tensors="pt", add_special_tokens=False)
            out += plain(**enc).logits.squeeze(-1).tolist()
        return out

    ours_t, hf_t = [], []
    for _ in range(repeats + 1):  # the first round warms both up and is dropped
        start = time.perf_counter()
        mine = score_texts(ours, tokenizer, prompts, responses, batch)
        ours_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = hf_scores()
        hf_t.append(time.perf_counter() - start)
    # Same model, same tokens: the quality scores must agree (a check that both scored the same work).
    agree = max(abs(a["quality"] - b) for a, b in zip(mine, theirs))
    ours_median, hf_median = statistics.median(ours_t[1:]), statistics.median(hf_t[1:])
    return {"distilrl_score_seqs_per_s": round(len(texts) / ours_median, 1),
            "hf_score_seqs_per_s": round(len(texts) / hf_median, 1),
            "score_ratio": round(hf_median / ours_median, 3), "score_max_abs_diff": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps on each side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--pairs", type=int, default=32, help="pairs per optimizer step")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1 warm-up + 1 step: a smoke test")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "default"]
    if args.quick:
        args.steps, args.warmup, args.pairs = 1, 1, 4
    from rlhf.cli import _quiet_libraries

    _quiet_libraries()
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="rm_vs_trl_"))
    atexit.register(shutil.rmtree, work, True)  # the saved students and run dirs are scratch
    tokenizer, params = make_reward_model(size, work / "rm")
    pairs = {slip: make_pairs(args.pairs * (args.steps + args.warmup), slip) for slip in SLIPS}
    print(f"reward model: {params / 1e6:.2f}M parameters; {args.pairs} pairs per step, {args.warmup} warm-up + "
          f"{args.steps} timed steps each, alternating", flush=True)
    result = {"params_m": round(params / 1e6, 3), "pairs_per_step": args.pairs, "steps": args.steps,
              **score(work / "rm", pairs["late"], tokenizer, 2 * args.pairs, 1 if args.quick else 5)}
    for slip in SLIPS:
        print(f"pairs with {SLIPS[slip]}:", flush=True)
        figures = train(work / "rm", pairs[slip], tokenizer, args.pairs, args.steps, args.warmup,
                        lambda line: print(line, flush=True))
        result.update({f"{name}_{slip}": value for name, value in figures.items()})
    print(f"\n{'':<34}{'distilrl':>10}{'TRL / HF':>10}{'ratio':>8}")
    for slip in SLIPS:
        print(f"{'train pairs/s, ' + slip + ' slip':<34}{result[f'distilrl_train_pairs_per_s_{slip}']:>10.2f}"
              f"{result[f'trl_train_pairs_per_s_{slip}']:>10.2f}{result[f'train_ratio_{slip}']:>8.2f}")
    print(f"{'score sequences/s':<34}{result['distilrl_score_seqs_per_s']:>10.1f}{result['hf_score_seqs_per_s']:>10.1f}"
          f"{result['score_ratio']:>8.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
