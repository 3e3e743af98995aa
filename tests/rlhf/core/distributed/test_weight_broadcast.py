"""Weight sync by collective broadcast (rlhf/core/distributed/weight_sync.py, rlhf/rl/groups/weight_broadcast.py) on CPU over gloo.

Two trainer ranks (ZeRO-2 and ZeRO-3) and two rollout workers under a RolloutGroup, as a run wires them: after every
update the workers hold the trainer's weights bit for bit (merged ones, with LoRA); a worker killed during a broadcast is restarted and joins a fresh group. The group itself is
checked in one process with threads (buckets, the version check, a member that stops answering).
"""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from rlhf.core.algorithms.aggregation import loss_token_weights  # noqa: E402
from rlhf.core.data.batch import TrainBatch  # noqa: E402
from rlhf.core.config.run_config import ModelConfig, RolloutConfig  # noqa: E402
from rlhf.core.models.build import build_student, build_tokenizer, load_student, save_student  # noqa: E402
from rlhf.core.distributed.weight_sync import (BroadcastGroup, TensorSpec, WeightSyncError, host_store,  # noqa: E402
                                   plan_buckets)
from rlhf.core.distributed.worker_pool import WorkerPool  # noqa: E402
from rlhf.rl.groups.rollout import RolloutGroup  # noqa: E402
from rlhf.rl.ranks.policy import TrainerGroup  # noqa: E402
from rlhf.rl.groups.weight_broadcast import BroadcastSync  # noqa: E402
from rollout.worker import RolloutWorker  # noqa: E402
from tests.configs import run_config  # noqa: E402

# Pytest imports this file under a name the Ray workers cannot import: its worker class travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)


# ------------------------------------------------------------------------------------- the group, in-process


def test_buckets_are_bounded_consecutive_and_of_one_dtype():
    f32, bf16 = "torch.float32", "torch.bfloat16"
    manifest = [TensorSpec("a", (10,), f32), TensorSpec("b", (20,), f32), TensorSpec("big", (100,), f32),
                TensorSpec("c", (5,), f32), TensorSpec("d", (4,), bf16), TensorSpec("e", (4,), bf16)]
    plan = plan_buckets(manifest, bucket_bytes=128)  # 32 float32 values
    assert plan == [[0, 1], [2], [3], [4, 5]]  # 40+80 bytes | 400 alone | 20, then the dtype changes | 8+8


def _members(size: int, timeout_s: float = 10.0):
    store, host, port = host_store(timeout_s)
    groups: list = [None] * size

    def join(rank):
        groups[rank] = BroadcastGroup(store if rank == 0 else None, host, port, rank, size, 1, timeout_s,
                                      torch.device("cpu"))

    threads = [threading.Thread(target=join, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return groups


def _in_threads(fns):
    return [result() for result in _in_threads_later(fns)]


def test_receivers_get_every_tensor_exactly_and_refuse_another_version():
    manifest = [TensorSpec(f"t{i}", (3, i + 1), "torch.float32") for i in range(4)]
    manifest.append(TensorSpec("half", (2,), "torch.bfloat16"))
    tensors = [torch.randn(s.shape) for s in manifest[:-1]] + [torch.tensor([1.5, -2.0], dtype=torch.bfloat16)]
    sender, r1, r2 = _members(3)
    results = _in_threads([lambda: sender.send(manifest, tensors, 7, 48), lambda: _received(r1, manifest, 7, 48),
                           lambda: _received(r2, manifest, 7, 48)])
    for got in results[1:]:
        assert list(got) == [s.name for s in manifest]
        for spec, want in zip(manifest, tensors):
            assert torch.equal(got[spec.name], want)
    results = _in_threads([lambda: sender.send(manifest, tensors, 8, 48), lambda: _received(r1, manifest, 9, 48),
                           lambda: _received(r2, manifest, 8, 48)])
    assert isinstance(results[1], WeightSyncError) and "v8" in str(results[1]) and "expects v9" in str(results[1])


def _received(member, manifest, version, bucket_bytes) -> dict:
    """Every tensor of one receive, copied out of the reused buffer."""
    return {name: t.clone() for bucket in member.receive(manifest, version, bucket_bytes) for name, t in bucket}


def test_a_receiver_streams_into_its_model_through_one_bucket_buffer():
    manifest = [TensorSpec(f"t{i}", (4, 2), "torch.float32") for i in range(5)]
    tensors = [torch.randn(s.shape) for s in manifest]
    targets = {s.name: torch.zeros(s.shape) for s in manifest}
    sender, receiver = _members(2)
    seen = []  # the storage each bucket arrived in

    def receive():
        for bucket in receiver.receive(manifest, 1, 64):  # two tensors a bucket
            seen.append(bucket[0][1].untyped_storage().data_ptr())
            for name, tensor in bucket:
                targets[name].copy_(tensor)

    results = _in_threads([lambda: sender.send(manifest, tensors, 1, 64), receive])
    assert not any(isinstance(r, Exception) for r in results), results
    assert len(seen) == 3 and len(set(seen)) == 1  # three buckets, one buffer: no second copy of the model
    assert all(torch.equal(targets[s.name], t) for s, t in zip(manifest, tensors))
    into = {s.name: torch.zeros(s.shape, dtype=torch.bfloat16) for s in manifest}  # the engine's own dtype
    _in_threads([lambda: sender.send(manifest, tensors, 2, 64),
                 lambda: receiver.receive_into(manifest, 2, 64, into)])
    assert torch.equal(into["t3"], tensors[3].to(torch.bfloat16))


class _SpyGroup:
    """A process group that records whether it was aborted (the real one underneath)."""

    def __init__(self, group):
        self.inner, self.aborted = group, False

    def broadcast(self, *args):
        return self.inner.broadcast(*args)

    def abort(self):
        self.aborted = True
        self.inner.abort()


def test_an_abort_ends_the_pending_operation_of_every_member_and_refuses_the_next():
    manifest = [TensorSpec("w", (8,), "torch.float32")]
    _sender, r1, r2 = _members(3, timeout_s=30.0)  # the sender never sends
    r1.group, r2.group = _SpyGroup(r1.group), _SpyGroup(r2.group)
    start = time.monotonic()
    waiting = _in_threads_later([lambda: _received(r1, manifest, 1, 64), lambda: _received(r2, manifest, 1, 64)])
    time.sleep(0.3)
    r1.abort()
    results = [w() for w in waiting]
    assert all(isinstance(r, WeightSyncError) for r in results), results
    assert time.monotonic() - start < 10  # not the 30 s timeout
    assert r1.group.aborted and r2.group.aborted  # r2 learnt it from the store and aborted its own operation
    with pytest.raises(WeightSyncError, match="aborted"):
        r1.broadcast(torch.zeros(1), "after the abort")


def _in_threads_later(fns):
    """Start ``fns`` in threads now; returns a getter per call that joins it and gives its result or error."""
    results: list = [None] * len(fns)

    def call(i):
        try:
            results[i] = fns[i]()
        except Exception as err:  # noqa: BLE001 - the test looks at what each member raised
            results[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    return [lambda i=i: (threads[i].join(30), results[i])[1] for i in range(len(fns))]


def test_a_member_that_never_receives_times_out_the_sender_instead_of_hanging():
    manifest = [TensorSpec("w", (64,), "torch.float32")]
    sender, _silent = _members(2, timeout_s=1.0)
    [result] = _in_threads([lambda: sender.send(manifest, [torch.ones(64)], 1, 1024)])
    assert isinstance(result, (TimeoutError, WeightSyncError))


# --------------------------------------------------------------------------------- trainer ranks and workers


class MortalWorker(RolloutWorker):
    """Dies at the start of a broadcast while ``marker`` exists (and removes it: its replacement lives)."""

    def __init__(self, model_dir, rollout, seed, marker):
        super().__init__(model_dir, rollout, seed)
        self.marker = marker

    def receive_weights(self, version):
        if os.path.exists(self.marker):
            os.remove(self.marker)
            os._exit(1)
        return super().receive_weights(version)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = build_tokenizer("char")
    path = tmp_path_factory.mktemp("policy")
    save_student(build_student(TINY, tokenizer, seed=0), tokenizer, path)
    return str(path)


def _batch(vocab: int, rows: int = 4, width: int = 8) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    response_mask = torch.zeros(rows, width)
    response_mask[:, 3:] = 1
    return TrainBatch(input_ids=torch.randint(1, vocab, (rows, width), generator=g),
                      attention_mask=torch.ones(rows, width, dtype=torch.long), response_mask=response_mask,
                      rollout_logprobs=-torch.rand(rows, width, generator=g) * response_mask,
                      advantages=torch.randn(rows, 1, generator=g).expand(-1, width) * response_mask,
                      loss_weights=loss_token_weights(response_mask, "token-mean", 1))


def _assert_workers_hold(pool, trainer, model_dir: str):
    want = trainer.full_state_dict()
    start = load_student(model_dir)[0].state_dict()
    assert not torch.equal(want["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    for held in ray.get([w.state_dict.remote() for w in pool.workers]):
        for name, tensor in want.items():
            assert torch.equal(held[name], tensor), name


# ZeRO-3 runs with LoRA on the policy: the sender gathers each weight with its adapters and sends it merged, under
# the plain model's names (what full_state_dict gives the object-store path); ZeRO-2 sends the plain model.
@pytest.mark.parametrize("zero_stage, lora", [(2, None), (3, {"r": 2, "target_modules": ["q_proj", "up_proj"]})])
def test_workers_hold_the_trainers_weights_bit_for_bit_after_each_step(ray_cluster, model_dir, tmp_path,
                                                                       zero_stage, lora):
    cfg = run_config({"zero_stage": zero_stage, "lr": 1e-2, "threads": 1, "timeout_s": 60, "micro_batch_size": 2,
                      "zero_options": {"stage3_param_persistence_threshold": 0}, "lora": lora})
    # Small buckets: the embedding (vocab x 16) travels alone, the rest in several shared buckets.
    cfg.rollout.sync_bucket_mb = 2048 / 2**20
    trainer = TrainerGroup(model_dir, cfg, num_ranks=2, timeout_s=60)
    marker = str(tmp_path / "die")
    actor = ray.remote(num_cpus=0)(MortalWorker)
    rollout = RolloutConfig(threads=1, sync_bucket_mb=cfg.rollout.sync_bucket_mb)
    pool = WorkerPool("rollout", lambda i: actor.remote(model_dir, rollout, i, marker), 2, 60, 1)
    try:
        group = RolloutGroup(cfg, pool, trainer.full_state_dict_ref, BroadcastSync(cfg, trainer, pool))
        vocab = len(build_tokenizer("char"))
        for version in (1, 2):
            trainer.train_step(_batch(vocab))
            group.sync()
            assert group.version == version
            _assert_workers_hold(pool, trainer, model_dir)
        assert group.broadcast.generation == 1
        samples = ray.get(pool.workers[1].generate.remote(["1+1="], 2, 3, 1.0, False, 2))
        assert len(samples) == 2

        # Worker 1 dies as the broadcast of v3 starts: it is restarted (given the weights through the object store
        # by the group's restore) and v3 goes to both in a fresh group.
        open(marker, "w").close()
        trainer.train_step(_batch(vocab))
        group.sync()
        assert pool.restarts == 1 and group.broadcast.generation == 2 and not os.path.exists(marker)
        _assert_workers_hold(pool, trainer, model_dir)
        assert ray.get([w.generate.remote(["2+2="], 1, 2, 1.0, False, 3) for w in pool.workers])
    finally:
        pool.shutdown()
        trainer.shutdown()
