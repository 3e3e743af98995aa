"""The precision the policy update computes in on a CPU (``trainer.precision``), and its model-FLOPs utilisation.

bf16 mixed precision: the weights, gradients and Adam state stay float32 (the master weights), and the forward
and backward run under ``torch.autocast("cpu", bfloat16)``, so matrix products take the CPU's bf16 units where it
has them (AVX512-BF16, AMX: measured about 2x the fp32 GEMM rate). Without them torch emulates bf16 around fp32
kernels and a bf16 GEMM runs far slower than fp32, so ``auto`` trains in bf16 only where /proc/cpuinfo lists
those units; it never assumes. (On a GPU, DeepSpeed's own bf16, ``trainer.bf16``, is the switch; this is CPU only.)

MFU: the update's model FLOPs per second against the GEMM rate of the precision it trains in, measured on the
rank's own threads (``gemm_rate``), so a bf16 update is not flattered by an fp32 yardstick.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

# CPU flags naming bf16 matrix units: AVX512-BF16's dot products, AMX's bf16 tiles.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first processor /proc/cpuinfo lists (empty where there is none)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve_precision(setting: str, flags: set[str], cuda: bool) -> str:
    """fp32 or bf16: what the CPU update computes in for ``setting`` (auto, fp32, bf16) on a CPU with ``flags``.
    ``auto`` is bf16 only with bf16 units; ``bf16`` is honoured as asked (slow without them); on a GPU this is
    fp32 (DeepSpeed's bf16 is the GPU's switch)."""
    if cuda or setting == "fp32":
        return "fp32"
    if setting == "bf16":
        return "bf16"
    return "bf16" if flags & BF16_FLAGS else "fp32"


def autocast(precision: str):
    """The context the forward (and through it the backward) runs in for ``precision``."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def gemm_rate(precision: str, size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of a ``size``-square matrix product in ``precision`` on this process's threads (the best of
    ``repeats`` after one untimed run)."""
    dtype = TORCH_DTYPES[precision]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def update_flops(params: int, trained_tokens: int, lora: bool, forward_tokens: int = 0) -> float:
    """Model FLOPs of a policy update: ``trained_tokens`` (prompt and response, every row trained on, once per
    epoch) through forward (2 x params a token) and backward (4 x; 2 x with LoRA, where the frozen weights need no
    gradient of their own, only the activations' passed back through them), and ``forward_tokens`` through
    forwards without gradient (the reference model's, the old log-probs' pass)."""
    return float((2 + (2 if lora else 4)) * params * trained_tokens + 2 * params * forward_tokens)


def mfu_metrics(flops: float, seconds: float, precision: str, rate: float) -> dict[str, float]:
    """The update's metrics: its MFU against ``rate`` (FLOP/s, of ``precision``), the rate, and which it was."""
    return {"perf/train_mfu": flops / max(seconds, 1e-9) / rate, "perf/train_gemm_gflops": rate / 1e9,
            "perf/train_bf16": float(precision == "bf16")}


def head_params(model: torch.nn.Module) -> int:
    """The parameters of the output head (the vocabulary projection), as ``model_params`` counts them."""
    output = model.get_output_embeddings()
    return 0 if output is None else getattr(output.weight, "ds_numel", output.weight.numel())


def model_params(model: torch.nn.Module) -> int:
    """The parameters a forward multiplies by: all of them (whole under ZeRO-3, whose partitioned parameters carry
    their full size as ``ds_numel``) but an input embedding that is only looked up (one tied to the output layer
    is counted once, as that layer)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    embed, output = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and (output is None or output.weight is not embed.weight):
        total -= getattr(embed.weight, "ds_numel", embed.weight.numel())
    return total
