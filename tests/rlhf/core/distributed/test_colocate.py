"""A colocated trainer rank's turns with the GPU (rlhf/core/distributed/colocate.py), on CPU with a stand-in
DeepSpeed engine: it offloads its state and logs the memory before vLLM wakes, takes it back before the next update,
leaves DeepSpeed's own offload alone, and does nothing when it has the GPU to itself or there is none."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhf.core.distributed import colocate


class Engine:
    def __init__(self):
        self.calls: list[str] = []

    def offload_states(self):
        self.calls.append("offload_states")

    def reload_states(self):
        self.calls.append("reload_states")


class Rank(colocate.ColocatedTrainerMemory):
    def __init__(self, colocated: bool, offload: str = "none"):
        self.engine, self.colocated = Engine(), colocated
        self.engine_cfg = SimpleNamespace(offload=offload)


@pytest.fixture
def logged(monkeypatch):
    monkeypatch.setattr(colocate.torch.cuda, "is_available", lambda: True)  # a GPU to share, on CPU
    lines: list[str] = []
    monkeypatch.setattr(colocate, "gpu_memory_line", lambda what: what)  # CUDA's free memory, on CPU
    monkeypatch.setattr(colocate.logger, "info", lines.append)
    return lines


def test_a_colocated_rank_releases_before_the_rollout_and_reclaims_before_the_update(logged):
    rank = Rank(colocated=True)
    rank.release_gpu()
    rank.release_gpu()  # a second sync before the update: already released
    rank.reclaim_gpu()
    rank.reclaim_gpu()
    assert rank.engine.calls == ["offload_states", "reload_states"]
    assert logged == ["trainer released the GPU", "trainer took the GPU back"]


def test_deepspeeds_own_offload_is_left_alone_and_a_rank_with_its_own_gpu_does_nothing(logged, monkeypatch):
    offloaded = Rank(colocated=True, offload="optimizer+params")
    offloaded.release_gpu()
    offloaded.reclaim_gpu()
    assert offloaded.engine.calls == [] and len(logged) == 2  # the cache is still emptied and the memory logged
    alone = Rank(colocated=False)
    alone.release_gpu()
    alone.reclaim_gpu()
    assert alone.engine.calls == [] and len(logged) == 2
    monkeypatch.setattr(colocate.torch.cuda, "is_available", lambda: False)
    cpu = Rank(colocated=True)  # sleep_between_rollouts on a CPU machine: nothing to share
    cpu.release_gpu()
    cpu.reclaim_gpu()
    assert cpu.engine.calls == [] and len(logged) == 2
