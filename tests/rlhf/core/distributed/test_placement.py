"""Placing the GPU roles, without a cluster (rlhf/core/distributed/cluster.py, plan.py): a tensor-parallel rollout
worker asks for its GPUs, a cluster with too few GPUs is refused instead of sampling on the CPU, the weight
transfer follows the placement (vLLM's IPC where trainer and rollout share GPUs, NCCL across them, our own NCCL
group refused there in one line), vLLM's row bound comes from the run, and the plan prints without a GPU."""
from __future__ import annotations

import pytest

from rlhf.core.config.run_config import ConfigError, load_config
from rlhf.core.distributed import cluster, plan
from rlhf.core.distributed.cluster import ClusterError, Resources

ONE_GPU = Resources(1, 1)
HALF, SHARE = Resources(1, 0.5), Resources(1, 0.4)


def cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_a_tensor_parallel_rollout_worker_asks_for_its_gpus():
    c = cfg("rollout.engine=vllm", "rollout.tensor_parallel_size=2", "rollout.num_workers=2", "trainer.num_ranks=4")
    assert cluster.default_resources(c, "rollout", gpus=8) == Resources(1, 2)
    assert cluster.default_resources(c, "trainer", gpus=8) == Resources(c.trainer.threads, 1)


def test_too_few_gpus_are_refused_not_turned_into_cpu_rollouts():
    c = cfg("rollout.num_workers=2", "trainer.num_ranks=4")
    with pytest.raises(ClusterError, match="need 6 GPUs and the cluster has 4: set cluster.rollout"):
        cluster.default_resources(c, "rollout", gpus=4)
    assert cluster.default_resources(c, "rollout", gpus=0) == Resources(1, 0)  # a CPU machine: CPU rollouts
    with pytest.raises(ClusterError):
        cluster.default_resources(cfg("rollout.engine=vllm"), "rollout", gpus=0)


def test_the_weight_transfer_follows_the_placement():
    vllm = cfg("rollout.engine=vllm", "rollout.weight_sync=broadcast")
    assert cluster.weight_transfer(vllm, HALF, SHARE) == "ipc"
    assert cluster.weight_transfer(vllm, ONE_GPU, ONE_GPU) == "nccl"
    assert cluster.weight_transfer(cfg("rollout.engine=vllm"), HALF, SHARE) is None  # the object store
    hf = cfg("rollout.weight_sync=broadcast")
    assert cluster.weight_transfer(hf, ONE_GPU, ONE_GPU) is None  # our own process group, across GPUs
    with pytest.raises(ClusterError, match="NCCL refuses two ranks on one GPU") as err:
        cluster.weight_transfer(hf, HALF, SHARE)
    assert "\n" not in str(err.value)
    forced = cfg("rollout.engine=vllm", "rollout.weight_sync=broadcast", "rollout.weight_transfer=nccl")
    with pytest.raises(ClusterError, match="rollout.weight_transfer nccl"):
        cluster.weight_transfer(forced, HALF, SHARE)


def test_tensor_parallelism_needs_as_many_whole_gpus():
    c = cfg("rollout.engine=vllm", "rollout.tensor_parallel_size=2")
    with pytest.raises(ClusterError, match="tensor_parallel_size 2 needs that many whole GPUs"):
        cluster.weight_transfer(c, ONE_GPU, ONE_GPU)
    assert cluster.weight_transfer(c, ONE_GPU, Resources(1, 2)) is None


def test_the_rollout_settings_carry_vllms_row_bound_and_refuse_its_temperature_limit():
    c = cfg("rollout.engine=vllm", "rollout.weight_sync=broadcast", "task.max_prompt_tokens=300",
            "rollout.max_new_tokens=200", "eval.max_new_tokens=400")
    settled = cluster.rollout_settings(c, HALF, SHARE)
    assert settled.rollout.max_model_len == 700 and settled.rollout.weight_transfer == "ipc"
    assert c.rollout.max_model_len is None  # the loaded config is left as it was
    with pytest.raises(ConfigError, match="vllm engine samples at temperatures up to 2"):
        cluster.rollout_settings(cfg("rollout.engine=vllm", "rollout.temperature=2.5"), ONE_GPU, ONE_GPU)


def test_the_plan_names_every_role_the_transfer_and_the_memory():
    c = cfg("rollout.engine=vllm", "rollout.dtype=bfloat16", "rollout.weight_sync=broadcast",
            "model.model_name_or_path=/nowhere/Qwen2.5-0.5B-Instruct", "trainer.bf16=true", "trainer.num_ranks=1",
            "cluster.trainer={num_cpus: 2, num_gpus: 0.5}", "cluster.rollout={num_cpus: 2, num_gpus: 0.4}",
            "cluster.reward={num_cpus: 1, num_gpus: 0.1}")
    text = "\n".join(plan.describe_plan(c))
    assert "placement on 1 GPU(s)" in text and "share GPUs: yes (colocated)" in text
    assert "vLLM's CUDA IPC transfer" in text
    assert "Qwen2.5-0.5B's published sizes" in text and "0.49B parameters" in text
    assert "trainer rank:" in text and "GiB on its GPU" in text
