"""bf16 against fp32 on this CPU: GEMM rate and rollout generation tokens/s (``rollout.dtype``).

    python benchmarks/bf16_sampling.py [--workload medium] [--repeats 3]

Says what the CPU offers for bf16 (lscpu flags: avx512_bf16, amx_bf16; without them torch converts bf16 to fp32
around fp32 kernels), measures a square GEMM (--gemm-size) in each dtype, then generates the workload's batch (grpo_vs_trl.py's
shapes, forced length) with the hf engine holding the student in each dtype, alternating, the median of
``repeats``. Also the train/rollout log-prob mismatch bf16 sampling brings: the mean |bf16 forward log-prob - fp32
forward log-prob| over the sampled tokens (what perf/logprob_mismatch logs in a run). Prints a table, then one JSON
object.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_bf16_support() -> dict:
    """The CPU's model name and which bf16 instructions its flags list."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"cpu": fields.get("Model name", "unknown").strip(),
            "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"})}


def mismatch(model, fp32_model, samples) -> float:
    """Mean |log-prob under ``model`` - under the fp32 model| of the sampled tokens (full forwards, temperature 1;
    the sampler's own log-probs would also carry the forced length's end-of-sequence suppression)."""
    import torch

    from rlhf.core.algorithms.tokens import token_logprobs

    diffs = []
    with torch.no_grad():
        for s in samples[:8]:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            got, ref = (token_logprobs(m(ids).logits.float(), ids)[0, len(s.prompt_ids):] for m in (model, fp32_model))
            diffs.append((got - ref).abs().mean().item())
    return statistics.mean(diffs)


def run(workload_name: str, repeats: int, gemm_size: int, log=print) -> dict:
    import torch

    import grpo_vs_trl
    from rlhf.core.config.run_config import RolloutConfig
    from rlhf.core.data.datasets import arithmetic_rows
    from rollout.engines import HFEngine

    torch.set_num_threads(os.cpu_count() or 1)
    support = cpu_bf16_support()
    gemm = {name: grpo_vs_trl.matmul_rate(gemm_size, dtype=dtype)
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    workload = grpo_vs_trl.WORKLOADS[workload_name]
    work = Path(tempfile.mkdtemp(prefix="bf16_sampling_"))
    atexit.register(shutil.rmtree, work, True)
    params, _ = grpo_vs_trl.make_student(workload, work / "student")
    engines = {dtype: HFEngine(str(work / "student"), RolloutConfig(dtype=dtype)) for dtype in ("float32", "bfloat16")}
    prompts = [row.prompt for row in arithmetic_rows(workload["prompts"], 0)]
    tokens = workload["prompts"] * workload["samples"] * workload["max_new_tokens"]
    seconds: dict[str, list[float]] = {dtype: [] for dtype in engines}
    last = {}
    for _ in range(repeats + 1):  # the first round warms up
        for dtype, engine in engines.items():
            start = time.perf_counter()
            last[dtype] = engine.generate(prompts, workload["samples"], workload["max_new_tokens"], 1.0, False)
            seconds[dtype].append(time.perf_counter() - start)
    rate = {dtype: tokens / statistics.median(s[1:]) for dtype, s in seconds.items()}
    result = {"workload": workload_name, "params_m": round(params / 1e6, 2), **support, "threads": torch.get_num_threads(),
              "gemm_size": gemm_size, "gemm_gflops": {k: round(v, 1) for k, v in gemm.items()},
              "gemm_ratio_bf16": round(gemm["bfloat16"] / gemm["float32"], 2),
              "generate_tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
              "generate_ratio_bf16": round(rate["bfloat16"] / rate["float32"], 2),
              "logprob_mismatch_bf16": round(mismatch(engines["bfloat16"].model, engines["float32"].model,
                                                     last["bfloat16"]), 5)}
    log(f"CPU: {support['cpu']}; bf16-relevant flags: {', '.join(support['bf16_flags']) or 'none'}; "
        f"{result['threads']} threads; {result['params_m']}M-parameter student, {tokens} tokens per generate")
    log(f"{'':<10}{'GEMM GFLOP/s':>14}{'gen tokens/s':>14}")
    for dtype in engines:
        log(f"{dtype:<10}{gemm[dtype]:>14.1f}{rate[dtype]:>14.1f}")
    log(f"bf16/fp32: GEMM {result['gemm_ratio_bf16']}x, generation {result['generate_ratio_bf16']}x; bf16 log-prob "
        f"mismatch {result['logprob_mismatch_bf16']} (mean |bf16 - fp32| per token)")
    return result


def main() -> None:
    import grpo_vs_trl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(grpo_vs_trl.WORKLOADS), default="medium")
    parser.add_argument("--repeats", type=int, default=3)
    # Without bf16 instructions a bf16 GEMM of 2048 takes most of a minute (converted element by element).
    parser.add_argument("--gemm-size", type=int, default=512)
    args = parser.parse_args()
    print(json.dumps(run(args.workload, args.repeats, args.gemm_size, log=lambda line: print(line, flush=True))))


if __name__ == "__main__":
    main()
