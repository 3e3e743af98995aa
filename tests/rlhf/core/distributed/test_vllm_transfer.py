"""Weight sync through vLLM's transfer engines (rlhf/core/distributed/vllm_transfer.py), the parts that are not
CUDA: the NCCL ranks of tensor-parallel workers, the packed buffer's size, the policy's tensors as vLLM's weight
source (tied and LoRA models as the object-store sync sends them), and the client that passes vLLM's four calls to
the rollout workers, down to a worker over the stand-in vLLM (tests/fake_vllm.py) holding the new weights and
version. vLLM's own trainer-side engines need CUDA: benchmarks/gpu_smoke.sh runs them."""
from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from rlhf.core.config.run_config import ModelConfig, RolloutConfig  # noqa: E402
from rlhf.core.distributed import vllm_transfer  # noqa: E402
from rlhf.core.distributed.weight_sync import manifest_of, policy_tensors  # noqa: E402
from rlhf.core.models import lora  # noqa: E402
from rlhf.core.models.build import build_student, build_tokenizer, save_student  # noqa: E402
from rollout.vllm_engine import VLLMEngine  # noqa: E402
from rollout.worker import RolloutWorker  # noqa: E402
from tests import fake_vllm  # noqa: E402

TINY = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)


def test_each_engines_tensor_parallel_workers_take_their_own_nccl_ranks():
    infos = vllm_transfer.worker_init_infos({"rank_offset": 1, "world_size": 7, "packed": True}, 3, 2)
    assert [i["rank_offset"] for i in infos] == [1, 3, 5] and all(i["world_size"] == 7 for i in infos)
    assert vllm_transfer.transfer_world_size(3, 2) == 7
    assert vllm_transfer.worker_init_infos({"packed": True}, 2, 1) == [{"packed": True}, {"packed": True}]


def test_the_packed_buffer_holds_the_largest_tensor():
    assert vllm_transfer.buffer_bytes([10, 300, 20], 64) == 300
    assert vllm_transfer.buffer_bytes([10, 20], 64) == 64


@pytest.mark.parametrize("adapters", [False, True])
def test_the_weight_source_is_the_policy_as_the_engine_holds_it(adapters):
    tokenizer = build_tokenizer("char")
    model = build_student(TINY, tokenizer, seed=0)
    if adapters:
        model = lora.wrap(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]})
    tensors = policy_tensors(model)
    names = [name for name, _, _ in tensors.metadata]
    assert names == [s.name for s in manifest_of(model)]
    assert "lm_head.weight" not in names  # tied: sent once, as the embedding
    full = dict(tensors.iter_full())
    plain = lora.hf_state_dict(model, model.state_dict()) if adapters else model.state_dict()
    assert list(full) == names and all(torch.equal(full[n], plain[n]) for n in names)


class FakeVLLMEngine(VLLMEngine):
    def __init__(self, model_dir, rollout):
        self._start(model_dir, rollout, fake_vllm.FakeVLLM)


class InProcessHandle:
    """A Ray actor handle's ``.weight_transfer.remote`` over an object in this process (the stand-in's shared
    table is this process's)."""

    def __init__(self, worker):
        self.weight_transfer = self
        self.worker = worker

    def remote(self, method, payload):
        return ray.put(self.worker.weight_transfer(method, payload))


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_client_passes_vllms_calls_to_every_worker_which_holds_the_new_version(ray_local, tmp_path):
    tokenizer = build_tokenizer("char")
    save_student(build_student(TINY, tokenizer, seed=0), tokenizer, tmp_path)
    rollout = RolloutConfig(engine="vllm", threads=1).model_copy(update={"weight_transfer": "fake"})
    workers = [RolloutWorker(str(tmp_path), rollout, seed, FakeVLLMEngine) for seed in (1, 2)]
    client = vllm_transfer.RolloutClient([InProcessHandle(w) for w in workers], 1, timeout_s=30)
    client.init_weight_transfer_engine({"packed": True})
    new = build_student(TINY, tokenizer, seed=5).state_dict()
    names = [n for n in new if n != "lm_head.weight"]
    fake_vllm.SHARED.update({i: new[n] for i, n in enumerate(names)})
    client.version = 4
    client.start_weight_update()
    client.update_weights({"names": names, "handles": list(range(len(names)))})
    client.finish_weight_update()
    for worker in workers:
        assert worker.version == 4 and worker.engine.llm.weight_version == "4"
        held = dict(worker.engine.llm.model.named_parameters())
        assert all(torch.equal(held[n], new[n]) for n in names)
    with pytest.raises(ValueError, match="not one of vLLM's weight-transfer calls"):
        workers[0].weight_transfer("sleep", None)
