"""A trainer and a vLLM engine on one GPU, taking turns with its memory (``rollout.sleep_between_rollouts``).

The order peers use (OpenRLHF, veRL): the trainer updates; the new weights go to the engine (its weights awake,
its KV cache still freed); the trainer then moves its optimizer state, gradients and master weights to host memory
and empties PyTorch's cache, so the engine's KV cache can be allocated on wake; after the rollout the engine sleeps
(level 1: weights to host, KV cache freed) and the trainer takes its state back before the next update. Each
transition logs the GPU's free memory (``torch.cuda.mem_get_info``), so an out-of-memory on wake shows who held
what. On a machine without CUDA there is no GPU to share: the trainer keeps its state.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("distilrl")
GiB = 1024 ** 3


def gpu_memory_line(what: str) -> str | None:
    """``what``: free and total GPU memory now, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return f"{what}: GPU memory free {free / GiB:.2f} of {total / GiB:.2f} GiB"


def log_transition(what: str, lines: list[str] | None = None) -> None:
    """Log the GPU's memory at a colocation transition (and append the line to ``lines`` when given)."""
    line = gpu_memory_line(what)
    if line is None:
        return
    logger.info(line)
    if lines is not None:
        lines.append(line)


class ColocatedTrainerMemory:
    """Mixed into a trainer rank (``engine``: its DeepSpeed engine, ``engine_cfg.offload``): ``release_gpu`` before
    the engine on the same GPU wakes, ``reclaim_gpu`` before the next update. Does nothing unless ``colocated``."""

    colocated = False
    _released = False

    def release_gpu(self) -> None:
        if not (self.colocated and torch.cuda.is_available()) or self._released:  # nothing to share on a CPU
            return
        # DeepSpeed's own offload moves the optimizer state already; parameters offloaded by ZeRO-3 cannot be
        # moved again (offload_states refuses them).
        if self.engine_cfg.offload == "none" and hasattr(self.engine, "offload_states"):
            self.engine.offload_states()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._released = True
        log_transition("trainer released the GPU")

    def reclaim_gpu(self) -> None:
        if not self.colocated or not self._released:
            return
        if self.engine_cfg.offload == "none" and hasattr(self.engine, "reload_states"):
            self.engine.reload_states()
        self._released = False
        log_transition("trainer took the GPU back")
