"""transformers' continuous batching (``model.generate_batch``) against our hf engine on the quickstart's rollouts.

    python benchmarks/continuous_batching.py [--warm-dir runs/grpo_vs_trl_warm] [--repeats 3] [--threads 2]

The quickstart's warmed-up student (made once by grpo_vs_trl.py's ``warm_student``), 32 arithmetic prompts x 8
samples, up to 56 new tokens at temperature 0.7: responses of natural, varying length, where continuous batching
could save the padded steps of rows that have already finished. Alternating, median seconds over ``--repeats``; the
log-probs ``generate_batch`` returns are checked against a recomputed forward. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPTS, SAMPLES, MAX_NEW_TOKENS, TEMPERATURE = 32, 8, 56, 0.7  # configs/quickstart_verifier.yaml's rollout


def continuous_batch(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature: float):
    """Samples as (prompt ids, response ids, log-probs) from ``generate_batch``, one request per row."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    requests = [ids for ids in encoded for _ in range(n)]
    # Sized for this call: left to itself it sizes the KV cache from "free GPU memory", which on a CPU is slow.
    longest = max(len(ids) for ids in encoded) + max_new_tokens
    cb_config = ContinuousBatchingConfig(return_logprobs=True, page_size=longest, num_blocks=len(requests) + 1,
                                         max_batch_tokens=sum(map(len, requests)), max_memory_percent=0.2)
    outputs = model.generate_batch(requests, generation_config=config, continuous_batching_config=cb_config,
                                   warmup=False)
    return [(o.prompt_ids, list(o.generated_tokens), list(o.logprobs)) for o in outputs.values()]


def logprob_gap(model, rows, temperature: float) -> float:
    """Largest |log-prob from generate_batch - recomputed full forward at the temperature| over ``rows``."""
    import torch

    from rlhf.base.algorithms import token_logprobs

    gap = 0.0
    for prompt_ids, response, logprobs in rows:
        ids = torch.tensor([prompt_ids + response])
        with torch.no_grad():
            expected = token_logprobs(model(ids).logits.float() / temperature, ids)[0, len(prompt_ids):]
        gap = max(gap, (expected - torch.tensor(logprobs)).abs().max().item())
    return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-dir", type=Path, default=ROOT / "runs" / "grpo_vs_trl_warm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    import grpo_vs_trl
    from rlhf.base.data import arithmetic_rows
    from rlhf.base.models import load_student
    from rollout.engine import generate

    torch.set_num_threads(args.threads)
    model, tokenizer = load_student(grpo_vs_trl.warm_student(args.warm_dir))
    model.eval()
    prompts = [r.prompt for r in arithmetic_rows(PROMPTS, 0)]
    times: dict[str, list[float]] = {"hf generate": [], "generate_batch": []}
    lengths: dict[str, list[float]] = {"hf generate": [], "generate_batch": []}
    rows = []
    for repeat in range(args.repeats + 1):  # the first round of each is a warm-up, not timed
        start = time.perf_counter()
        samples = generate(model, tokenizer, prompts, SAMPLES, MAX_NEW_TOKENS, TEMPERATURE)
        hf_s = time.perf_counter() - start
        start = time.perf_counter()
        rows = continuous_batch(model, tokenizer, prompts, SAMPLES, MAX_NEW_TOKENS, TEMPERATURE)
        cb_s = time.perf_counter() - start
        if repeat:
            times["hf generate"].append(hf_s)
            times["generate_batch"].append(cb_s)
            lengths["hf generate"].append(statistics.mean(len(s.response_ids) for s in samples))
            lengths["generate_batch"].append(statistics.mean(len(r[1]) for r in rows))
        print(f"round {repeat}: hf generate {hf_s:.2f} s, generate_batch {cb_s:.2f} s", flush=True)
    result = {name: {"s": round(statistics.median(t), 3), "rows_per_s": round(PROMPTS * SAMPLES / statistics.median(t), 1),
                     "mean_response_tokens": round(statistics.median(lengths[name]), 1)} for name, t in times.items()}
    result["speedup_generate_batch"] = round(result["hf generate"]["s"] / result["generate_batch"]["s"], 3)
    result["generate_batch_logprob_max_gap"] = round(logprob_gap(model, rows[:16], TEMPERATURE), 5)
    result["threads"] = args.threads
    print(f"\n{'':<16}{'s (median)':>12}{'rows/s':>10}{'mean tokens':>13}")
    for name in times:
        print(f"{name:<16}{result[name]['s']:>12.3f}{result[name]['rows_per_s']:>10.1f}"
              f"{result[name]['mean_response_tokens']:>13.1f}")
    print(f"generate_batch / hf: {result['speedup_generate_batch']:.2f}x; its log-probs vs a recomputed forward: "
          f"max gap {result['generate_batch_logprob_max_gap']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
