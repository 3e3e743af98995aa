"""A run's checkpoint from the driver's side: what ``checkpoints/step_N`` holds beside the actors' state, and how a
resumed run takes it back (the file layout, config checks and pruning are rlhf/core/checkpoints/resume.py).

Written: the batches in flight (asynchronous rollout: generated to the end first, in ``in_flight.json``), the
update's state (policy, trainer ranks, critic) through ``RLStep.save_state``, the RNG states of the driver and the
rollout workers, and ``state.json`` (step, weights version, prompt order, guard counts, the summary so far, stage
times). Taken back in two halves: the driver's now (``restore_driver``, the in-flight batches included), the
actors' when they start (``restore_actors``), since they start lazily.

The in-flight batches are JSON (no pickle): each batch's launch version, its rows as indices into the training
prompts (with their texts, checked on resume) and every field of its samples. Python writes a float as the
shortest text that reads back to the same float, so the sampler's log-probs come back bit for bit.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from rlhf.core.checkpoints import resume as checkpoints
from rlhf.core.checkpoints.atomic import atomic_dir, write_json_atomic
from rlhf.core.data.datasets import PromptRow
from rlhf.core.data.samples import Sample
from rlhf.rl.prefetch import LaunchedRollout
from rlhf.rl.schedule import RLSchedule
from rlhf.rl.step import RLStep


def write_checkpoint(output_dir: Path, loop: RLStep, schedule: RLSchedule, run_state: dict, keep: int) -> Path:
    """``output_dir/checkpoints/step_N``, atomically (a run killed while writing leaves no ``step_N``); keeps the
    newest ``keep``. ``run_state``: the run's own entries of state.json (summary, stage times, elapsed seconds, the
    RM directory, the config)."""
    path = checkpoints.checkpoint_dir(output_dir, schedule.steps)
    with atomic_dir(path) as tmp:
        # The batches in flight first: the workers' RNG states and the weights saved next are then those the steps
        # after this checkpoint launch from (rlhf/rl/prefetch.py).
        in_flight = schedule.in_flight(loop)
        if in_flight:  # compact: samples are most of a checkpoint's JSON
            (tmp / checkpoints.IN_FLIGHT_FILE).write_text(json.dumps(in_flight_record(in_flight, schedule.train_rows)))
        rollout_rng = loop.save_state(tmp)
        torch.save({"driver": checkpoints.torch_rng_state(), "rollout": rollout_rng}, tmp / checkpoints.RNG_FILE)
        write_json_atomic(tmp / checkpoints.STATE_FILE, {
            "step": schedule.steps,
            "weights_version": loop.version,
            "prompt_order": checkpoints.python_rng_state(schedule.order.getstate()),
            "python_rng": checkpoints.python_rng_state(random.getstate()),
            "guard": loop.guard.state(),
            "in_flight": len(in_flight),
            **run_state,
        })
    checkpoints.prune_checkpoints(output_dir, keep)
    return path


def restore_driver(checkpoint: checkpoints.Checkpoint, schedule: RLSchedule, metrics_file: Path, log) -> dict:
    """The driver's side of ``checkpoint``: the schedule's step and prompt order, the RNGs; ``metrics.jsonl`` cut
    back to the checkpoint's step; the batches that were in flight, for the first steps to train. Returns
    state.json for the run's own entries."""
    state = checkpoint.state
    if state.get("in_flight"):  # read first: a changed prompt set is refused before anything is touched
        record = json.loads((checkpoint.path / checkpoints.IN_FLIGHT_FILE).read_text())
        schedule.put_back(in_flight_batches(record, schedule.train_rows, checkpoint.path))
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


def in_flight_record(batches: list[LaunchedRollout], train_rows: list[PromptRow]) -> list[dict]:
    """Batches with their samples, as ``in_flight.json`` holds them."""
    index = {id(row): i for i, row in enumerate(train_rows)}  # drawn by RLSchedule.draw: these very objects
    return [{"version": batch.version, "rows": [index[id(row)] for row in batch.rows],
             "prompts": [row.prompt for row in batch.rows], "samples": [asdict(s) for s in batch.samples]}
            for batch in batches]


def in_flight_batches(record: list[dict], train_rows: list[PromptRow], path) -> list[LaunchedRollout]:
    """The inverse of ``in_flight_record``, on the resumed run's training prompts; ``ResumeError`` (naming the
    checkpoint's ``path``) when they are not the checkpointed run's: the saved samples would be trained under
    other prompts."""
    batches = []
    for batch in record:
        rows = [train_rows[i] if 0 <= i < len(train_rows) else None for i in batch["rows"]]
        if [row.prompt if row else None for row in rows] != batch["prompts"]:
            raise checkpoints.ResumeError(f"cannot resume from {path}: its batches in flight were drawn from other "
                                          f"training prompts than this run's (same dataset and task settings?)")
        batches.append(LaunchedRollout(rows, batch["version"], [], [Sample(**s) for s in batch["samples"]]))
    return batches
