"""CPU rollout speed on the quickstart's rollouts: our hf engine (Hugging Face ``generate``), our hf_compact engine
(a decode loop that drops finished rows) and transformers' continuous batching (``model.generate_batch``).

    python benchmarks/rollout_speed.py [--warm-dir runs/grpo_vs_trl_warm] [--repeats 3] [--threads 2] [--no-cb]

The quickstart's warmed-up student (made once by grpo_vs_trl.py's ``warm_student``), 32 arithmetic prompts x 8
samples, up to 56 new tokens at temperature 0.7: responses of natural, varying length, where not computing rows
that have already finished can save work. Round-robin, median seconds over ``--repeats`` after one untimed round;
the log-probs each returns are checked against a recomputed forward. Prints a table, then one JSON line.
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

    from rlhf.core.algorithms.tokens import token_logprobs

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
    parser.add_argument("--no-cb", action="store_true", help="leave generate_batch out (it is slow on a CPU)")
    args = parser.parse_args()
    import torch

    import grpo_vs_trl
    from rlhf.core.data.datasets import arithmetic_rows
    from rlhf.core.models.build import load_student
    from rollout.engine import generate, generate_compacting

    torch.set_num_threads(args.threads)
    model, tokenizer = load_student(grpo_vs_trl.warm_student(args.warm_dir))
    model.eval()
    prompts = [r.prompt for r in arithmetic_rows(PROMPTS, 0)]

    def as_rows(samples):
        return [(s.prompt_ids, s.response_ids, s.logprobs) for s in samples]

    contenders = {"hf": lambda: as_rows(generate(model, tokenizer, prompts, SAMPLES, MAX_NEW_TOKENS, TEMPERATURE)),
                  "hf_compact": lambda: as_rows(generate_compacting(model, tokenizer, prompts, SAMPLES,
                                                                    MAX_NEW_TOKENS, TEMPERATURE))}
    if not args.no_cb:
        contenders["generate_batch"] = lambda: continuous_batch(model, tokenizer, prompts, SAMPLES, MAX_NEW_TOKENS,
                                                                TEMPERATURE)
    times = {name: [] for name in contenders}
    lengths = {name: [] for name in contenders}
    last = {}
    for repeat in range(args.repeats + 1):  # the first round is a warm-up, not timed
        line = []
        for name, run in contenders.items():
            start = time.perf_counter()
            last[name] = run()
            seconds = time.perf_counter() - start
            line.append(f"{name} {seconds:.2f} s")
            if repeat:
                times[name].append(seconds)
                lengths[name].append(statistics.mean(len(r[1]) for r in last[name]))
        print(f"round {repeat}: " + ", ".join(line), flush=True)
    result = {name: {"s": round(statistics.median(t), 3),
                     "rows_per_s": round(PROMPTS * SAMPLES / statistics.median(t), 1),
                     "mean_response_tokens": round(statistics.median(lengths[name]), 1),
                     "speedup_vs_hf": round(statistics.median(times["hf"]) / statistics.median(t), 3),
                     "logprob_max_gap": round(logprob_gap(model, last[name][:16], TEMPERATURE), 5)}
              for name, t in times.items()}
    result["threads"] = args.threads
    print(f"\n{'':<16}{'s (median)':>12}{'rows/s':>10}{'mean tokens':>13}{'vs hf':>8}{'log-prob gap':>14}")
    for name in times:
        r = result[name]
        print(f"{name:<16}{r['s']:>12.3f}{r['rows_per_s']:>10.1f}{r['mean_response_tokens']:>13.1f}"
              f"{r['speedup_vs_hf']:>7.2f}x{r['logprob_max_gap']:>14}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
