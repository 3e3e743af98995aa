"""One RL step of a Qwen2.5-0.5B-shaped random student in bf16 on one GPU: rollout tokens/s, training MFU against
the GPU's bf16 peak, weight-sync seconds. Run through ``benchmarks/gpu_smoke.sh`` (which checks for a GPU first).

    python benchmarks/gpu_smoke.py [--engine hf|vllm] [--prompts 64] [--samples 8] [--new-tokens 256] [--tiny]

The step uses the project's own pieces in one process: the rollout engine ``--engine`` names (rollout/engines.py:
``hf``, HF generate with a KV cache, or ``vllm``; bf16 weights, colocated with the trainer on the one GPU) samples
``prompts x samples`` responses of ``new_tokens`` tokens (end-of-sequence suppressed until then with hf), the verifier scores them, ``rlhf.batch.make_train_batch`` builds the batch, a ``PolicyTrainer`` rank
(DeepSpeed ZeRO-2, bf16, world size 1) takes one GRPO update, and its full weights go back into the rollout engine
(``full_state_dict`` then the engine's ``load_weights``: the object-store route's transfer, without Ray). MFU counts
6 * params * tokens for the update (forward and backward over prompt and response tokens; attention's own FLOPs left
out) against the GPU's nominal dense bf16 peak (a table of known parts; else a measured large bf16 GEMM).
``--tiny`` runs a toy shape on whatever device there is (a CPU check of this script).

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import atexit
import json
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


def run(shape: dict, prompts: int, samples: int, new_tokens: int, micro_batch: int, engine: str = "hf",
        log=print) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from reward.scoring.verifiers import final_number_correct
    from rlhf.core.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs
    from rlhf.core.config.run_config import RunConfig
    from rlhf.core.data.batch import make_train_batch, response_mask
    from rlhf.core.data.datasets import arithmetic_rows
    from rlhf.core.models.build import build_tokenizer
    from rlhf.core.config.run_config import RolloutConfig
    from rlhf.rl.ranks.policy import PolicyTrainer
    from rollout.worker import ENGINES

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tokenizer = build_tokenizer("char")  # prompts need only a few ids; the vocabulary size is the config's
    config = Qwen2Config(**shape, max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    start = time.perf_counter()
    student = Qwen2ForCausalLM(config)
    # Every response exactly new_tokens long with the hf engine (vLLM does not read this; a random student over a
    # 151k vocabulary almost never draws end-of-sequence anyway).
    student.generation_config.min_new_tokens = new_tokens
    params = sum(p.numel() for p in student.parameters())
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    atexit.register(shutil.rmtree, work, True)  # the saved students and run dirs are scratch
    student.save_pretrained(work / "student")
    tokenizer.save_pretrained(work / "student")
    del student
    log(f"student: {params / 1e6:.0f}M parameters, built and saved in {time.perf_counter() - start:.1f} s; device "
        f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}")

    with socket.socket() as s:  # a free port for the one-rank process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trainer = PolicyTrainer(0, 1, "127.0.0.1", port, str(work / "student"), RunConfig(
        trainer={"zero_stage": 2, "bf16": cuda, "lr": 1e-6, "micro_batch_size": micro_batch, "threads": 2},
        algorithm={"kl_coef": 0.0}))
    # The rollout engine beside the trainer on the same GPU (colocated): vLLM takes 30% of its memory.
    rollout = ENGINES[engine](str(work / "student"), RolloutConfig(
        engine=engine, dtype="bfloat16" if cuda else "float32", gpu_memory_utilization=0.3))

    def generate(prompts_, n, tokens):
        return rollout.generate(prompts_, n, tokens, 1.0, False)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    rows = arithmetic_rows(prompts, seed=0)
    # One untimed generation of two rows first: CUDA kernels, allocator and cuBLAS handles warm up outside the figures.
    generate([rows[0].prompt], 2, new_tokens)
    sync()
    start = time.perf_counter()
    out = generate([r.prompt for r in rows], samples, new_tokens)
    sync()
    generate_s = time.perf_counter() - start
    generated = sum(len(s.response_ids) for s in out)

    rewards = torch.tensor([1.0 if final_number_correct(s.text, rows[s.prompt_index].answer) else 0.0 for s in out])
    advantages, _ = ADVANTAGE_ESTIMATORS["grpo"].compute(AdvantageInputs(rewards, response_mask(out), samples))
    batch = make_train_batch(out, advantages, tokenizer.pad_token_id, "token-mean", new_tokens)
    train_tokens = int(batch["attention_mask"].sum())
    sync()
    metrics = trainer.train_step(batch)
    sync()
    train_s = metrics["perf/train_s"]

    start = time.perf_counter()
    rollout.load_weights(trainer.full_state_dict())
    sync()
    sync_s = time.perf_counter() - start

    peak, peak_source = bf16_peak(device) if cuda else (None, "no GPU")
    train_tflops = 6 * params * train_tokens / train_s / 1e12
    return {
        "gpu": cuda,
        "engine": engine,
        "params_m": round(params / 1e6, 1),
        "rollout_rows": len(out),
        "new_tokens": new_tokens,
        "generate_s": round(generate_s, 2),
        "rollout_tokens_per_s": round(generated / generate_s, 1),
        "train_s": round(train_s, 2),
        "train_tokens": train_tokens,
        "train_tflops": round(train_tflops, 2),
        "bf16_peak_tflops": peak,
        "peak_source": peak_source,
        "train_mfu": round(train_tflops / peak, 3) if peak else None,
        "weight_sync_s": round(sync_s, 2),
        "logprob_mismatch": round(metrics["perf/logprob_mismatch"], 4),
        "loss": metrics["losses/policy_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16, help="trainer rows per forward/backward")
    parser.add_argument("--tiny", action="store_true", help="a toy shape, 2 prompts x 2 samples x 4 tokens")
    parser.add_argument("--engine", default="hf", help="rollout engine: hf, hf_compact or vllm (rollout/engines.py)")
    args = parser.parse_args()
    from rlhf.cli import _quiet_libraries

    _quiet_libraries()
    shape = TINY if args.tiny else QWEN2_5_0_5B
    if args.tiny:
        args.prompts, args.samples, args.new_tokens, args.micro_batch = 2, 2, 4, 4
    start = time.perf_counter()
    r = run(shape, args.prompts, args.samples, args.new_tokens, args.micro_batch, args.engine,
            log=lambda line: print(line, flush=True))
    r["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"\nrollout ({r['engine']} engine): {r['rollout_rows']} x {r['new_tokens']} tokens in {r['generate_s']} s = "
          f"{r['rollout_tokens_per_s']} tokens/s")
    print(f"train:   {r['train_tokens']} tokens in {r['train_s']} s = {r['train_tflops']} TFLOP/s; "
          f"MFU {r['train_mfu']} "
          f"of {r['bf16_peak_tflops']} TFLOP/s ({r['peak_source']})")
    print(f"weight sync: {r['weight_sync_s']} s; whole run {r['wall_s']} s")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
