"""A run's checkpoint from the driver's side: what ``checkpoints/step_N`` holds beside the actors' state, and how a
resumed run takes it back (the file layout, config checks and pruning are rlhf/core/checkpoints/resume.py).

Written: the update's state (policy, trainer ranks, critic) through ``RLStep.save_state``, the RNG states of the
driver and the rollout workers, and ``state.json`` (step, weights version, prompt order, guard counts, the summary
so far, stage times). Taken back in two halves: the driver's now (``restore_driver``), the actors' when they start
(``restore_actors``), since they start lazily.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from rlhf.core.checkpoints import resume as checkpoints
from rlhf.core.checkpoints.atomic import atomic_dir, write_json_atomic
from rlhf.rl.schedule import RLSchedule
from rlhf.rl.step import RLStep


def write_checkpoint(output_dir: Path, loop: RLStep, schedule: RLSchedule, run_state: dict, keep: int) -> Path:
    """``output_dir/checkpoints/step_N``, atomically (a run killed while writing leaves no ``step_N``); keeps the
    newest ``keep``. ``run_state``: the run's own entries of state.json (summary, stage times, elapsed seconds, the
    RM directory, the config)."""
    path = checkpoints.checkpoint_dir(output_dir, schedule.steps)
    with atomic_dir(path) as tmp:
        rollout_rng = loop.save_state(tmp)
        torch.save({"driver": checkpoints.torch_rng_state(), "rollout": rollout_rng}, tmp / checkpoints.RNG_FILE)
        write_json_atomic(tmp / checkpoints.STATE_FILE, {
            "step": schedule.steps,
            "weights_version": loop.version,
            "prompt_order": checkpoints.python_rng_state(schedule.order.getstate()),
            "python_rng": checkpoints.python_rng_state(random.getstate()),
            "guard": loop.guard.state(),
            **run_state,
        })
    checkpoints.prune_checkpoints(output_dir, keep)
    return path


def restore_driver(checkpoint: checkpoints.Checkpoint, schedule: RLSchedule, metrics_file: Path, log) -> dict:
    """The driver's side of ``checkpoint``: the schedule's step and prompt order, the RNGs; ``metrics.jsonl`` cut
    back to the checkpoint's step. Returns state.json for the run's own entries."""
    state = checkpoint.state
    schedule.steps = checkpoint.step
    schedule.order.setstate(checkpoints.python_rng_tuple(state["prompt_order"]))
    random.setstate(checkpoints.python_rng_tuple(state["python_rng"]))
    checkpoints.set_torch_rng_state(checkpoints.load_rng_file(checkpoint.path / checkpoints.RNG_FILE)["driver"])
    dropped = checkpoints.truncate_metrics(metrics_file, checkpoint.step)
    if dropped:
        log(f"metrics.jsonl: dropped {dropped} line(s) after step {checkpoint.step}, to be run again")
    return state


def restore_actors(checkpoint: checkpoints.Checkpoint, loop: RLStep) -> None:
    """The actors' side of ``checkpoint``, once they run: the update's state, the rollout workers' RNGs and the
    policy's weights with the checkpoint's version, the guard's counts."""
    rng = checkpoints.load_rng_file(checkpoint.path / checkpoints.RNG_FILE)
    loop.load_state(checkpoint.path, rng["rollout"], checkpoint.state["weights_version"], checkpoint.state["guard"])

