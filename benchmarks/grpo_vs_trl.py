"""GRPO throughput, distilrl against TRL's GRPOTrainer on the same work, alternating step by step in one process.

    python benchmarks/grpo_vs_trl.py [--workload small|medium|realistic] [--steps 6] [--warmup 2] [--quick]

Both sides get the same Qwen2 student (saved once, loaded by both), the same character tokenizer, the same
arithmetic prompts, the same verifier reward (reward.scoring.verifiers), samples per prompt, max new tokens, temperature,
learning rate (AdamW, grad-norm clip 1), token-mean loss, no KL term (TRL's beta 0; our kl_coef 0), fp32 weights
for training. Two kinds of workload:

- forced length (small, medium; engine for engine): a randomly initialised student, and every response exactly
  ``max_new_tokens`` long on both sides: the student's generation config and TRL's ``generation_kwargs`` set
  ``min_new_tokens = max_new_tokens`` (end-of-sequence is suppressed until then), so both do the same number of
  token-steps however the policy drifts.
- realistic: the quickstart's warmed-up student (configs/quickstart_verifier.yaml's model and warm-up, run once by
  ``rlhf.Trainer.warmup`` and kept in ``--warm-dir``), its rollout shape (32 prompts x 8 samples, 56 new tokens,
  temperature 0.7), natural response lengths (rows stop at end-of-sequence) and the verifier's real reward
  distribution. What each side does with that (our padding-free packing, leaving rows without signal out of the
  update; generation stopping when every row has finished, on both) counts, as it would for a user.

Each side samples and trains at its best precision on this CPU: bf16 where a bf16 GEMM through torch is faster
than fp32 (AVX512-BF16 or AMX), else fp32 (TRL ``bf16=True`` then, our ``rollout.dtype: bfloat16`` and
``trainer.precision: bf16``, autocast over float32 master weights); the GEMM rates and the choice are printed.

distilrl runs its real path (``rlhf.Trainer``: a RolloutWorker actor, a RewardWorker actor, DeepSpeed ZeRO-2
trainer ranks in Ray actors, weights to the rollout worker after every update); TRL runs ``GRPOTrainer`` on the
CPU (``use_cpu``, fp32, no vLLM, no gradient checkpointing, beta 0). TRL's loop drives the alternation: a callback
times each TRL optimizer step (generation included) and then runs one distilrl step. The first ``--warmup`` steps
of each are dropped; medians over the rest are reported.

Hardware limit: a large fp32 GEMM through torch (2 threads) gives the machine's matmul rate; model-FLOPs
utilisation (MFU) of our phases is counted as 6 * params * tokens for training (forward and backward over prompt
and response tokens) and 2 * params * tokens for generation (every prompt and generated token), attention's own
FLOPs left out; params counts the tied embedding once (as the output projection). Training is timed on one extra
update over a whole batch with signal in every row (synchronous: its second call, the first warms the allocator): the
benchmark's steps leave out the rows without any.

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf.core.config.run_config import RolloutConfig  # noqa: E402

WORKLOADS = {
    # hidden, layers, heads, kv heads, MLP width; prompts x samples = completions per step; new tokens each
    "small": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512,
              "prompts": 4, "samples": 4, "max_new_tokens": 32},
    "medium": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 2048,
               "prompts": 8, "samples": 8, "max_new_tokens": 128},
    # For the test that keeps this script working: seconds, not minutes.
    # configs/quickstart_verifier.yaml's model and rollout, from its warmed-up student (warm_student); lengths not forced.
    "realistic": {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512,
                  "prompts": 32, "samples": 8, "max_new_tokens": 56, "temperature": 0.7, "warm": True},
    "quick": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
              "prompts": 2, "samples": 2, "max_new_tokens": 4},
}
LR = 1e-5
SEED = 0
# Our rollout engine unless --engine says otherwise: the config's own default.
DEFAULT_ENGINE = RolloutConfig().engine


def matmul_rate(size: int = 2048, repeats: int = 5, dtype=None) -> float:
    """GFLOP/s of a square GEMM through torch on this process's threads (median of ``repeats``)."""
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # first call pays for allocation and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def warm_student(cache_dir: Path, overrides: tuple[str, ...] = ()) -> Path:
    """The quickstart's warmed-up student: the model and warm-up of configs/quickstart_verifier.yaml (the
    quickstart's, rewarded by the verifier), run in this process by ``rlhf.Trainer.warmup`` as the quickstart runs
    it, written once to ``cache_dir/warmup`` and reused after."""
    import rlhf
    from rlhf.core.config.run_config import load_config

    student = cache_dir / "warmup"
    if not (student / "model.safetensors").is_file():
        cfg = load_config(str(ROOT / "configs" / "quickstart_verifier.yaml"),
                          [f"output_dir={cache_dir}", "stages=[warmup]", *overrides])
        with rlhf.Trainer(cfg, log=lambda line: None) as trainer:
            trainer.warmup()
    return student


def make_student(workload: dict, out_dir: Path, warm_dir: Path | None = None) -> tuple[int, object]:
    """The shared student saved to ``out_dir`` (a realistic workload's: the warmed-up student from ``warm_dir``,
    natural lengths; else random weights with a fixed-length generation config); returns its parameter count and
    tokenizer."""
    from rlhf.core.config.run_config import ModelConfig
    from rlhf.core.models.build import build_student, build_tokenizer, load_student, save_student

    if workload.get("warm"):
        student, tokenizer = load_student(warm_student(warm_dir))
        save_student(student, tokenizer, out_dir)
        return sum(p.numel() for p in student.parameters()), tokenizer
    tokenizer = build_tokenizer("char")
    model_cfg = ModelConfig(**{k: workload[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                         "intermediate_size")}, max_position_embeddings=256)
    student = build_student(model_cfg, tokenizer, SEED)
    # Fixed response length on our side: generate() reads these defaults from the saved generation config.
    student.generation_config.min_new_tokens = workload["max_new_tokens"]
    student.generation_config.max_new_tokens = workload["max_new_tokens"]
    save_student(student, tokenizer, out_dir)
    return sum(p.numel() for p in student.parameters()), tokenizer


def prompt_dataset(count: int):
    import datasets

    from rlhf.core.data.datasets import arithmetic_rows

    return datasets.Dataset.from_list([{"prompt": r.prompt, "answer": r.answer} for r in arithmetic_rows(count, SEED)])


def verifier_reward(prompts, completions, answer, **_) -> list[float]:
    """TRL's reward function: our verifier, 1.0 for a correct final number, else 0.0 (as reward.scoring.worker scores it)."""
    from reward.scoring.verifiers import final_number_correct

    return [1.0 if final_number_correct(c, a) else 0.0 for c, a in zip(completions, answer)]


def signal_batch(tokenizer, prompts: list[str], response_tokens: int):
    """A TrainBatch shaped like a step's (these prompts, responses of ``response_tokens`` random tokens) with a
    nonzero advantage in every row, so no row is left out of the update."""
    import torch

    from rlhf.core.data.batch import make_train_batch
    from rlhf.core.data.samples import Sample

    g = torch.Generator().manual_seed(SEED)
    samples = [Sample(i, tokenizer(p, add_special_tokens=False).input_ids,
                      torch.randint(3, len(tokenizer), (response_tokens,), generator=g).tolist(),
                      [-1.0] * response_tokens, "length", "") for i, p in enumerate(prompts)]
    advantages = torch.randn(len(samples), generator=g) + 0.1  # never exactly 0
    return make_train_batch(samples, advantages, tokenizer.pad_token_id, "token-mean", response_tokens)


def timing_calls(method, times: list[float]):
    """``method``, appending the seconds of each call to ``times`` (TRL's generation and scoring, once per step)."""

    def call(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return result

    return call


def ours_config(workload: dict, student_dir: Path, out_dir: Path, steps: int, ranks: int, bf16: bool,
                engine: str = DEFAULT_ENGINE, asynchronous: bool = False):
    from rlhf.core.config.run_config import RunConfig

    rows = workload["prompts"] * workload["samples"]
    # One-step-off asynchronous rollout as configs/quickstart_verifier.yaml's async runs it best on 2 cores
    # (benchmarks/RESULTS.md, async_vs_sync): one rollout thread beside the trainer, which yields to it.
    rollout_threads = 1 if asynchronous else os.cpu_count() or 1
    return RunConfig(
        output_dir=str(out_dir), seed=SEED, stages=["rl"], call_timeout_s=1800,
        model={"model_name_or_path": str(student_dir)},
        task={"train_prompts": 512, "eval_prompts": 8},
        rollout={"engine": engine, "num_workers": 1, "prompts_per_step": workload["prompts"], "samples_per_prompt": workload["samples"],
                 "max_new_tokens": workload["max_new_tokens"], "threads": rollout_threads, "asynchronous": asynchronous,
                 "temperature": workload.get("temperature", 1.0), "dtype": "bfloat16" if bf16 else "float32"},
        trainer={"num_ranks": ranks, "zero_stage": 2, "lr": LR, "micro_batch_size": rows // ranks,
                 "threads": max(1, (os.cpu_count() or 1) // ranks), "precision": "bf16" if bf16 else "fp32"},
        # tis_cap stays off in both precisions: TRL runs no importance-sampling correction on this path either.
        algorithm={"steps": steps, "kl_coef": 0.0, "loss_aggregation": "token-mean", "tis_cap": None},
    )


def trl_config(workload: dict, out_dir: Path, steps: int, bf16: bool):
    from trl import GRPOConfig

    rows = workload["prompts"] * workload["samples"]
    return GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=bf16, fp16=False, gradient_checkpointing=False, use_vllm=False,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=SEED,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_generations=workload["samples"],
        max_completion_length=workload["max_new_tokens"],
        generation_kwargs={} if workload.get("warm") else {"min_new_tokens": workload["max_new_tokens"]},
        temperature=workload.get("temperature", 1.0), top_k=0, top_p=1.0, beta=0.0, loss_type="dapo", learning_rate=LR, weight_decay=0.0,
        max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, max_steps=steps, num_iterations=1,
        dataloader_num_workers=0,
    )


def run(workload_name: str, steps: int, warmup: int, ranks: int, warm_dir: Path, engine: str = DEFAULT_ENGINE,
        asynchronous: bool = False, log=print) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    import rlhf

    workload = WORKLOADS[workload_name]
    rows = workload["prompts"] * workload["samples"]
    total = steps + warmup
    torch.set_num_threads(os.cpu_count() or 1)
    rate_before = matmul_rate()
    # Each side's best precision on this CPU: bf16 only where its GEMM beats fp32's (AVX512-BF16 / AMX).
    bf16_rate = matmul_rate(512, 3, dtype=torch.bfloat16)  # small: without bf16 hardware it runs at ~0.5 GFLOP/s
    bf16 = bf16_rate > matmul_rate(512, 3)
    work = Path(tempfile.mkdtemp(prefix="grpo_vs_trl_"))
    atexit.register(shutil.rmtree, work, True)  # the saved students and run dirs are scratch
    params, tokenizer = make_student(workload, work / "student", warm_dir)
    dataset = prompt_dataset(512)
    lengths = "up to" if workload.get("warm") else "exactly"
    log(f"workload {workload_name}: {params / 1e6:.2f}M parameters, {workload['prompts']} prompts x "
        f"{workload['samples']} samples = {rows} completions of {lengths} {workload['max_new_tokens']} tokens per "
        f"step; our engine {engine}; {warmup} warm-up + {steps} timed steps each, "
        f"{'TRL first, then ours (asynchronous rollout)' if asynchronous else 'alternating'}; matmul "
        f"{rate_before:.0f} GFLOP/s fp32, {bf16_rate:.0f} bf16: both sides sample in {'bf16' if bf16 else 'fp32'}")

    ours_steps: list[dict] = []
    trl_times: list[float] = []
    trl_generate_times: list[float] = []
    trl_logs: list[dict] = []

    with rlhf.Trainer(ours_config(workload, work / "student", work / "ours", total, ranks, bf16, engine, asynchronous),
                      train_dataset=dataset, log=lambda line: None) as ours:

        def our_step() -> None:
            start = time.perf_counter()
            metrics = ours.step()
            metrics["wall_s"] = time.perf_counter() - start
            ours_steps.append(metrics)
            log(f"distilrl step {len(ours_steps)}/{total}: {metrics['wall_s']:.2f} s (generate "
                f"{metrics['perf/generate_s']:.2f}, train {metrics.get('perf/train_s', 0):.2f})")

        class Alternate(TrainerCallback):
            """Times each TRL optimizer step (generation included), then runs one distilrl step (synchronous
            rollout; an asynchronous one would keep generating in the background through TRL's next step)."""

            def on_step_begin(self, args, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                trl_times.append(time.perf_counter() - self.start)
                log(f"TRL step {len(trl_times)}/{total}: {trl_times[-1]:.2f} s (generate {trl_generate_times[-1]:.2f})")
                if not asynchronous:
                    our_step()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "reward" in logs:
                    trl_logs.append(logs)

        # The same weights and tokenizer as ours (the saved student); TRL keeps its generation settings in its own
        # config, so min_new_tokens goes in through generation_kwargs.
        model = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32, use_safetensors=True)
        trl = GRPOTrainer(model=model, reward_funcs=verifier_reward, args=trl_config(workload, work / "trl", total, bf16),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[Alternate()])
        trl.remove_callback(PrinterCallback)  # its per-step dicts would bury the table
        trl._generate_and_score_completions = timing_calls(trl._generate_and_score_completions, trl_generate_times)
        trl.train()
        if asynchronous:
            # Our steps after TRL's, every row trained: rows without signal go through forward and backward as
            # TRL's do, so the step is the engine-for-engine figure as it runs, overlap included.
            ours._rl_loop().policy.skip_zero_advantage_rows = False
            for _ in range(total):
                our_step()
        # Training MFU is measured on one update over a whole batch with signal in every row: the steps above
        # leave out the rows whose advantage is 0, nearly all of them with a random student.
        # Synchronous, timed on its second call: the first pays for allocating the larger activations, as each
        # side's warm-up steps do (asynchronous, every step already trained a whole batch).
        batch = signal_batch(tokenizer, dataset["prompt"][:rows],
                             round(statistics.median(m["charts/response_tokens"] for m in ours_steps)))
        if not asynchronous:
            ours._rl_loop().policy.train_step(batch)
        full_batch_train_s = ours._rl_loop().policy.train_step(batch)["perf/train_s"]
    rate_after = matmul_rate()
    rate = statistics.median([rate_before, rate_after])

    timed = ours_steps[warmup:]
    ours_s = statistics.median(m["wall_s"] for m in timed)
    trl_s = statistics.median(trl_times[warmup:])
    phase = {name: statistics.median(m.get(f"perf/{name}_s", 0.0) for m in timed)
             for name in ("generate", "score", "train", "sync")}
    phase["reference"] = 0.0  # no KL term (beta 0), so no reference model runs; with one it is inside train
    phase["idle"] = max(0.0, ours_s - sum(phase.values()))
    trl_generate_s = statistics.median(trl_generate_times[warmup:total])
    response_tokens = statistics.median(m["charts/response_tokens"] for m in timed)
    mean_prompt = statistics.mean(len(tokenizer(p, add_special_tokens=False).input_ids) for p in dataset["prompt"])
    tokens = rows * (mean_prompt + response_tokens)
    train_flops, gen_flops = 6 * params * tokens, 2 * params * tokens
    result = {
        "workload": workload_name,
        "params_m": round(params / 1e6, 3),
        "completions_per_step": rows,
        "max_new_tokens": workload["max_new_tokens"],
        "steps": steps,
        "trainer_ranks": ranks,
        "lengths": "natural" if workload.get("warm") else "forced",
        "distilrl_engine": engine,
        "asynchronous": asynchronous,
        "precision": {"distilrl_rollout": "bf16" if bf16 else "fp32",
                      "distilrl_train": "bf16 autocast (trainer.precision)" if bf16 else "fp32",
                      "trl": "bf16 (bf16=True)" if bf16 else "fp32 (bf16=False)"},
        "matmul_bf16_gflops": round(bf16_rate, 1),
        "distilrl_completions_per_s": round(rows / ours_s, 2),
        "trl_completions_per_s": round(rows / trl_s, 2),
        "ratio": round(trl_s / ours_s, 3),
        # Engine for engine: our step as if every row had signal, its train phase replaced by the full-batch update.
        "ratio_if_every_row_trained": round(trl_s / (ours_s if asynchronous else
                                                     ours_s - phase["train"] + full_batch_train_s), 3),
        "distilrl_step_s": round(ours_s, 3),
        "trl_step_s": round(trl_s, 3),
        "phase_s": {k: round(v, 3) for k, v in phase.items()},
        # TRL's generation and scoring (_generate_and_score_completions), and the rest of its step (the update).
        "trl_phase_s": {"generate": round(trl_generate_s, 3), "train": round(trl_s - trl_generate_s, 3)},
        "matmul_gflops": round(rate, 1),
        "train_full_batch_s": round(full_batch_train_s, 3),
        "train_mfu": round(train_flops / full_batch_train_s / 1e9 / rate, 3),
        # Asynchronous, the generate phase is only the wait the overlap left: no generation rate to take from it.
        "generate_mfu": (round(gen_flops / phase["generate"] / 1e9 / rate, 3)
                         if phase["generate"] and not asynchronous else None),
        "distilrl_reward_first_last": [round(ours_steps[0]["reward/mean"], 3), round(ours_steps[-1]["reward/mean"], 3)],
        "trl_reward_first_last": ([round(trl_logs[0]["reward"], 3), round(trl_logs[-1]["reward"], 3)]
                                  if trl_logs else None),
        "distilrl_reward_median": round(statistics.median(m["reward/mean"] for m in timed), 3),
        "trl_reward_median": (round(statistics.median(float(g["reward"]) for g in trl_logs[warmup:]), 3)
                              if trl_logs[warmup:] else None),
        "response_tokens": response_tokens,
        "trl_response_tokens": (round(statistics.median(float(g.get("completions/mean_length", 0.0))
                                                        for g in trl_logs[warmup:]), 1) if trl_logs[warmup:] else None),
        # Rows our trainer left out of the update because their advantage was 0 everywhere (a group all right or all
        # wrong: their gradient is exactly 0); TRL runs them through forward and backward.
        "distilrl_skipped_rows": statistics.median(m.get("perf/skipped_rows", 0.0) for m in timed),
    }
    return result


def print_table(r: dict) -> None:
    print(f"\n{'':<22}{'distilrl':>12}{'TRL':>12}")
    print(f"{'completions/s':<22}{r['distilrl_completions_per_s']:>12.2f}{r['trl_completions_per_s']:>12.2f}")
    print(f"{'step s (median)':<22}{r['distilrl_step_s']:>12.3f}{r['trl_step_s']:>12.3f}")
    print(f"{'reward first/last':<22}{r['distilrl_reward_first_last']!s:>12}{r['trl_reward_first_last']!s:>12}")
    print(f"{'reward (median)':<22}{r['distilrl_reward_median']!s:>12}{r['trl_reward_median']!s:>12}")
    print(f"{'response tokens':<22}{r['response_tokens']:>12.1f}{r['trl_response_tokens'] or 0:>12.1f}"
          f"   ({r['lengths']} lengths; ours: median of the step's mean, TRL: completions/mean_length)")
    schedule = "async" if r["asynchronous"] else "sync"
    print(f"{'rollout engine':<22}{r['distilrl_engine'] + ', ' + schedule:>12}{'generate':>12}")
    print(f"{'sampling precision':<22}{r['precision']['distilrl_rollout']:>12}{r['precision']['trl'][:4]:>12}"
          f"   (GEMM fp32 {r['matmul_gflops']:.0f}, bf16 {r['matmul_bf16_gflops']:.0f} GFLOP/s)")
    if r["asynchronous"]:
        print(f"ratio distilrl/TRL: {r['ratio']:.2f}x (every row trained; TRL's steps ran first, then ours)")
    else:
        print(f"ratio distilrl/TRL: {r['ratio']:.2f}x ({r['ratio_if_every_row_trained']:.2f}x if every row were "
              f"trained: the step's train phase replaced by the full-batch update)")
    split = ", ".join(f"{k} {v:.3f}" for k, v in r["phase_s"].items())
    print(f"distilrl step split (s): {split}")
    print(f"TRL step split (s): generate and score {r['trl_phase_s']['generate']:.3f}, "
          f"update {r['trl_phase_s']['train']:.3f}")
    print(f"distilrl rows left out of the update (advantage 0, no gradient), median: "
          f"{r['distilrl_skipped_rows']:.0f} of {r['completions_per_step']}")
    print(f"matmul {r['matmul_gflops']:.0f} GFLOP/s fp32; MFU train {r['train_mfu']} (one update on a whole batch "
          f"with signal: {r['train_full_batch_s']:.2f} s), generate {r['generate_mfu']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    parser.add_argument("--steps", type=int, default=6, help="timed steps on each side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first on each side")
    parser.add_argument("--ranks", type=int, default=1, help="distilrl trainer ranks (threads split among them)")
    parser.add_argument("--quick", action="store_true", help="the tiny workload, 1 warm-up + 1 step: a smoke test")
    parser.add_argument("--engine", default=DEFAULT_ENGINE, help=f"our rollout.engine (default {DEFAULT_ENGINE}, "
                        "the config's; hf: Hugging Face generate, as TRL samples)")
    parser.add_argument("--asynchronous", action="store_true",
                        help="our one-step-off asynchronous rollout (one rollout thread), every row trained; the "
                             "sides then run one after the other (TRL's steps first) instead of alternating")
    parser.add_argument("--warm-dir", type=Path, default=ROOT / "runs" / "grpo_vs_trl_warm",
                        help="where the realistic workload's warmed-up student is made once and reused "
                             "(default runs/grpo_vs_trl_warm)")
    args = parser.parse_args()
    if args.quick:
        args.workload, args.steps, args.warmup = "quick", 1, 1
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    from rlhf.cli import _quiet_libraries

    _quiet_libraries()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    result = run(args.workload, args.steps, args.warmup, args.ranks, args.warm_dir, args.engine,
                 args.asynchronous, log=lambda line: print(line, flush=True))
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
