"""The reward workers' scoring in fp32 against bf16 autocast (``reward_model.scoring_precision``), on one real RM
and the same responses, alternating: seconds, how far the scores move, and whether any order within a group flips.

    python benchmarks/rm_scoring_precision.py --rm runs/smollm2_distil/reward_model
        --rows runs/smollm2_distil/labels/eval/rows.jsonl [--count 64] [--group 4] [--repeats 3] [--threads 2]

``--rows``: judged rows (prompt, response, reference), as the labelling stage writes them; the first ``--count``
are scored in one batch, as a reward worker scores a step's rollouts, and each run of ``--group`` consecutive rows
counts as one prompt's group (the order GRPO's advantages read). Prints a table, then one JSON object. Run it alone.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from reward.model.distilled import DistilledRewardModel, score_texts, uses_reference, with_reference
from rlhf.core.models import precision


def scored(model, tokenizer, prompts, responses, setting: str) -> tuple[float, list[float]]:
    start = time.perf_counter()
    with precision.autocast(setting), torch.no_grad():
        scores = score_texts(model, tokenizer, prompts, responses, batch_size=len(prompts))
    return time.perf_counter() - start, [s["quality"] for s in scores]


def order_flips(a: list[float], b: list[float], group: int) -> tuple[int, int]:
    """(pairs within a group whose order differs between ``a`` and ``b``, pairs with an order in ``a``)."""
    pairs = [(i, j) for start in range(0, len(a), group)
             for i, j in itertools.combinations(range(start, min(start + group, len(a))), 2) if a[i] != a[j]]
    return sum((a[i] > a[j]) != (b[i] > b[j]) for i, j in pairs), len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rm", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (Path(args.rm) / "config.json").is_file():
        sys.exit(f"rm_scoring_precision: --rm {args.rm} is not a model directory (no config.json): give a trained "
                 f"distilled RM, e.g. runs/smollm2_distil/reward_model")
    if not Path(args.rows).is_file():
        sys.exit(f"rm_scoring_precision: --rows {args.rows} does not exist: give a labels rows.jsonl "
                 f"(prompt, response, reference), e.g. runs/smollm2_distil/labels/eval/rows.jsonl")
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    model, tokenizer = DistilledRewardModel.from_pretrained(args.rm).eval(), AutoTokenizer.from_pretrained(args.rm)
    with open(args.rows) as f:
        rows = [json.loads(line) for line in itertools.islice(f, args.count)]
    prompts = [r["prompt"] for r in rows]
    responses = [with_reference(r["response"], r["reference"]) if uses_reference(model) else r["response"]
                 for r in rows]
    settings = ("fp32", "bf16")
    for setting in settings:  # untimed: first-call allocations
        scored(model, tokenizer, prompts, responses, setting)
    seconds, scores = {s: [] for s in settings}, {}
    for _ in range(args.repeats):
        for setting in settings:
            dt, scores[setting] = scored(model, tokenizer, prompts, responses, setting)
            seconds[setting].append(dt)
    fp32, bf16 = torch.tensor(scores["fp32"]), torch.tensor(scores["bf16"])
    flips, pairs = order_flips(scores["fp32"], scores["bf16"], args.group)
    flags = precision.cpu_flags()
    result = {"rows": len(rows), "threads": args.threads, "cpu_bf16_units": sorted(flags & precision.BF16_FLAGS),
              **{f"{s}_median_s": round(statistics.median(seconds[s]), 3) for s in settings},
              "seconds": seconds, "max_abs_difference": round(float((fp32 - bf16).abs().max()), 4),
              "fp32_score_std": round(float(fp32.std()), 4), "order_flips": flips, "ordered_pairs": pairs}
    result["speedup"] = round(result["fp32_median_s"] / result["bf16_median_s"], 2)
    print(f"{len(rows)} rows, {args.threads} threads, bf16 units: {result['cpu_bf16_units'] or 'none'}")
    for s in settings:
        print(f"{s}: {result[f'{s}_median_s']:.2f} s (median of {args.repeats})")
    print(f"bf16 {result['speedup']}x; scores move by at most {result['max_abs_difference']} (fp32 spread "
          f"{result['fp32_score_std']}); order flips within groups: {flips} of {pairs}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
