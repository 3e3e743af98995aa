"""One colocated RL step of a Qwen2.5-0.5B-shaped random student in bf16 on one GPU, checked: rollout tokens/s,
training MFU against the GPU's bf16 peak, weight-sync seconds, peak memory. Run through
``benchmarks/gpu_smoke.sh`` (which checks for a GPU and vLLM first and runs the vllm engine tests).

    python benchmarks/gpu_smoke.py [--engine hf|hf_compact|vllm] [--prompts 64] [--samples 8] [--new-tokens 256]
                                   [--max-mismatch 0.1] [--tiny]

The step uses the project's own pieces in one process: the rollout engine ``--engine`` names (rollout/engines.py;
bf16 weights, on the one GPU beside the trainer; vLLM first, at 30% of the memory, asleep between rollouts) samples
``prompts x samples`` responses of up to ``new_tokens`` tokens, the verifier scores them, a ``PolicyTrainer`` rank
(DeepSpeed ZeRO-2, bf16, world size 1) takes one GRPO update, and its full weights go back into the engine
(``full_state_dict`` then ``load_weights``: the object-store route, tied embeddings included). Then the engine
samples again and the trainer scores those tokens. It fails (exit 1) on a non-finite loss, a log-prob mismatch
above ``--max-mismatch`` before the update, or a gap above it after the sync. MFU counts 6 * params * tokens
(attention's own FLOPs left out) against the GPU's nominal dense bf16 peak (a table of known parts; else a measured
large bf16 GEMM). ``--tiny`` runs a toy shape on whatever device there is (a CPU check of this script).

Prints a table, then one JSON object as the last line (versions and driver, the figures, the checks).
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151,936, tied embeddings).
QWEN2_5_0_5B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                "intermediate_size": 4864, "vocab_size": 151936}
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64, "vocab_size": 1024}
# Nominal dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A10": 125.0, "L4": 121.0, "4090": 165.0}


def bf16_peak(device) -> tuple[float, str]:
    """(TFLOP/s, where the figure came from) for this GPU."""
    import torch

    name = torch.cuda.get_device_name(device)
    for part, peak in BF16_PEAK_TFLOPS.items():
        if part in name:
            return peak, f"nominal ({name})"
    size = 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(device)
    return 2 * size**3 * 10 / (time.perf_counter() - start) / 1e12, f"measured bf16 GEMM ({name})"


def versions() -> dict:
    """Library versions and the GPU driver, for the JSON line."""
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("vllm", "deepspeed", "transformers", "ray"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if torch.cuda.is_available():
        import subprocess

        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=False)
        out["driver"] = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None
    return out


def check_results(r: dict, max_mismatch: float) -> list[str]:
    """What the step got wrong (empty: passed): a non-finite loss, a train/rollout log-prob mismatch above
    ``max_mismatch`` (bf16 sampler against the trainer, before the update), or rollout log-probs after the sync
    further than that from the trainer's own on the same tokens (the sync did not carry the update)."""
    failures = []
    if not math.isfinite(r["loss"]):
        failures.append(f"loss is {r['loss']}")
    if not r["logprob_mismatch"] <= max_mismatch:
        failures.append(f"log-prob mismatch {r['logprob_mismatch']} above {max_mismatch}")
    if not r["post_sync_logprob_gap"] <= max_mismatch:
        failures.append(f"after the sync the rollout's log-probs are {r['post_sync_logprob_gap']} from the "
                        f"trainer's (bound {max_mismatch})")
    return failures


def _student(shape: dict, work: Path, tokenizer, new_tokens: int, log) -> int:
    """Save a random Qwen2-shaped student (tied embeddings, as Qwen2.5-0.5B) to work/student; its parameters."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    start = time.perf_counter()
    student = Qwen2ForCausalLM(config)
    # Every response exactly new_tokens long with the hf engines (vLLM does not read this; a random student over a
    # 151k vocabulary almost never draws end-of-sequence anyway).
    student.generation_config.min_new_tokens = new_tokens
    params = sum(p.numel() for p in student.parameters())
    student.save_pretrained(work / "student")
    tokenizer.save_pretrained(work / "student")
    log(f"student: {params / 1e6:.0f}M parameters (tied embeddings), built and saved in "
        f"{time.perf_counter() - start:.1f} s")
    return params


def _rollout_gap(trainer, samples, pad_id: int, new_tokens: int) -> float:
    """Mean |rollout log-prob - trainer log-prob| over the response tokens of ``samples`` (the trainer scores
    them now, at the sampling temperature)."""
    import torch

    from rlhf.core.data.batch import make_train_batch

    zeros = torch.zeros(len(samples))
    batch = make_train_batch(samples, zeros, pad_id, "token-mean", new_tokens)
    mask = batch.response_mask.bool()
    trainer_lp = trainer._logprobs(batch.inputs())
    return float((trainer_lp - batch.rollout_logprobs)[mask].abs().mean())


def _update_and_sync(trainer, rollout, out, rows, samples: int, new_tokens: int, pad_id: int, sync):
    """One GRPO update on ``out``, its weights into the engine, and the post-sync gap: (metrics, trained tokens,
    sync seconds, gap)."""
    import torch

    from reward.scoring.verifiers import final_number_correct
    from rlhf.core.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs
    from rlhf.core.data.batch import make_train_batch, response_mask

    rewards = torch.tensor([1.0 if final_number_correct(s.text, rows[s.prompt_index].answer) else 0.0 for s in out])
    advantages, _ = ADVANTAGE_ESTIMATORS["grpo"].compute(AdvantageInputs(rewards, response_mask(out), samples))
    # Random rewards of a random student are all 0: advantages of 0 train nothing, so give the rows some.
    if not advantages.abs().sum():
        advantages = torch.randn(advantages.shape, generator=torch.Generator().manual_seed(0))
    batch = make_train_batch(out, advantages, pad_id, "token-mean", new_tokens)
    sync()
    metrics = trainer.train_step(batch)
    sync()
    start = time.perf_counter()
    rollout.load_weights(trainer.full_state_dict())  # the object-store route's transfer, tied embeddings included
    sync()
    sync_s = time.perf_counter() - start
    after = rollout.generate([r.prompt for r in rows[:4]], 2, new_tokens, 1.0, False)
    return metrics, int(batch.attention_mask.sum()), sync_s, _rollout_gap(trainer, after, pad_id, new_tokens)


RECIPE = "configs/recipes/qwen2.5-0.5b_grpo_1gpu.yaml"


def ray_step(student: Path, new_tokens: int, log) -> dict:
    """One step of the real pipeline on the 1-GPU recipe with ``student``: Ray actors on the one GPU, vLLM asleep
    between rollouts, the weights by vLLM's CUDA IPC transfer, the trainer offloading in turn. Its exit status,
    seconds, and the last lines it printed when it failed."""
    import subprocess

    overrides = [f"model.model_name_or_path={student}", "task.name=arithmetic", "task.train_file=null",
                 "task.eval_file=null", "stages=[rl]", "algorithm.steps=1", "rollout.prompts_per_step=8",
                 "rollout.samples_per_prompt=4", f"rollout.max_new_tokens={new_tokens}",
                 f"eval.max_new_tokens={new_tokens}", "task.max_prompt_tokens=64", f"output_dir={student.parent / 'run'}"]
    log(f"ray step: distilrl run {RECIPE} (1 step, colocated, IPC weight transfer)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", RECIPE, *overrides], capture_output=True,
                          text=True, check=False, cwd=Path(__file__).resolve().parent.parent)
    out = {"rc": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if done.returncode:
        out["tail"] = (done.stdout + done.stderr).strip().splitlines()[-5:]
    return out


def run(shape: dict, prompts: int, samples: int, new_tokens: int, micro_batch: int, engine: str = "hf",
        log=print, lr: float = 1e-5, with_ray_step: bool = False) -> dict:
    import torch

    from rlhf.core.config.run_config import RolloutConfig, RunConfig
    from rlhf.core.data.datasets import arithmetic_rows
    from rlhf.core.models.build import build_tokenizer
    from rlhf.rl.ranks.policy import PolicyTrainer
    from rollout.worker import ENGINES

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tokenizer = build_tokenizer("char")  # prompts need only a few ids; the vocabulary size is the config's
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    atexit.register(shutil.rmtree, work, True)  # the saved student is scratch
    params = _student(shape, work, tokenizer, new_tokens, log)
    with socket.socket() as s:  # a free port for the one-rank process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Colocated on the one GPU: vLLM first (it sizes its KV cache from the free memory), asleep between rollouts.
    rollout = ENGINES[engine](str(work / "student"), RolloutConfig(
        engine=engine, dtype="bfloat16" if cuda else "float32", gpu_memory_utilization=0.3,
        sleep_between_rollouts=engine == "vllm", max_model_len=64 + new_tokens))
    trainer = PolicyTrainer(0, 1, "127.0.0.1", port, str(work / "student"), RunConfig(
        trainer={"zero_stage": 2, "bf16": cuda, "lr": lr, "micro_batch_size": micro_batch, "threads": 2},
        algorithm={"kl_coef": 0.0}, rollout={"sleep_between_rollouts": engine == "vllm"}))

    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    rows = arithmetic_rows(prompts, seed=0)
    # One untimed generation of two rows first: CUDA kernels, allocator and cuBLAS handles warm up outside the figures.
    rollout.generate([rows[0].prompt], 2, new_tokens, 1.0, False)
    sync()
    start = time.perf_counter()
    out = rollout.generate([r.prompt for r in rows], samples, new_tokens, 1.0, False)
    sync()
    generate_s = time.perf_counter() - start
    generated = sum(len(s.response_ids) for s in out)

    metrics, train_tokens, sync_s, gap = _update_and_sync(trainer, rollout, out, rows, samples, new_tokens,
                                                          tokenizer.pad_token_id, sync)
    train_s = metrics["perf/train_s"]

    # The in-process engine is asleep and the trainer released: the pipeline's own actors get the GPU.
    ray = ray_step(work / "student", new_tokens, log) if with_ray_step else None
    peak, peak_source = bf16_peak(device) if cuda else (None, "no GPU")
    train_tflops = 6 * params * train_tokens / train_s / 1e12
    return {
        "gpu": cuda, "device": torch.cuda.get_device_name(device) if cuda else "cpu", "engine": engine,
        "params_m": round(params / 1e6, 1), "rollout_rows": len(out), "new_tokens": new_tokens,
        "generate_s": round(generate_s, 2), "rollout_tokens_per_s": round(generated / generate_s, 1),
        "train_s": round(train_s, 2), "train_tokens": train_tokens, "train_tflops": round(train_tflops, 2),
        "bf16_peak_tflops": peak, "peak_source": peak_source,
        "train_mfu": round(train_tflops / peak, 3) if peak else None, "weight_sync_s": round(sync_s, 2),
        "logprob_mismatch": round(metrics["perf/logprob_mismatch"], 4), "loss": metrics["losses/policy_loss"],
        "post_sync_logprob_gap": round(gap, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "vllm_memory_log": getattr(rollout, "memory_log", None), "ray_step": ray,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16, help="trainer rows per forward/backward")
    parser.add_argument("--tiny", action="store_true", help="a toy shape, 2 prompts x 2 samples x 4 tokens")
    parser.add_argument("--engine", default="hf", help="rollout engine: hf, hf_compact or vllm (rollout/engines.py)")
    parser.add_argument("--lr", type=float, default=1e-5, help="the update's learning rate (large enough that the "
                        "post-sync check sees the new weights)")
    parser.add_argument("--max-mismatch", type=float, default=0.1, help="bound on the mean absolute log-prob gap "
                        "between the rollout engine and the trainer, before the update and after the sync (a first "
                        "guess for bf16: no GPU run has set it yet)")
    parser.add_argument("--ray-step", action="store_true", help=f"then one step of {RECIPE} through Ray with the "
                        "saved student (vLLM's CUDA IPC transfer, sleep/wake beside the trainer)")
    parser.add_argument("--tests-rc", type=int, default=None, help="exit status of the vllm engine tests "
                        "gpu_smoke.sh ran first (recorded, and a failure fails the check)")
    args = parser.parse_args()
    from rlhf.cli import _quiet_libraries

    _quiet_libraries()
    shape = TINY if args.tiny else QWEN2_5_0_5B
    if args.tiny:
        args.prompts, args.samples, args.new_tokens, args.micro_batch = 2, 2, 4, 4
    start = time.perf_counter()
    r = run(shape, args.prompts, args.samples, args.new_tokens, args.micro_batch, args.engine,
            log=lambda line: print(line, flush=True), lr=args.lr, with_ray_step=args.ray_step)
    r["wall_s"] = round(time.perf_counter() - start, 1)
    r["versions"] = versions()
    failures = check_results(r, args.max_mismatch)
    if r["ray_step"] and r["ray_step"]["rc"]:
        failures.append(f"the Ray step of {RECIPE} failed (exit {r['ray_step']['rc']})")
    if args.tests_rc is not None:
        r["vllm_tests_rc"] = args.tests_rc
        if args.tests_rc:
            failures.append(f"the vllm engine tests failed (exit {args.tests_rc})")
    r["failures"], r["passed"] = failures, not failures
    print(f"\nrollout ({r['engine']} engine): {r['rollout_rows']} x {r['new_tokens']} tokens in {r['generate_s']} s = "
          f"{r['rollout_tokens_per_s']} tokens/s")
    print(f"train:   {r['train_tokens']} tokens in {r['train_s']} s = {r['train_tflops']} TFLOP/s; "
          f"MFU {r['train_mfu']} "
          f"of {r['bf16_peak_tflops']} TFLOP/s ({r['peak_source']})")
    print(f"weight sync: {r['weight_sync_s']} s; post-sync log-prob gap {r['post_sync_logprob_gap']}; whole run "
          f"{r['wall_s']} s")
    for failure in failures:
        print(f"FAILED: {failure}")
    print(json.dumps(r))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
