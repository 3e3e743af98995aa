"""What a run will need in memory, from the model's shape and the run's settings, before anything is loaded.

The estimate is per process: a policy trainer rank (weights, gradients, Adam state, a reference copy when the KL
needs one and LoRA does not stand in for it, activations of one micro-batch) and a rollout worker (weights, KV
cache). It is an estimate, not an account: it leaves out the CUDA context, allocator slack and Python/Ray overheads
(a few hundred MB per process), so a run it passes can still be tight, but one it refuses cannot fit.

Activations per token and layer are taken as what a transformer block keeps for its backward pass: the block's
input and normed input, q, k, v and the attention output, the MLP's normed input, gate, up, their product and the
activation (3 * hidden + 2 * q_dim + 2 * kv_dim + 4 * intermediate values), plus the float32 logits, their
temperature-scaled copy and log-softmax (3 * vocab). Gradient checkpointing keeps one hidden vector per layer and
one block's worth.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhf.core.config.run_config import ConfigError, RunConfig

GiB = 1024 ** 3
ADAM_STATES = 2  # exp_avg and exp_avg_sq, float32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        return cls(vocab=config["vocab_size"], hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   intermediate=config["intermediate_size"], tied=bool(config.get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one layer (Qwen2/Llama names)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def parameters(self) -> int:
        """Weights (biases and norms' few values per layer included only as the norms: 2 per layer + 1)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * per_layer + self.hidden

    def lora_parameters(self, r: int, target_modules: list[str]) -> int:
        """Adapter weights: r * (in + out) for every targeted projection of every layer."""
        shapes = self.linear_shapes()
        return self.layers * sum(r * sum(shapes[name]) for name in target_modules if name in shapes)

    def activation_values_per_token(self, checkpointing: bool) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        block = 3 * self.hidden + 2 * q + 2 * kv + 4 * self.intermediate
        layers = self.layers * self.hidden + block if checkpointing else self.layers * block
        return layers


@dataclass(frozen=True)
class RoleMemory:
    """Bytes one process of a role needs, by kind; ``host`` of them live in host memory on a GPU machine
    (offloaded), the rest on the process's device."""

    weights: int
    gradients: int
    optimizer: int
    reference: int
    activations: int
    kv_cache: int = 0
    host: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.reference + self.activations + self.kv_cache


def trainer_rank_memory(shape: ModelShape, *, ranks: int, zero_stage: int, lora_r: int | None,
                        lora_targets: list[str], bf16: bool, kl_reference: bool, micro_batch_tokens: int,
                        checkpointing: bool, offload: str = "none") -> RoleMemory:
    """One policy trainer rank. ZeRO-2 partitions gradients and optimizer state across ranks, ZeRO-3 weights too;
    with LoRA only the adapters have gradients and optimizer state, and the reference is the same weights."""
    params = shape.parameters()
    trainable = shape.lora_parameters(lora_r, lora_targets) if lora_r else params
    width = 2 if bf16 else 4
    weights = params * width + (trainable * width if lora_r else 0)
    if zero_stage == 3:
        weights //= ranks
    gradients = trainable * width // ranks
    # bf16 training keeps a float32 master copy of what trains beside Adam's two moments.
    optimizer = trainable * 4 * (ADAM_STATES + (1 if bf16 else 0)) // ranks
    reference = params * width if kl_reference and not lora_r else 0
    logits = 3 * shape.vocab * 4  # float32 logits, scaled copy, log-softmax
    activations = micro_batch_tokens * (shape.activation_values_per_token(checkpointing) * width + logits)
    host = optimizer if offload != "none" else 0
    if offload == "optimizer+params":
        host += weights
    return RoleMemory(weights, gradients, optimizer, reference, activations, host=host)


def rollout_worker_memory(shape: ModelShape, *, rows: int, tokens_per_row: int) -> RoleMemory:
    """One rollout worker (the hf engine): float32 weights, the KV cache of its rows at full length (float32) and
    one step's logits."""
    kv_cache = 2 * shape.layers * shape.kv_heads * shape.head_dim * rows * tokens_per_row * 4
    return RoleMemory(shape.parameters() * 4, 0, 0, 0, rows * shape.vocab * 4, kv_cache=kv_cache)


def model_shape(cfg: RunConfig, vocab: int) -> ModelShape | None:
    """The policy's shape: from its config.json, or from the model.* sizes of a student built at start (``vocab``:
    its tokenizer's size). None when the directory has no readable config.json (the model check reports that)."""
    m = cfg.model
    if m.model_name_or_path:
        try:
            return ModelShape.from_hf_config(json.loads((Path(m.model_name_or_path) / "config.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return ModelShape(vocab=vocab, hidden=m.hidden_size, layers=m.num_layers, heads=m.num_heads,
                      kv_heads=m.num_kv_heads, head_dim=m.hidden_size // m.num_heads,
                      intermediate=m.intermediate_size, tied=True)


def run_estimate(cfg: RunConfig, shape: ModelShape, prompt_tokens: int) -> dict[str, RoleMemory]:
    """Per-process memory of the trainer ranks and rollout workers of ``cfg``, rows at ``prompt_tokens`` +
    rollout.max_new_tokens tokens."""
    t, r, lora = cfg.trainer, cfg.rollout, cfg.model.lora
    tokens_per_row = prompt_tokens + r.max_new_tokens
    rows_per_rank = cfg.rollout_rows // t.mini_batches_per_step // t.num_ranks
    trainer = trainer_rank_memory(
        shape, ranks=t.num_ranks, zero_stage=t.zero_stage, lora_r=lora.r if lora else None,
        lora_targets=lora.target_modules if lora else [], bf16=t.bf16, kl_reference=cfg.algorithm.kl_coef > 0,
        micro_batch_tokens=min(t.micro_batch_size, max(rows_per_rank, 1)) * tokens_per_row,
        checkpointing=t.gradient_checkpointing, offload=t.offload)
    rollout = rollout_worker_memory(shape, rows=cfg.rollout_rows // r.num_workers, tokens_per_row=tokens_per_row)
    return {"trainer rank": trainer, "rollout worker": rollout}


def describe(estimate: dict[str, RoleMemory]) -> str:
    parts = []
    for role, m in estimate.items():
        kinds = [f"{name} {_size(value)}" for name, value in (
            ("weights", m.weights), ("grads", m.gradients), ("optimizer", m.optimizer), ("reference", m.reference),
            ("activations", m.activations), ("kv cache", m.kv_cache)) if value]
        parts.append(f"{role} {_size(m.total)} ({', '.join(kinds)})")
    return "memory estimate per process: " + "; ".join(parts)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def refuse_if_too_big(cfg: RunConfig, estimate: dict[str, RoleMemory], host_bytes: int | None,
                      gpu_bytes: int | None) -> None:
    """Raise a one-line ConfigError when the run cannot fit: with GPUs, a trainer rank's device share above one
    GPU's memory; without, every trainer rank and rollout worker together above the host's memory (``host_bytes``;
    None: unknown, e.g. actors on other nodes)."""
    trainer, rollout = estimate["trainer rank"], estimate["rollout worker"]
    fixes = ("set model.lora (adapters only), trainer.zero_stage=3 over more ranks, a smaller "
             "trainer.micro_batch_size, trainer.gradient_checkpointing, or shorter rows")
    if gpu_bytes is not None and trainer.total - trainer.host > gpu_bytes:
        raise ConfigError(f"a trainer rank needs about {(trainer.total - trainer.host) / GiB:.1f} GiB of GPU memory "
                          f"and a GPU has {gpu_bytes / GiB:.1f} GiB: {fixes}")
    if gpu_bytes is None and host_bytes is not None:
        need = cfg.trainer.num_ranks * trainer.total + cfg.rollout.num_workers * rollout.total
        if need > host_bytes:
            raise ConfigError(f"{cfg.trainer.num_ranks} trainer rank(s) and {cfg.rollout.num_workers} rollout "
                              f"worker(s) need about {need / GiB:.1f} GiB and this host has "
                              f"{host_bytes / GiB:.1f} GiB of memory: {fixes}")


def host_memory_bytes() -> int | None:
    """The host's RAM (MemTotal in /proc/meminfo, Linux); None where it cannot be read. Total, not available: what
    other processes hold right now changes by the minute, and a refusal must mean the run cannot fit at all."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_run_memory(cfg: RunConfig, tokenizer, prompts: list[str]) -> str:
    """The estimate line printed at start; raises ConfigError (one line) if the run cannot fit, before any model
    is loaded. Prompts are measured by the longest of the first 256 (or task.max_prompt_tokens)."""
    import torch

    shape = model_shape(cfg, len(tokenizer))
    if shape is None:
        return "memory estimate: unknown (no readable config.json)"
    prompt_tokens = cfg.task.max_prompt_tokens or max(
        (len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts[:256]), default=0)
    estimate = run_estimate(cfg, shape, prompt_tokens)
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    host = host_memory_bytes() if cfg.cluster.address == "local" else None
    refuse_if_too_big(cfg, estimate, host, gpu)
    return describe(estimate)
