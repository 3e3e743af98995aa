"""Checkpoints and resume (rlhf/core/checkpoints/resume.py): which checkpoints count as complete, pruning, metrics truncation, the
config-change check and its messages; then the end-to-end invariant: 4 RL steps straight equal 2 steps, a hard
kill of the driver process, and a resume to 4 (metrics and final weights), on CPU with fixed seeds."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rlhf.core.config.run_config import load_config
from rlhf.core.checkpoints.resume import (
    RNG_FILE,
    STATE_FILE,
    ResumeError,
    check_config,
    complete_checkpoints,
    config_changes,
    newest_checkpoint,
    prune_checkpoints,
    python_rng_state,
    python_rng_tuple,
    stored_path,
    truncate_metrics,
    with_reward_model_dir,
)
from tests.paths import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def fake_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    path = out / "checkpoints" / f"step_{step}"
    (path / "policy").mkdir(parents=True)
    if complete:
        (path / RNG_FILE).write_bytes(b"x")
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_only_checkpoints_with_their_state_file_count_and_the_newest_wins(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)  # killed before state.json was written
    (tmp_path / "checkpoints" / "step_14.tmp").mkdir()  # killed while being filled
    torn = fake_checkpoint(tmp_path, 16)
    (torn / STATE_FILE).write_text('{"step": 1')  # cut short
    wrong = fake_checkpoint(tmp_path, 18)
    (wrong / STATE_FILE).write_text('{"step": 4}')  # not this directory's step
    assert [c.step for c in complete_checkpoints(tmp_path)] == [2, 10]
    assert newest_checkpoint(tmp_path).path == tmp_path / "checkpoints" / "step_10"


def test_prune_keeps_the_newest_k_and_removes_interrupted_writes(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step_8.tmp").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_6"]


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "rew')
    assert truncate_metrics(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(tmp_path / "absent.jsonl", 2) == 0


def test_python_rng_state_round_trips_through_json():
    rng = random.Random(5)
    rng.random()
    state = json.loads(json.dumps(python_rng_state(rng.getstate())))
    expected = [rng.random() for _ in range(3)]
    other = random.Random()
    other.setstate(python_rng_tuple(state))
    assert [other.random() for _ in range(3)] == expected


def dumped(*overrides: str) -> dict:
    return load_config(TINY, list(overrides)).model_dump()


def test_harmless_changes_are_accepted_and_listed():
    accepted = check_config(dumped(), dumped("algorithm.steps=10", "save_every=5", "call_timeout_s=30",
                                             "output_dir=/elsewhere"), step=2, output_dir="runs/x")
    assert accepted == ["algorithm.steps 2 -> 10", "call_timeout_s 600.0 -> 30.0",
                        "output_dir 'runs/tiny' -> '/elsewhere'", "save_every 0 -> 5"]
    assert check_config(dumped(), dumped(), step=2, output_dir="runs/x") == []
    assert check_config(dumped(), dumped("cluster.address=auto"), step=2, output_dir="runs/x") == [
        "cluster.address 'local' -> 'auto'"]


def test_meaningful_changes_are_refused_in_one_line_naming_every_key():
    with pytest.raises(ResumeError) as info:
        check_config(dumped(), dumped("seed=1", "model.hidden_size=64", "rollout.samples_per_prompt=8",
                                      "algorithm.steps=10"), step=2, output_dir="runs/x")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot resume runs/x from step 2: ")
    for key in ("model.hidden_size 32 -> 64", "rollout.samples_per_prompt 4 -> 8", "seed 0 -> 1"):
        assert key in message
    assert "algorithm.steps" not in message  # harmless, so not among the reasons


def test_algorithm_and_reward_changes_are_refused():
    harmless, refused = config_changes(dumped(), dumped("algorithm.advantage=rloo", "reward.components={verifier: 2.0}",
                                                        "trainer.zero_stage=2", "algorithm.kl_coef=0.1"))
    assert harmless == []
    assert [r.split()[0] for r in refused] == ["algorithm.advantage", "algorithm.kl_coef", "reward.components",
                                               "trainer.zero_stage"]


def test_fewer_steps_than_the_checkpoint_is_refused():
    with pytest.raises(ResumeError, match="algorithm.steps=1 is below the checkpoint's step 2"):
        check_config(dumped(), dumped("algorithm.steps=1"), step=2, output_dir="runs/x")


# ------------------------------------------------------------ paths in state.json: relative to the run directory


def fake_reward_model(path: Path) -> Path:
    """What check_model_dir asks of a reward model directory (no weights worth loading)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForSequenceClassification"]}))
    save_file({"score.weight": torch.zeros(1, 4)}, path / "model.safetensors")
    return path


def checkpoint_naming(out: Path, reward_model_dir, written_in: Path | None = None):
    from rlhf.core.checkpoints.resume import Checkpoint

    state = {"step": 2, "reward_model_dir": reward_model_dir, "config": {"output_dir": str(written_in or out)}}
    return Checkpoint(out / "checkpoints" / "step_2", 2, state)


def test_paths_inside_the_run_directory_are_stored_relative_to_it(tmp_path):
    out = tmp_path / "run"
    assert stored_path(out / "reward_model", out) == "reward_model"
    assert stored_path(tmp_path / "elsewhere" / "rm", out) == str(tmp_path / "elsewhere" / "rm")
    assert stored_path(None, out) is None


def test_a_copied_or_moved_run_directory_resumes_with_its_own_reward_model(tmp_path):
    original, copy = tmp_path / "original", tmp_path / "copy"
    fake_reward_model(original / "reward_model")
    fake_reward_model(copy / "reward_model")
    assert with_reward_model_dir(checkpoint_naming(copy, "reward_model"), copy).reward_model_dir == \
        (copy / "reward_model").resolve()
    # state.json written before paths were relative: an absolute path into the directory it was written in.
    legacy = checkpoint_naming(copy, str(original / "reward_model"), written_in=original)
    assert with_reward_model_dir(legacy, copy).reward_model_dir == (copy / "reward_model").resolve()
    assert with_reward_model_dir(checkpoint_naming(copy, None), copy).reward_model_dir is None


@pytest.mark.parametrize("named, message", [
    ("reward_model", "does not exist"),                 # moved without its reward model
    ("../original/reward_model", "outside the run directory"),
    ("{tmp}/nowhere/rm", "does not exist"),              # an edited absolute path
    ("policy", "has no config.json"),                    # a directory that is no reward model
    (7, "not a path"),
])
def test_a_reward_model_dir_in_state_json_that_cannot_be_used_is_refused_in_one_line(tmp_path, named, message):
    fake_reward_model(tmp_path / "original" / "reward_model")
    out = tmp_path / "moved"
    (out / "policy").mkdir(parents=True)
    named = named.format(tmp=tmp_path) if isinstance(named, str) else named
    with pytest.raises(ResumeError, match=message) as err:
        with_reward_model_dir(checkpoint_naming(out, named), out)
    assert "\n" not in str(err.value) and "reward_model_dir" in str(err.value)


# ------------------------------------------------------------------- the invariant, end to end through Ray

# configs/tiny.yaml (2 ZeRO-3 trainer ranks, KL to the reference) for 4 steps, a checkpoint every 2. The tiny
# student never answers right, so the verifier's rewards are all 0; the overlong penalty (from 4 tokens on) gives
# rewards that differ within groups, hence real updates, through which a lost optimizer state would show.
RUN = ["algorithm.steps=4", "save_every=2", "algorithm.overlong_buffer=12", "trainer.lr=0.01"]

# The driver process of a run that kills itself (SIGKILL: no clean-up, no atexit) once step 3's metrics line is
# written: past the step-2 checkpoint, so the resume must also drop that line and redo step 3.
KILLED_DRIVER = textwrap.dedent("""
    import os, signal, sys
    from rlhf.api import run
    from rlhf.core.config.run_config import load_config

    def log(line):
        print(line, flush=True)
        if line.startswith("step 3"):
            os.kill(os.getpid(), signal.SIGKILL)

    run(load_config(sys.argv[1], sys.argv[2:]), log=log)
""")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timings(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("perf/") or k == "perf/logprob_mismatch"}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "policy" / "model.safetensors")


def ray_processes(pids: set[int]) -> dict:
    """The live processes among ``pids`` by command line."""
    import psutil

    found = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        found[f"{pid} {command[:60]}"] = process
    return found


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from rlhf.cli import main

    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["run", TINY, f"output_dir={out}", *RUN]) == 0
    return out


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_metrics_and_weights(straight, tmp_path, capsys):
    import psutil

    from rlhf.cli import main

    out = tmp_path / "run"
    stderr_file = tmp_path / "stderr.txt"  # a file, not a pipe: Ray's logging could fill a pipe and block the run
    with open(stderr_file, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, TINY, f"output_dir={out}", *RUN], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    children: set[int] = set()
    try:
        while proc.poll() is None:  # the Ray processes it starts, to check they do not outlive it
            try:
                children |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        stdout = proc.communicate(timeout=600)[0]
        assert proc.returncode == -signal.SIGKILL, stdout + stderr_file.read_text()[-3000:]
        assert "checkpoint step 2" in stdout and "step 3/4" in stdout and "step 4/4" not in stdout
        # Ray's head (GCS, raylet) shares the driver's fate and takes the actors with it; its dashboard and
        # runtime-env agents, which would wait a minute on the dead GCS, are ended by rlhf/core/distributed/reaper.py.
        _, alive = psutil.wait_procs(list(ray_processes(children).values()), timeout=20)
        assert not alive, f"the killed driver left {[ray_processes({p.pid}) for p in alive]}"
    finally:
        for pid in children:  # only the processes that driver started
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert not (out / "summary.json").exists()

    # A change that would make the resumed run another run is refused, and nothing is touched.
    assert main(["run", TINY, f"output_dir={out}", *RUN, "seed=1", "rollout.max_new_tokens=8", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rollout.max_new_tokens 16 -> 8" in err and "seed 0 -> 1" in err
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    # Without --resume the checkpoints are not silently thrown away either.
    assert main(["run", TINY, f"output_dir={out}", *RUN]) == 2
    assert "continue it with --resume" in capsys.readouterr().err

    # A harmless change is accepted and reported; the run continues from step 2.
    assert main(["run", TINY, f"output_dir={out}", *RUN, "call_timeout_s=300", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "from step 2" in printed and "call_timeout_s 600.0 -> 300.0" in printed and "step 3/4" in printed
    resumed, expected = metrics(out), metrics(straight)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [without_timings(m) for m in resumed] == [without_timings(m) for m in expected]
    weights, expected_weights = final_weights(out), final_weights(straight)
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)
    summary, expected_summary = (json.loads((d / "summary.json").read_text()) for d in (out, straight))
    assert summary["steps"] == 4 and summary["eval_after"] == expected_summary["eval_after"]
    assert summary["eval_before"] == expected_summary["eval_before"]


def test_an_edited_reward_model_dir_is_refused_before_metrics_are_cut(straight, tmp_path, capsys):
    import shutil

    from rlhf.cli import main

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "summary.json").unlink()  # as if killed after step 4, before the end of the run
    for state_file in (out / "checkpoints").glob(f"step_*/{STATE_FILE}"):
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "reward_model_dir": str(tmp_path / "nowhere")}))
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5}) + "\n")  # a line the resume would cut
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", TINY, f"output_dir={out}", *RUN, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reward_model_dir" in err and "nowhere" in err
    assert (out / "metrics.jsonl").read_text() == before


def test_resuming_a_finished_run_says_so_and_trains_nothing(straight, capsys):
    from rlhf.cli import main

    before = (straight / "metrics.jsonl").read_text(), (straight / "summary.json").read_text()
    assert main(["run", TINY, f"output_dir={straight}", *RUN, "--resume"]) == 0
    assert "holds a finished run (4 RL steps): nothing to resume" in capsys.readouterr().out
    assert ((straight / "metrics.jsonl").read_text(), (straight / "summary.json").read_text()) == before


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_a_tampered_checkpoint_is_refused_and_a_damaged_one_passed_over(straight, tmp_path, capsys):
    import shutil

    from rlhf.cli import main

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "summary.json").unlink()  # as if killed after step 4, before the end of the run
    step_2 = out / "checkpoints" / "step_2"
    model_states = sorted((step_2 / "trainer").rglob("*model_states.pt"))[0]
    original = model_states.read_bytes()
    state = torch.load(model_states, weights_only=False)
    state["module_hook"] = _Payload(tmp_path / "ran")
    torch.save(state, model_states)
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", TINY, f"output_dir={out}", *RUN, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_states.pt holds objects a checkpoint never holds" in err
    assert not (tmp_path / "ran").exists() and (out / "metrics.jsonl").read_text() == before

    # A newer checkpoint whose rng.pt is damaged: passed over, with a warning, for step 2.
    model_states.write_bytes(original)
    step_4 = out / "checkpoints" / "step_4"
    shutil.copytree(step_2, step_4)
    (step_4 / STATE_FILE).write_text(json.dumps({**json.loads((step_2 / STATE_FILE).read_text()), "step": 4}))
    (step_4 / RNG_FILE).write_bytes(b"\x00" * 64)
    assert main(["run", TINY, f"output_dir={out}", *RUN, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "warning: checkpoint step 4 is damaged" in printed and "from step 2" in printed
    assert [without_timings(m) for m in metrics(out)] == [without_timings(m) for m in metrics(straight)]
