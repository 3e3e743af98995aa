"""Worker faults: rollout and reward workers killed mid-step (SIGKILL to the process itself) are restarted with the
current weights and their work re-issued, and the run ends where an undisturbed one does; a dead trainer rank
stops the run with one line naming it, without waiting for the call timeout."""
import math
import os
import signal
import time

import pytest
import ray

import rlhf
from rlhf.core.distributed.worker_pool import WorkerDiedError, WorkerPool, death_reason

# Small enough for seconds per step, trained enough (warm-up) that held-out accuracy is not stuck at 0 or 1.
CONFIG = dict(
    seed=3,
    stages=["warmup", "rl", "eval"],
    call_timeout_s=600,  # generous: a loaded CI box can take minutes to start a worker
    # Measured: about 0.1 held-out accuracy after this warm-up (hidden 32 or 60 steps stay at 0).
    model={"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128},
    task={"train_prompts": 64, "eval_prompts": 48},
    warmup={"steps": 150, "batch_size": 32, "lr": 3e-3},
    rollout={"num_workers": 2, "prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 16},
    reward={"num_workers": 1},
    trainer={"num_ranks": 1, "zero_stage": 2, "micro_batch_size": 16},
    algorithm={"steps": 3},
    eval={"max_new_tokens": 16},
)
KILL_AT_STEP = 2


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="error")
    yield
    ray.shutdown()


def run(out, kill=None, kill_trainer_rank=None, start_from=None):
    """Warm-up (or the policy in ``start_from``), eval, 3 RL steps, eval. ``kill``: {role: slot}, the worker of each role whose process is SIGKILLed
    just after step KILL_AT_STEP hands it its work (so it dies holding unfinished work of that step).
    ``kill_trainer_rank``: then a 4th step with that trainer rank killed before it; returns its error."""
    log = []
    cfg = dict(CONFIG, stages=["rl", "eval"], model={"model_name_or_path": str(start_from)}) if start_from else CONFIG
    with rlhf.Trainer(rlhf.RunConfig(output_dir=str(out), **cfg), log=log.append) as trainer:
        if not start_from:
            trainer.warmup()
        trainer.evaluate()
        trainer.step()
        loop = trainer._rl_loop()
        killed = []
        submit = WorkerPool._submit

        def submit_then_kill(pool, i, method, args):
            ref = submit(pool, i, method, args)
            if kill and kill.get(pool.role) == i and pool.role not in {role for role, _ in killed} \
                    and method in ("generate", "score"):
                os.kill(pids[pool.role][i], signal.SIGKILL)
                killed.append((pool.role, ref))
            return ref

        pids = {pool.role: [pid_of(w) for w in pool.workers] for pool in (loop.rollout.pool, loop.reward.pool)}
        WorkerPool._submit = submit_then_kill
        try:
            trainer.step()
        finally:
            WorkerPool._submit = submit
        for _, ref in killed:  # the work handed to the killed process never finished
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(ref, timeout=60)
        trainer.step()
        trainer.evaluate()
        error = None
        if kill_trainer_rank is not None:
            os.kill(pid_of(loop.policy.actors[kill_trainer_rank]), signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(WorkerDiedError) as error:
                trainer.step()
            error = (str(error.value), time.monotonic() - start)
    return trainer.summary, [m for m in _metrics(out)], log, error


def _metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_workers_are_restarted_and_the_run_ends_as_an_undisturbed_one(ray_session, tmp_path):
    calm, calm_metrics, _, _ = run(tmp_path / "calm")
    # The same warmed-up student (warmed up once: it is deterministic, and the slowest part).
    hit, hit_metrics, log, trainer_error = run(tmp_path / "hit", kill={"rollout": 1, "reward": 0},
                                               kill_trainer_rank=0, start_from=tmp_path / "calm" / "warmup")

    # Both restarts happened in the step they hit, and were counted there.
    assert [m["faults/restarts"] for m in calm_metrics] == [0, 0, 0]
    assert [m["faults/restarts"] for m in hit_metrics] == [0, 2, 0]
    # The restarted rollout worker got the current weights and version (else generate refuses: stale weights).
    assert [m["charts/weights_version"] for m in hit_metrics] == [1, 2, 3]
    assert calm["steps"] == 3

    # Same start: the same student, greedy evaluation, no fault before RL.
    assert hit["eval_before"] == calm["eval_before"]
    # Within noise after RL: the restarted rollout worker samples from a fresh random stream, so the runs diverge
    # from step 2; their accuracies on the same n held-out prompts may differ by sampling noise. Three standard
    # errors of the difference of two proportions at the pooled accuracy (at least 1/n: one answer).
    n = calm["eval_after"]["n"]
    a, b = calm["eval_after"]["accuracy"], hit["eval_after"]["accuracy"]
    p = (a + b) / 2
    assert 0 < calm["eval_before"]["accuracy"] < 1, "held-out accuracy must not sit at 0 or 1 for this to mean anything"
    assert abs(a - b) <= max(3 * math.sqrt(2 * p * (1 - p) / n), 1 / n), (a, b)

    # A trainer rank cannot be replaced mid-run: its death stops the run with one line naming it, promptly.
    message, seconds = trainer_error
    assert message.startswith("trainer rank 0 died during trainer ") and "\n" not in message
    assert seconds < CONFIG["call_timeout_s"] / 4  # the death was noticed, not waited out


def test_death_reason_is_one_line():
    class Died(ray.exceptions.RayActorError):
        def __str__(self):
            return ("The actor died unexpectedly before finishing this task.\n\tclass_name: W\n\tpid: 4242\n"
                    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker "
                    "exit detail: Worker unexpectedly exits with a connection error code 2. End of file. Some "
                    "common causes include: (1) the OOM killer")

    class Raised(ray.exceptions.RayActorError):
        def __str__(self):
            return ("The actor died because of an error raised in its creation task, \x1b[36mray::W.__init__()"
                    "\x1b[39m (pid=1)\n  File \"x.py\", line 6\n    raise ValueError('no model')\nValueError: no model")

    assert death_reason(Died()) == "pid 4242: Worker unexpectedly exits with a connection error code 2. End of file"
    assert death_reason(Raised()) == "its constructor raised ValueError: no model"


@ray.remote(num_cpus=0)
class _Flaky:
    def pid(self):
        return os.getpid()

    def die(self):
        os._exit(1)

    def fail(self):
        raise KeyError("no such prompt")

    def slow(self):
        time.sleep(30)


def test_pool_gives_up_after_max_restarts_and_unwraps_errors(ray_session):
    pool = WorkerPool("reward", lambda i: _Flaky.remote(), 2, timeout_s=5, max_restarts=2)
    try:
        with pytest.raises(WorkerDiedError, match=r"reward worker 1 died 3 times during dying .* "
                                                  r"max_worker_restarts=2"):
            pool.call("die", [None, ()], "dying")
        assert pool.restarts == 2
        # An error the method raised comes back as itself, not wrapped in Ray's RayTaskError.
        with pytest.raises(KeyError, match="no such prompt"):
            pool.call("fail", [(), ()], "failing")
        with pytest.raises(TimeoutError, match=r"sleeping did not finish within 5 s \(waiting for reward worker 0"):
            pool.call("slow", [(), None], "sleeping")
    finally:
        pool.shutdown()
