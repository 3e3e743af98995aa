"""The placement and memory plan of a run, without a cluster or a GPU (``distilrl run CONFIG --dry-run``).

What each role's actors ask for (``cluster.<role>``, or the defaults on a cluster with the GPUs the config lays
out), whether trainer and rollout share GPUs, how weights reach the rollout workers (which refusals of
rlhf/core/distributed/cluster.py apply), and the memory each process needs (rlhf/core/models/memory.py). The
policy's shape comes from its config.json, or, for a checkpoint not on this machine, from the Qwen2.5 sizes its
name names (the recipes' placeholders).
"""
from __future__ import annotations

from pathlib import Path

from rlhf.core.config.run_config import RunConfig
from rlhf.core.distributed import cluster
from rlhf.core.models import memory

# Published config.json sizes: (vocab, hidden, layers, heads, kv heads, intermediate, tied embeddings).
QWEN2_5 = {"0.5B": (151936, 896, 24, 14, 2, 4864, True), "1.5B": (151936, 1536, 28, 12, 2, 8960, True),
           "3B": (151936, 2048, 36, 16, 2, 11008, True), "7B": (152064, 3584, 28, 28, 4, 18944, False)}
PROMPT_TOKENS = 256  # a prompt's length for the estimate where task.max_prompt_tokens does not bound it


def policy_shape(cfg: RunConfig) -> tuple[memory.ModelShape | None, str]:
    """(shape, where it came from)."""
    shape = memory.model_shape(cfg, vocab=0)
    path = cfg.model.model_name_or_path
    if shape is not None:
        return shape, f"{path}/config.json" if path else "model.* sizes"
    name = Path(path or "").name
    for size, (vocab, hidden, layers, heads, kv, inter, tied) in QWEN2_5.items():
        if f"Qwen2.5-{size}" in name:
            return memory.ModelShape(vocab, hidden, layers, heads, kv, hidden // heads, inter, tied), \
                f"Qwen2.5-{size}'s published sizes ({path} is not on this machine)"
    return None, f"no config.json at {path}"


def _resources(cfg: RunConfig, role: str, gpus: float) -> cluster.Resources:
    chosen = getattr(cfg.cluster, role)
    if chosen is not None:
        return cluster.Resources(chosen.num_cpus, chosen.num_gpus, dict(chosen.resources))
    return cluster.default_resources(cfg, role, gpus)


def _ask(count: int, res: cluster.Resources) -> str:
    return f"{count} x {{CPU {res.num_cpus:g}, GPU {res.num_gpus:g}{''.join(f', {k} {v:g}' for k, v in res.custom.items())}}}"


def describe_plan(cfg: RunConfig, gpus: float | None = None) -> list[str]:
    """The plan's lines. ``gpus``: the cluster's GPUs (default: what the config's cluster.* sections ask for in
    all). Raises ClusterError where the placement cannot work, as the run would at start."""
    counts = {"trainer": cfg.trainer.num_ranks, "rollout": cfg.rollout.num_workers, "reward": cfg.reward.num_workers}
    if cfg.algorithm.uses_critic:
        counts["critic"] = cfg.critic.num_ranks
    if gpus is None:
        gpus = sum(n * getattr(cfg.cluster, role).num_gpus for role, n in counts.items()
                   if getattr(cfg.cluster, role) is not None)
    res = {role: _resources(cfg, role, gpus) for role in counts}
    t, r = cfg.trainer, cfg.rollout
    transfer = cluster.weight_transfer(cfg, res["trainer"], res["rollout"])
    lines = [f"placement on {gpus:g} GPU(s) (cluster.address {cfg.cluster.address}):",
             f"  trainer ranks  {_ask(counts['trainer'], res['trainer'])}; ZeRO-{t.zero_stage}, "
             f"{'bf16' if t.bf16 else 'fp32'}, offload {t.offload}, strategy {cfg.cluster.trainer_strategy}",
             f"  rollout        {_ask(counts['rollout'], res['rollout'])}; engine {r.engine} {r.dtype}"
             + (f", tensor parallel {r.tensor_parallel_size}, vLLM memory share {r.gpu_memory_utilization:g}, "
                f"sleep between rollouts {r.sleep_between_rollouts}" if r.engine == "vllm" else ""),
             f"  reward         {_ask(counts['reward'], res['reward'])}"]
    if "critic" in counts:
        lines.append(f"  critic ranks   {_ask(counts['critic'], res['critic'])}")
    shared = cluster.colocated(res["trainer"], res["rollout"])
    lines.append(f"  trainer and rollout share GPUs: {'yes (colocated)' if shared else 'no'}")
    how = {None: "our process group (gloo/NCCL)" if r.weight_sync == "broadcast" else "Ray's object store",
           "ipc": "vLLM's CUDA IPC transfer", "nccl": "vLLM's NCCL transfer to every tensor-parallel worker"}
    lines.append(f"  weight sync: {r.weight_sync} via {how[transfer]}, buckets of {r.sync_bucket_mb:g} MB")
    return lines + memory_lines(cfg)


def _gib(n: float) -> str:
    return f"{n / memory.GiB:.1f} GiB"


def memory_lines(cfg: RunConfig) -> list[str]:
    shape, source = policy_shape(cfg)
    if shape is None:
        return [f"memory: unknown ({source})"]
    prompt = cfg.task.max_prompt_tokens or PROMPT_TOKENS
    estimate = memory.run_estimate(cfg, shape, prompt)
    lines = [f"memory (policy of {shape.parameters() / 1e9:.2f}B parameters, from {source}; rows of {prompt} + "
             f"{cfg.rollout.max_new_tokens} tokens):"]
    trainer = estimate["trainer rank"]
    kinds = ", ".join(f"{name} {_gib(value)}" for name, value in (
        ("weights", trainer.weights), ("grads", trainer.gradients), ("optimizer", trainer.optimizer),
        ("reference", trainer.reference), ("activations", trainer.activations)) if value)
    lines.append(f"  trainer rank: {_gib(trainer.total - trainer.host)} on its GPU ({kinds})"
                 + (f"; of which {_gib(trainer.host)} in host memory (offload)" if trainer.host else ""))
    r = cfg.rollout
    if r.engine == "vllm":
        width = 2 if r.dtype == "bfloat16" else 4
        lines.append(f"  rollout worker (vLLM): {r.gpu_memory_utilization:g} of each of its "
                     f"{r.tensor_parallel_size} GPU(s); weights {_gib(shape.parameters() * width)} in "
                     f"{r.dtype} across them, the rest KV cache")
    else:
        lines.append(f"  rollout worker: {_gib(estimate['rollout worker'].total)}")
    return lines
