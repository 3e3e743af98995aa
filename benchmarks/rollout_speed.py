"""CPU rollout speed on the quickstart's rollouts: our hf engine (Hugging Face ``generate``), our hf_compact engine
(a decode loop that drops finished rows) and transformers' continuous batching (``model.generate_batch``).

    python benchmarks/rollout_speed.py [--warm-dir runs/grpo_vs_trl_warm] [--repeats 3] [--threads 2] [--no-cb]
    python benchmarks/rollout_speed.py --model runs/smollm2 [--threads 2] [--repeats 3] [--dtype bfloat16]

With ``--model`` (a local causal LM, e.g. SmolLM2-135M-Instruct from ``distilrl import-model``): 4 chat prompts x 4
samples x 48 forced tokens (min_new_tokens = max_new_tokens, so every contender decodes the same tokens) through a
RolloutWorker in this process (hf_compact, hf_static) beside a bare single-process decode loop (prefill, then one
forward and one draw per token: no log-probs, no bookkeeping) and Hugging Face ``generate`` on the same model, in
the same run; completion tokens/s of each and the ratios the rollout worker is judged by.

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


REAL_PROMPTS = ["What is 13 plus 7?", "What is 9 minus 4 plus 7?", "Tom has 12 apples and eats 5. How many are left?",
                "What is 16 plus 6 plus 9?"]  # 4 prompts x 4 samples, as the issue's real-model figures
REAL_SAMPLES, REAL_TOKENS = 4, 48


def bare_decode(model, input_ids, attention_mask, max_new_tokens: int) -> int:
    """The floor a rollout engine is compared to: prefill, then per token one forward over the KV cache and one
    multinomial draw; nothing recorded. Returns the tokens generated."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        next_position = attention_mask.sum(-1)
        for _ in range(max_new_tokens - 1):
            token = torch.multinomial(torch.softmax(logits.float(), -1), 1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
            logits = model(input_ids=token, attention_mask=attention_mask, position_ids=next_position[:, None],
                           cache=cache, use_cache=True).logits[:, -1]
            next_position = next_position + 1
    return input_ids.shape[0] * max_new_tokens


def real_model(args) -> dict:
    """Completion tokens/s on ``args.model``: RolloutWorker engines, the bare loop and HF generate, round-robin."""
    import torch

    from rlhf.core.config.run_config import RolloutConfig
    from rollout.engine import _left_padded
    from rollout.worker import RolloutWorker

    rollout = {"threads": args.threads, "dtype": args.dtype}  # the bare loop and generate use the same model
    workers = {name: RolloutWorker(str(args.model), RolloutConfig(engine=name, **rollout), seed=0)
               for name in ("hf_compact", "hf_static")}
    model, tokenizer = workers["hf_compact"].engine.model, workers["hf_compact"].tokenizer
    for worker in workers.values():  # forced length: every contender decodes REAL_TOKENS per row
        worker.engine.model.generation_config.min_new_tokens = REAL_TOKENS
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in REAL_PROMPTS]
    _, input_ids, attention_mask = _left_padded(model, tokenizer, prompts, REAL_SAMPLES)

    def hf_generate() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0,
                                 max_new_tokens=REAL_TOKENS, min_new_tokens=REAL_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id)
        return int((out.shape[1] - input_ids.shape[1]) * out.shape[0])

    def through(worker):
        return lambda: sum(len(s.response_ids) for s in worker.generate(prompts, REAL_SAMPLES, REAL_TOKENS, 1.0,
                                                                        False, 0))

    contenders = {"bare_loop": lambda: bare_decode(model, input_ids, attention_mask, REAL_TOKENS),
                  "hf_generate": hf_generate, **{f"worker_{name}": through(w) for name, w in workers.items()}}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for repeat in range(args.repeats + 1):  # the first round is a warm-up, not timed
        for name, run in contenders.items():
            start = time.perf_counter()
            tokens = run()
            if repeat:
                rates[name].append(tokens / (time.perf_counter() - start))
        print(f"round {repeat}: " + ", ".join(f"{n} {r[-1]:.1f} tok/s" for n, r in rates.items() if r), flush=True)
    result = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    for name in workers:
        result[f"worker_{name}_vs_hf_generate"] = round(result[f"worker_{name}"] / result["hf_generate"], 2)
        result[f"worker_{name}_vs_bare_loop"] = round(result[f"worker_{name}"] / result["bare_loop"], 2)
    result.update(model=str(args.model), threads=args.threads, dtype=args.dtype, rows=len(REAL_PROMPTS) * REAL_SAMPLES,
                  tokens_per_row=REAL_TOKENS, unit="completion tokens/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-dir", type=Path, default=ROOT / "runs" / "grpo_vs_trl_warm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cb", action="store_true", help="leave generate_batch out (it is slow on a CPU)")
    parser.add_argument("--model", type=Path, help="a local causal LM: measure the real-model contenders instead")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="with --model: the weights' dtype for every contender (rollout.dtype)")
    args = parser.parse_args()
    if args.model is not None:
        print(json.dumps(real_model(args)))
        return
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
