"""Thread budgets (rlhf/core/distributed/threads.py): the share out against hand-worked numbers, and, read back from
live actors of a tiny Ray run, the threads and BLAS variables each one set at start."""
from __future__ import annotations

import os

import pytest
import torch

from rlhf.core.config.run_config import RunConfig
from rlhf.core.distributed import threads
from rlhf.core.distributed.threads import busiest_phase, run_phases, thread_budget


def test_asks_that_fit_the_cores_are_kept():
    asks = {"rollout": (1, 2), "trainer": (2, 1)}
    assert thread_budget(4, asks, [("rollout", "trainer")]) == {"rollout": 2, "trainer": 1}
    # One after another, each phase has the cores to itself.
    assert thread_budget(2, asks, [("rollout",), ("trainer",)]) == {"rollout": 2, "trainer": 1}


def test_a_phase_asking_too_much_is_scaled_down_to_the_cores():
    # 4 workers x 8 + 2 ranks x 4 = 40 threads on 16 cores: 8 * 16 // 40 = 3, 4 * 16 // 40 = 1 (12 + 2 = 14 <= 16).
    asks = {"rollout": (4, 8), "trainer": (2, 4)}
    budget = thread_budget(16, asks, [("rollout", "trainer")])
    assert budget == {"rollout": 3, "trainer": 1}
    assert busiest_phase(budget, asks, [("rollout", "trainer")]) == 14


def test_a_role_in_several_phases_gets_its_smallest_share_and_at_least_one():
    # Asynchronous on 2 cores: generation (1 x 2) beside scoring (1 x 2): 2 * 2 // 4 = 1 each; beside the update
    # (2 x 1): rollout 2 * 2 // 4 = 1, trainer 1 * 2 // 4 = 0 -> 1. Three actors on two cores cannot do better.
    asks = {"rollout": (1, 2), "reward": (1, 2), "trainer": (2, 1)}
    phases = [("rollout", "reward"), ("rollout", "trainer")]
    budget = thread_budget(2, asks, phases)
    assert budget == {"rollout": 1, "reward": 1, "trainer": 1}
    assert busiest_phase(budget, asks, phases) == 3


def test_run_phases_follow_the_config():
    cfg = RunConfig.model_validate({"rollout": {"threads": 2, "num_workers": 1}, "trainer": {"num_ranks": 2}})
    asks, phases = run_phases(cfg)
    assert asks["rollout"] == (1, 2) and asks["trainer"] == (2, 1) and asks["reward"] == (1, 2)
    assert "critic" not in asks and "teacher" not in asks
    assert ("rollout",) in phases and ("trainer",) in phases and all(len(p) == 1 for p in phases)
    assert threads.run_budget(cfg, cores=2) == {"rollout": 2, "reward": 2, "trainer": 1, "reward_model": 1}
    overlapped = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"asynchronous": True})})
    _, phases = run_phases(overlapped)
    assert ("rollout", "trainer") in phases and ("rollout", "reward") in phases
    assert threads.run_budget(overlapped, cores=2) == {"rollout": 1, "reward": 1, "trainer": 1, "reward_model": 1}


def test_apply_sets_torch_and_blas_threads_and_prefers_the_drivers_share(monkeypatch):
    before = torch.get_num_threads()
    for name in (threads.SHARE_ENV, *threads.BLAS_ENV):
        monkeypatch.delenv(name, raising=False)
    try:
        assert threads.apply("test", 1)["intra_op"] == 1
        monkeypatch.setenv(threads.SHARE_ENV, "2")
        now = threads.apply("test", 1)
        assert now["intra_op"] == 2 and now["OMP_NUM_THREADS"] == now["MKL_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- live actors


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """A local Ray instance with one rollout worker, one reward worker and two trainer ranks of an asynchronous
    run on a tiny model, started as a run starts them (rlhf/rl/launch.py)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    from rlhf.core.config.run_config import ModelConfig
    from rlhf.core.distributed import cluster
    from rlhf.core.models.build import build_student, build_tokenizer, save_student
    from rlhf.rl.launch import make_reward_workers, make_rollout_workers, start_ray
    from rlhf.rl.ranks.policy import TrainerGroup

    model_dir = tmp_path_factory.mktemp("policy")
    tokenizer = build_tokenizer("char")
    save_student(build_student(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                           intermediate_size=64), tokenizer, seed=0), tokenizer, model_dir)
    cfg = RunConfig.model_validate({"output_dir": str(tmp_path_factory.mktemp("run")), "call_timeout_s": 300,
                                    "reward": {"components": {"verifier": 1.0}},
                                    "rollout": {"threads": 2, "asynchronous": True},
                                    "trainer": {"num_ranks": 2, "threads": 1}})
    start_ray(cfg)
    rollout = make_rollout_workers(cfg, str(model_dir))
    reward = make_reward_workers(cfg, None)
    trainer = TrainerGroup(str(model_dir), cfg, 2, 300, resources=cluster.role_resources(cfg, "trainer"))
    try:
        yield cfg, {"rollout": rollout.workers, "reward": reward.workers, "trainer": trainer.actors}
    finally:
        trainer.shutdown()
        reward.shutdown()
        rollout.shutdown()
        ray.shutdown()


def _settings(actor) -> dict:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: {**threads.settings(),
                                                          "tokenizers": os.environ.get("TOKENIZERS_PARALLELISM")}),
                   timeout=60)


def test_live_actors_run_on_their_share(live_run):
    cfg, actors = live_run
    budget = threads.run_budget(cfg)
    for role, handles in actors.items():
        for handle in handles:
            got = _settings(handle)
            share = str(budget[role])
            assert got["intra_op"] == budget[role], (role, got)
            assert got["inter_op"] == 1, (role, got)
            assert got["tokenizers"] == "false", (role, got)  # the job's variables are kept beside the share
            assert got[threads.SHARE_ENV] == share and all(got[name] == share for name in threads.BLAS_ENV), (role, got)
    cores = threads.shared_cores()
    asks, phases = run_phases(cfg)
    # Within the cores, unless a phase has more actors than cores (then one thread each).
    most_actors = max(sum(asks[r][0] for r in phase) for phase in phases)
    assert busiest_phase(budget, asks, phases) <= max(cores, most_actors)


def test_ppo_critic_ranks_share_the_cores_with_asynchronous_generation():
    cfg = RunConfig.model_validate({"algorithm": {"advantage": "gae"}, "critic": {"num_ranks": 2, "threads": 2},
                                    "rollout": {"threads": 2, "asynchronous": True}})
    asks, phases = run_phases(cfg)
    assert asks["critic"] == (2, 2) and ("rollout", "critic") in phases
    # Beside one rollout worker of 2 on 4 cores: 6 asked, critic 2 * 4 // 6 = 1, rollout 2 * 4 // 6 = 1.
    assert threads.run_budget(cfg, cores=4)["critic"] == 1
