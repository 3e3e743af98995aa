"""Weight-sync seconds, object store against collective broadcast, on one of grpo_vs_trl.py's workload shapes.

    python benchmarks/weight_sync.py [--workload medium] [--syncs 5] [--ranks 1] [--workers 1] [--zero-stage 2]

The same trainer group (DeepSpeed, the workload's random student) and rollout workers in one Ray session sync
alternately by each route, as ``RolloutGroup.sync`` does in a run: ``object_store`` (trainer rank 0's full state dict
as a Ray object, loaded by every worker) and ``broadcast`` (rollout.weight_sync: broadcast, gloo on CPU). The first
sync of each route is a warm-up (the broadcast group forms then); the median of the others is reported, and the
workers' weights are checked against the trainer's after the last one. Prints a table, then one JSON object.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(workload_name: str, syncs: int, ranks: int, workers: int, zero_stage: int, log=print) -> dict:
    import ray
    import torch

    import grpo_vs_trl
    from rlhf.core.config.run_config import RunConfig
    from rlhf.core.distributed.worker_pool import WorkerPool
    from rlhf.rl.groups.rollout import RolloutGroup
    from rlhf.rl.ranks.policy import TrainerGroup
    from rlhf.rl.groups.weight_broadcast import BroadcastSync
    from rollout.worker import RolloutWorker

    workload = grpo_vs_trl.WORKLOADS[workload_name]
    work = Path(tempfile.mkdtemp(prefix="weight_sync_"))
    atexit.register(shutil.rmtree, work, True)
    params, _ = grpo_vs_trl.make_student(workload, work / "student")
    cores = os.cpu_count() or 1
    cfg = RunConfig(call_timeout_s=600, rollout={"num_workers": workers, "threads": 1},
                    trainer={"num_ranks": ranks, "zero_stage": zero_stage, "threads": max(1, cores // ranks)})
    ray.init(address="local", num_cpus=max(cores, ranks), include_dashboard=False, log_to_driver=False)
    trainer = TrainerGroup(str(work / "student"), cfg, ranks, cfg.call_timeout_s)
    actor = ray.remote(num_cpus=0)(RolloutWorker)
    pool = WorkerPool("rollout", lambda i: actor.remote(str(work / "student"), cfg.rollout, i), workers, 600, 0)
    try:
        routes = {"object_store": RolloutGroup(cfg, pool, trainer.full_state_dict_ref),
                  "broadcast": RolloutGroup(cfg, pool, trainer.full_state_dict_ref, BroadcastSync(cfg, trainer, pool))}
        seconds: dict[str, list[float]] = {name: [] for name in routes}
        version = 0
        for _ in range(syncs + 1):  # alternating, so both see the same machine load
            for name, group in routes.items():
                version += 1
                start = time.perf_counter()
                group.sync(version)
                seconds[name].append(time.perf_counter() - start)
        want = trainer.full_state_dict()
        for held in ray.get([w.state_dict.remote() for w in pool.workers]):
            assert all(torch.equal(held[k], v) for k, v in want.items()), "a worker's weights differ after sync"
    finally:
        pool.shutdown()
        trainer.shutdown()
        ray.shutdown()
    medians = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    result = {"workload": workload_name, "params_m": round(params / 1e6, 2), "trainer_ranks": ranks,
              "rollout_workers": workers, "zero_stage": zero_stage, "syncs_timed": syncs,
              "object_store_s": round(medians["object_store"], 4), "broadcast_s": round(medians["broadcast"], 4),
              "speedup": round(medians["object_store"] / medians["broadcast"], 2),
              "first_sync_s": {name: round(s[0], 3) for name, s in seconds.items()}}
    log(f"{'route':<14}{'median s':>10}{'first s':>10}   ({result['params_m']}M params, {ranks} trainer ranks, "
        f"{workers} workers, ZeRO-{zero_stage})")
    for name in routes:
        log(f"{name:<14}{medians[name]:>10.3f}{seconds[name][0]:>10.3f}")
    log(f"broadcast is {result['speedup']}x the object store")
    return result


def main() -> None:
    import grpo_vs_trl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(grpo_vs_trl.WORKLOADS), default="medium")
    parser.add_argument("--syncs", type=int, default=5, help="timed syncs per route (after one warm-up each)")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, choices=[2, 3], default=2)
    args = parser.parse_args()
    result = run(args.workload, args.syncs, args.ranks, args.workers, args.zero_stage,
                 log=lambda line: print(line, flush=True))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
