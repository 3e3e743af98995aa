"""The policy update's forward and backward with the output head at every position, against the head only at the
response tokens (rlhf/core/models/response_head.py), on the same micro-batch of a real model, side by side.

    python benchmarks/update_head.py --model runs/smollm2_distil/warmup [--rows 16] [--repeats 5] [--threads 2]
                                     [--precision auto] [--data configs/data/arithmetic_words/train.jsonl]

The micro-batch is what ``configs/smollm2_distil.yaml``'s RL update trains on: ``--rows`` problems of the task
rendered with the model's chat template, each followed by its reference solution as the response ("19 plus 5 is
24.\\n#### 24", 10-40 tokens), LoRA r 16 on the attention and MLP projections, the reference forward with the
adapters off (kl_coef > 0), autocast to ``--precision``. One timed repeat is one forward and backward of the clipped
policy loss plus KL, as the trainer's micro-step does; the two ways alternate within each repeat so that a busy
moment slows both.

Prints per way the median seconds, response tokens/s, and MFU against the GEMM rate of the precision on these
threads (``rlhf.core.models.precision``, which the trainer reports as ``perf/train_mfu``). Each way's MFU counts the
FLOPs it does: the full head at every token, the cut head at the response tokens only; the speed-up is the ratio of
the medians. Then one JSON object. Run it alone: with other jobs on the cores, small matrix products slow 10-80x.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rlhf.core.algorithms.tokens import token_logprobs
from rlhf.core.models import lora, precision
from rlhf.core.models.response_head import response_logits, response_logprobs

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def micro_batch(tokenizer, data: Path, rows: int) -> dict[str, torch.Tensor]:
    """``rows`` problems as chat prompts followed by their reference solutions, right-padded."""
    lines = [json.loads(line) for line in data.read_text().splitlines()[:rows]]
    sequences, starts = [], []
    for line in lines:
        text = tokenizer.apply_chat_template([{"role": "user", "content": line["question"]}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        response = tokenizer(line["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt + response)
        starts.append(len(prompt))
    width = max(map(len, sequences))
    input_ids = torch.full((rows, width), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention, response = torch.zeros(rows, width), torch.zeros(rows, width)
    for i, (ids, start) in enumerate(zip(sequences, starts)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        response[i, start:len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention.long(), "response_mask": response}


def full_head(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return token_logprobs(logits, batch["input_ids"])


def cut_head(model, batch):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = response_logits(model, inputs, batch["response_mask"])
    return response_logprobs(logits, batch["input_ids"], batch["response_mask"])


def update_seconds(model, reference, batch, logprobs, autocast: str) -> float:
    """One micro-step: the policy's and the reference's log-probs, a clipped ratio loss plus a k3 KL, backward."""
    mask, advantages = batch["response_mask"], torch.linspace(-1, 1, batch["input_ids"].shape[0])[:, None]
    start = time.perf_counter()
    with precision.autocast(autocast):
        logp = logprobs(model, batch)
        with torch.no_grad():
            ref = logprobs(reference, batch)
    ratio = torch.exp(logp - logp.detach())
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    loss = ((-(ratio * advantages).clamp(-1.2, 1.2) + 0.01 * kl) * mask).sum() / mask.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a causal LM directory (e.g. runs/smollm2_distil/warmup)")
    parser.add_argument("--data", default=str(REPO / "configs/data/arithmetic_words/train.jsonl"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"update_head: --model {args.model} is not a model directory (no config.json): give a local causal "
                 f"LM, e.g. runs/smollm2_distil/warmup")
    if not Path(args.data).is_file():
        sys.exit(f"update_head: --data {args.data} does not exist: give a JSONL file with question and answer fields")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = precision.cpu_flags()
    chosen = precision.resolve_precision(args.precision, flags, cuda=False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                      {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS}).train()
    reference = lora.AdaptersOff(model)
    batch = micro_batch(tokenizer, Path(args.data), args.rows)
    tokens, response = int(batch["attention_mask"].sum()), int(batch["response_mask"].sum())
    rate = precision.gemm_rate(chosen)
    params, head = precision.model_params(model), precision.head_params(model)
    flops = {"full": precision.update_flops(params, tokens, True, tokens),
             "cut": precision.update_flops(params - head, tokens, True, tokens)
             + precision.update_flops(head, response, True, response)}
    flops["cut, no casts"] = flops["cut"]
    ways = {"full": (full_head, True), "cut": (cut_head, True), "cut, no casts": (cut_head, False)}

    def seconds(way, casts: bool) -> float:
        lora.cast_inputs(model, casts)
        return update_seconds(model, reference, batch, way, chosen)

    for way in ways.values():  # one untimed run each: first-call allocations
        seconds(*way)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            times[name].append(seconds(*way))
    result = {"model": args.model, "precision": chosen, "threads": args.threads, "rows": args.rows,
              "tokens": tokens, "response_tokens": response, "gemm_gflops": round(rate / 1e9, 1),
              "cpu_bf16_units": sorted(flags & precision.BF16_FLAGS), "avx512f": "avx512f" in flags}
    print(f"{args.rows} rows, {tokens} tokens ({response} response), {chosen}, {args.threads} threads, "
          f"GEMM {rate / 1e9:.0f} GFLOP/s")
    print(f"{'way':<14}{'median s':>10}{'resp tok/s':>12}{'MFU':>7}")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        result[name] = {"median_s": round(median, 3), "seconds": [round(s, 3) for s in seconds],
                        "response_tokens_per_s": round(response / median, 1),
                        "mfu": round(flops[name] / median / rate, 3)}
        print(f"{name:<14}{median:>10.3f}{response / median:>12.1f}{flops[name] / median / rate:>7.3f}")
    result["speedup"] = {name: round(result["full"]["median_s"] / result[name]["median_s"], 2) for name in ways}
    print("speed-up over the full head: " + ", ".join(f"{name} {x}x" for name, x in result["speedup"].items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
