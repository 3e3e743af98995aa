"""Checkpoints of a whole RL run, and resuming one exactly where it stopped.

A checkpoint is a directory ``output_dir/checkpoints/step_N`` holding everything the next step depends on:

    policy/      the policy, Hugging Face format (safetensors): usable on its own (``distilrl serve``)
    trainer/     every DeepSpeed rank's engine state (weights, optimizer, scheduler) and torch RNG state
    rng.pt       torch RNG states of the driver and of every rollout worker (they sample with them)
    in_flight.json  asynchronous rollout: the batches launched ahead and not trained on yet, generated to the end
                 (rows, launch version, samples), which the steps after the checkpoint train (rlhf/rl/prefetch.py)
    state.json   the driver: step, weights version, the prompt picker's state, the guard's counts, the summary so
                 far, the config the run had. Written last: a directory without it is not a checkpoint

It is filled in ``step_N.tmp`` and renamed into place (``rlhf.checkpoint.atomic_dir``), so a run killed while
writing leaves no ``step_N`` at all, and ``state.json`` is checked besides, so a partial one is never taken for a
complete one. The newest ``keep_checkpoints`` are kept.

Resuming compares the config with the checkpoint's: a change that alters what the next steps compute (model,
data, seed, batch shape, algorithm, ...) is refused with one line naming the keys; a change that does not (more
steps, the checkpoint interval, timeouts, thread counts) is accepted and reported.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rlhf.core.models import safe_load
from rlhf.core.models.build import ModelLoadError, check_model_dir
from rlhf.core.config.run_config import ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
RNG_FILE = "rng.pt"
IN_FLIGHT_FILE = "in_flight.json"

# Keys whose change leaves the remaining steps' computation as it was (or changes it only in float rounding:
# thread counts, micro-batch split, recomputed activations). Every other key must match the checkpoint's config.
HARMLESS_KEYS = (
    "output_dir", "algorithm.steps", "save_every", "keep_checkpoints", "max_bad_batches", "call_timeout_s",
    "rollout.threads", "trainer.threads", "trainer.micro_batch_size", "eval.batch_size", "label.concurrency",
    "reward.num_workers", "reward.audit_every", "reward.audit_samples", "reward.audit_warn_below",
    "reward.audit_stop_on_alarm",
    "trainer.gradient_checkpointing",
)
# Where the actors run (cluster address, per-role resources, placement) does not change what they compute.
HARMLESS_SECTIONS = ("cluster.",)


class ResumeError(ConfigError):
    """A run that cannot be resumed as asked (its config changed in a way that matters), in one line."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict  # state.json
    reward_model_dir: Path | None = None  # state.json's, resolved and checked (``with_reward_model_dir``)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step}"


def complete_checkpoints(output_dir: str | Path) -> list[Checkpoint]:
    """The complete checkpoints in ``output_dir``, oldest first. ``step_N.tmp`` (being written) and ``step_N``
    without a readable ``state.json`` of step N are skipped."""
    found = []
    root = Path(output_dir) / CHECKPOINTS
    for path in root.iterdir() if root.is_dir() else ():
        match = re.fullmatch(r"step_(\d+)", path.name)
        if not match or not path.is_dir():
            continue
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if state.get("step") == int(match.group(1)) and (path / RNG_FILE).is_file():
            found.append(Checkpoint(path, state["step"], state))
    return sorted(found, key=lambda c: c.step)


def newest_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def newest_usable_checkpoint(output_dir: str | Path, log=print) -> Checkpoint | None:
    """The newest complete checkpoint whose files all read back safely. A damaged one (a corrupt ``rng.pt``, a
    truncated DeepSpeed state: a write cut short on another disk, a copy gone wrong) is passed over for the one
    before it, with a warning; one holding objects a checkpoint never holds (possibly code) is refused:
    ``ResumeError``, since someone put them there and an older checkpoint from the same hands is no safer."""
    found = complete_checkpoints(output_dir)
    for checkpoint in reversed(found):
        try:
            check_checkpoint_files(checkpoint.path)
        except safe_load.UnsafeCheckpointError as e:
            raise ResumeError(f"cannot resume {output_dir}: {e}") from None
        except safe_load.DamagedCheckpointError as e:
            log(f"warning: checkpoint step {checkpoint.step} is damaged, passed over: {e}")
            continue
        return checkpoint
    if found:
        raise ResumeError(f"cannot resume {output_dir}: all {len(found)} checkpoint(s) are damaged (see the "
                          f"warnings above): start a new run in another output_dir")
    return None


def check_checkpoint_files(path: Path) -> None:
    """Every ``.pt`` file of a checkpoint is safe to load and readable; ``rng.pt`` is loaded whole (it is small)
    and the trainer state has a model and an RNG file per rank (a copy that lost files counts as damaged)."""
    safe_load.check_files(path)
    rng = load_rng_file(path / RNG_FILE)
    if not isinstance(rng, dict) or "driver" not in rng or "rollout" not in rng:
        raise safe_load.DamagedCheckpointError(f"{path / RNG_FILE} does not hold the driver's and the rollout "
                                               f"workers' RNG states")
    _check_in_flight(path)
    trainer = path / "trainer"
    models = list(trainer.rglob("*model_states.pt"))
    ranks = list(trainer.glob("rng_rank*.pt"))
    if not models or len(ranks) != len(models):
        raise safe_load.DamagedCheckpointError(f"{trainer} is incomplete: {len(models)} DeepSpeed model state "
                                               f"file(s) and {len(ranks)} rank RNG file(s)")


def _check_in_flight(path: Path) -> None:
    """``in_flight.json`` holds as many batches as state.json says were in flight (a lost or cut-short file would
    make the resumed run skip those prompts)."""
    expected = json.loads((path / STATE_FILE).read_text()).get("in_flight", 0)
    if not expected:
        return
    try:
        batches = json.loads((path / IN_FLIGHT_FILE).read_text())
    except (OSError, ValueError) as err:
        raise safe_load.DamagedCheckpointError(f"{path / IN_FLIGHT_FILE} cannot be read: {err}") from None
    if not isinstance(batches, list) or len(batches) != expected:
        raise safe_load.DamagedCheckpointError(f"{path / IN_FLIGHT_FILE} does not hold the {expected} batch(es) "
                                               f"in flight that {STATE_FILE} names")


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and leftovers of interrupted writes)."""
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old.path)
    root = Path(output_dir) / CHECKPOINTS
    for leftover in root.glob("step_*.*"):  # step_N.tmp / step_N.old: a write that was interrupted
        shutil.rmtree(leftover, ignore_errors=True)


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(harmless, refused) changes between two resolved configs (``RunConfig.model_dump()``), each as
    ``"key old -> new"`` with dotted keys."""
    harmless, refused = [], []
    old, new = _flatten(saved), _flatten(current)
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            text = f"{key} {old.get(key)!r} -> {new.get(key)!r}"
            (harmless if key in HARMLESS_KEYS or key.startswith(HARMLESS_SECTIONS) else refused).append(text)
    return harmless, refused


def check_config(saved: dict, current: dict, step: int, output_dir: str | Path) -> list[str]:
    """Raise ``ResumeError`` if the resumed run would not continue the checkpointed one; returns the accepted
    (harmless) changes."""
    harmless, refused = config_changes(saved, current)
    if refused:
        raise ResumeError(f"cannot resume {output_dir} from step {step}: these config keys differ from the "
                          f"checkpoint's and change what the run computes: {'; '.join(refused)} (use the "
                          f"checkpoint's values, or start a new run in another output_dir)")
    steps = current["algorithm"]["steps"]
    if steps < step:
        raise ResumeError(f"cannot resume {output_dir}: algorithm.steps={steps} is below the checkpoint's step "
                          f"{step}")
    return harmless


def stored_path(path: str | Path | None, output_dir: str | Path) -> str | None:
    """A path as state.json keeps it: relative to the run directory when it lies inside it (so that a copied or
    moved run directory names its own files), absolute otherwise."""
    if path is None:
        return None
    resolved, root = Path(path).resolve(), Path(output_dir).resolve()
    return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(resolved)


def with_reward_model_dir(checkpoint: Checkpoint, output_dir: str | Path) -> Checkpoint:
    """``checkpoint`` with the reward model directory its state.json names, resolved and checked like
    ``reward_model.path`` before anything in the run directory changes (``ResumeError``, one line). A relative
    path is the run directory's own (wherever the directory is now); an absolute one inside the directory the
    checkpoint was written in (state.json from before paths were kept relative) moves with it; a relative one may
    not lead out of the run directory."""
    saved = checkpoint.state.get("reward_model_dir")
    if saved is None:
        return checkpoint
    where = f"{checkpoint.path / STATE_FILE} names reward_model_dir {saved!r}"
    if not isinstance(saved, str) or not saved:
        raise ResumeError(f"cannot resume {output_dir}: {where}, not a path")
    root, path = Path(output_dir).resolve(), Path(saved)
    if not path.is_absolute():
        path = (root / path).resolve()
        if not path.is_relative_to(root):
            raise ResumeError(f"cannot resume {output_dir}: {where}, outside the run directory")
    else:
        written_in = Path(str(checkpoint.state.get("config", {}).get("output_dir") or root)).resolve()
        if path.is_relative_to(written_in):
            path = root / path.relative_to(written_in)
    try:
        check_model_dir(path, where, "ForSequenceClassification")
    except ModelLoadError as err:
        raise ResumeError(f"cannot resume {output_dir}: {err}") from None
    return replace(checkpoint, reward_model_dir=path)


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (and drop a line cut short by a kill); returns how many
    were dropped. The resumed run appends steps step+1... again, so none appears twice."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


# ------------------------------------------------------------------------------------------------ RNG states


def python_rng_state(state: tuple) -> list:
    """A ``random.Random.getstate()`` as JSON: [version, [625 ints], gauss_next]."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def python_rng_tuple(state: list) -> tuple:
    """The inverse of ``python_rng_state``: what ``setstate`` takes."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def torch_rng_state() -> dict:
    """This process's torch generators: the CPU one, and every CUDA device's where there are any."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_torch_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_file(path: str | Path) -> dict:
    """An ``rng.pt`` / ``rng_rankN.pt``, read without unpickling code (see rlhf.core.models.safe_load)."""
    return safe_load.load_weights_only(Path(path))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        # Sections are nested dicts; reward.components is a dict value, compared as a whole.
        if isinstance(value, dict) and name != "reward.components":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
