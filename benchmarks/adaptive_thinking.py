"""Adaptive thinking: the same GRPO run with and without the adaptive-length reward, from one warm-up student.

    python benchmarks/adaptive_thinking.py [--config configs/adaptive.yaml] [--out runs/adaptive_thinking]
                                           [--warmup-dir DIR] [key=value ...]

1. Warm-up: the student is distilled from the teacher's mixture of bare answers and thought-out steps (skipped
   with --warmup-dir, which reuses a saved warm-up student).
2. Without: GRPO rewarded by the verifier alone (``reward.components={verifier: 1.0}``).
3. With: the same seeds and steps, rewarded by the verifier plus the config's adaptive term.

The first run evaluates the warm-up student (greedy, held-out prompts); both evaluate their policy after RL.
Prints a table per difficulty level (accuracy, mean response tokens, think rate), then one JSON object: the
easiest level's mean response tokens (warm-up vs with the term) and their relative drop, the hardest level's accuracy with and without
the term and its response tokens, and whether each target holds (easiest-level tokens down by at least 30% from
the warm-up student; hardest-level accuracy within 2 points of the run without the term; hardest-level responses
no more than 10% shorter than without it).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from reward.teachers.trace_select import target_fn
from rlhf.api import Trainer, run
from rlhf.cli import _quiet_libraries
from rlhf.core.config.run_config import load_config
from rlhf.stages.run_dir import build_policy
from rlhf.core.models.build import save_student
from rlhf.stages.warmup import run_warmup


def warm_up(cfg, out: Path, log) -> Path:
    """The warm-up student, saved where both RL runs load it."""
    student, tokenizer = build_policy(cfg, log)
    ad = cfg.reward.adaptive
    run_warmup(student, tokenizer, cfg.warmup, cfg.seed, log, cfg.think,
               target_fn("matched", ad.rv_at_cd0, ad.rv_at_cd9))
    save_student(student, tokenizer, out)
    return out


def table(rows: list[tuple[str, dict]]) -> str:
    levels = sorted(rows[0][1]["by_difficulty"], key=int)
    lines = [f"{'level':<7}" + "".join(f"{name + ' ' + what:>22}" for name, _ in rows
                                       for what in ("acc", "tokens", "think"))]
    for level in levels:
        cells = []
        for _, figures in rows:
            f = figures["by_difficulty"][level]
            cells += [f"{f['accuracy']:>22.3f}", f"{f['mean_response_tokens']:>22.1f}", f"{f['think_rate']:>22.2f}"]
        lines.append(f"{level:<7}" + "".join(cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/adaptive.yaml")
    parser.add_argument("--out", default="runs/adaptive_thinking")
    parser.add_argument("--warmup-dir", help="a saved warm-up student to start from (skips the warm-up)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    _quiet_libraries()
    out = Path(args.out)
    shutil.rmtree(out / "without", ignore_errors=True)
    shutil.rmtree(out / "with", ignore_errors=True)

    cfg = load_config(args.config, args.overrides)
    if not cfg.reward.components.get("adaptive"):
        print(f"{args.config} has no adaptive reward component: set reward.components.adaptive", file=sys.stderr)
        return 2
    start = args.warmup_dir
    if start is None:
        shutil.rmtree(out / "warmup", ignore_errors=True)
        start = warm_up(cfg, out / "warmup", lambda line: print(f"[warmup] {line}", flush=True))
    common = [*args.overrides, f"model.model_name_or_path={start}", "stages=[rl,eval]"]
    without_components = "{" + ", ".join(f"{k}: {v}" for k, v in cfg.reward.components.items()
                                         if k != "adaptive") + "}"
    runs = {}
    without_cfg = load_config(args.config, [*common, f"reward.components={without_components}",
                                            f"output_dir={out / 'without'}"])
    runs["without"] = run(without_cfg, log=lambda line: print(f"[without] {line}", flush=True)).summary
    # The same warm-up student was evaluated by the run above: this one evaluates only after RL.
    with_cfg = load_config(args.config, [*common, f"output_dir={out / 'with'}"])
    with Trainer(with_cfg, log=lambda line: print(f"[with] {line}", flush=True)) as trainer:
        trainer.train()
        trainer.evaluate()
    runs["with"] = json.loads((out / "with" / "summary.json").read_text())

    warm, without, with_ = runs["without"]["eval_before"], runs["without"]["eval_after"], runs["with"]["eval_after"]
    levels = sorted(warm["by_difficulty"], key=int)
    easy, hard = levels[0], levels[-1]

    def fig(figures: dict, level: str, key: str) -> float:
        return figures["by_difficulty"][level][key]

    easy_warm, easy_with = fig(warm, easy, "mean_response_tokens"), fig(with_, easy, "mean_response_tokens")
    hard_tokens_without, hard_tokens_with = (fig(without, hard, "mean_response_tokens"),
                                             fig(with_, hard, "mean_response_tokens"))
    result = {
        "easiest_level": int(easy), "hardest_level": int(hard),
        "easy_tokens_warmup": easy_warm, "easy_tokens_without": fig(without, easy, "mean_response_tokens"),
        "easy_tokens_with": easy_with,
        "easy_token_drop": round(1 - easy_with / easy_warm, 4) if easy_warm else None,
        "easy_think_rate_warmup": fig(warm, easy, "think_rate"), "easy_think_rate_with": fig(with_, easy, "think_rate"),
        "hard_accuracy_warmup": fig(warm, hard, "accuracy"), "hard_accuracy_without": fig(without, hard, "accuracy"),
        "hard_accuracy_with": fig(with_, hard, "accuracy"),
        "hard_tokens_without": hard_tokens_without, "hard_tokens_with": hard_tokens_with,
        "hard_token_change": round(hard_tokens_with / hard_tokens_without - 1, 4) if hard_tokens_without else None,
        "accuracy_without": without["accuracy"], "accuracy_with": with_["accuracy"],
        "steps": runs["with"]["steps"], "eval_per_level": fig(warm, easy, "n"),
        "wall_s": round(runs["without"]["wall_s"] + runs["with"]["wall_s"], 1),
    }
    result["pass_easy_drop"] = result["easy_token_drop"] is not None and result["easy_token_drop"] >= 0.30
    result["pass_hard_accuracy"] = result["hard_accuracy_with"] >= result["hard_accuracy_without"] - 0.02
    result["pass_hard_length"] = result["hard_token_change"] is not None and result["hard_token_change"] >= -0.10
    print(table([("warm-up", warm), ("without", without), ("with", with_)]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
