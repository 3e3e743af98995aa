"""The Python API (rlhf.run, rlhf.Trainer) from a script's point of view: only public names, tiny runs on CPU.

Every Ray-using test checks that the run leaves no Ray process behind, including when an exception ends the
``with`` block. Reward functions are defined inside the tests: Ray pickles them by value then, as it does for a
script's own functions (this module is not importable in a Ray worker).
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets
import psutil
import pytest
import ray

import rlhf
from tests.scoring import reward_worker
from tests.paths import REPO

# configs/tiny.yaml, built in code.
TINY = dict(
    stages=["warmup", "rl", "eval"],
    model={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
    task={"train_prompts": 64, "eval_prompts": 20},
    warmup={"steps": 10, "batch_size": 16},
    rollout={"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 16},
    trainer={"num_ranks": 2, "zero_stage": 3, "micro_batch_size": 4},
    algorithm={"steps": 2, "kl_coef": 0.01},
    eval={"max_new_tokens": 16},
)


def sums_dataset(pairs) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"question": f"{a}+{b}=", "solution": str(a + b), "level": 1 + (a > 4),
                                        "source": "sums"} for a, b in pairs])


def step_config(out: Path, **reward) -> rlhf.RunConfig:
    """A small run rewarded by the verifier and a custom function, on Datasets with their own column names."""
    return rlhf.RunConfig(
        output_dir=str(out), model=TINY["model"],
        task={"prompt_field": "question", "answer_field": "solution", "difficulty_field": "level"},
        warmup={"steps": 4, "batch_size": 8},
        rollout={"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 8},
        reward=reward or {"components": {"verifier": 1.0, "custom": 0.5}},
        trainer={"num_ranks": 1, "micro_batch_size": 16}, eval={"max_new_tokens": 8})


class RayProcesses:
    """The processes a run starts below this one (Ray's GCS, raylet, ``ray::`` workers), seen while it runs."""

    def __init__(self):
        self.before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.seen: dict[int, float] = {}

    def snapshot(self, *_) -> None:
        for p in psutil.Process().children(recursive=True):
            if p.pid not in self.before:
                self.seen[p.pid] = p.create_time()

    def workers_seen(self) -> int:
        return sum(_alive(pid, t) and "ray::" in " ".join(psutil.Process(pid).cmdline())
                   for pid, t in self.seen.items())

    def assert_all_gone(self, within_s: float = 20.0) -> None:
        assert not ray.is_initialized()
        deadline = time.monotonic() + within_s
        while (left := [pid for pid, t in self.seen.items() if _alive(pid, t)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray processes still running: {left}"


def _alive(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------------------------------------------------- Ray-free checks


def test_config_in_code_is_the_yaml_tree():
    from_yaml = rlhf.load_config(REPO / "configs" / "tiny.yaml", ["output_dir=x"])
    assert rlhf.RunConfig(output_dir="x", **TINY) == from_yaml


def test_reward_function_and_its_weight_come_together(tmp_path):
    with pytest.raises(rlhf.ConfigError, match="reward.components.custom needs a reward function"):
        rlhf.Trainer(step_config(tmp_path / "a"))
    with pytest.raises(rlhf.ConfigError, match="reward_fn has no weight: set reward.components.custom"):
        rlhf.Trainer(rlhf.RunConfig(output_dir=str(tmp_path / "b"), **TINY), reward_fn=lambda p, r, rows: [0.0])


def test_bad_dataset_is_refused_before_anything_starts(tmp_path):
    cfg = step_config(tmp_path / "run", components={"verifier": 1.0})
    bad = datasets.Dataset.from_list([{"question": " ", "solution": "2", "level": 1},
                                      {"question": "", "solution": "3", "level": 1}])
    with pytest.raises(rlhf.DatasetError, match=r"train_dataset has no usable rows \(2 skipped\); the first: "
                                                r"train_dataset\[0\]: field 'question' must be non-empty text"):
        rlhf.Trainer(cfg, train_dataset=bad)
    # A bad row among good ones is skipped; too few left for a step is refused.
    with pytest.raises(rlhf.DatasetError, match=r"only 3 training prompts for rollout.prompts_per_step=4"):
        rlhf.Trainer(cfg, train_dataset=datasets.concatenate_datasets([sums_dataset([(1, 2)] * 3), bad]))
    renamed = sums_dataset([(1, 2)]).rename_column("question", "prompt")
    with pytest.raises(rlhf.DatasetError, match=r"eval_dataset\[0\] has no field 'question' \(fields: level, "
                                                r"prompt, solution, source\); set task.prompt_field"):
        rlhf.Trainer(cfg, train_dataset=sums_dataset([(1, 2)] * 4), eval_dataset=renamed)
    with pytest.raises(rlhf.DatasetError, match=r"not a DatasetDict: pass one split"):
        rlhf.Trainer(cfg, train_dataset=datasets.DatasetDict({"train": sums_dataset([(1, 2)])}))
    assert not ray.is_initialized()


def test_custom_reward_component_weights_and_errors():
    rows = [{"question": "1+1="}, {"question": "2+2="}]
    # Instead of the verifier: the reward is the function's, times its weight.
    alone = reward_worker({"custom": 2.0}, custom=lambda p, r, rows: [len(x) for x in r])
    assert [s["reward"] for s in alone.score(["1+1=", "2+2="], ["#2", "#5"], ["2", "4"], rows)] == [4.0, 4.0]
    # Beside it: the weighted sum; the verifier's verdict is reported either way.
    beside = reward_worker({"verifier": 1.0, "custom": 0.5}, custom=lambda p, r, rows: [1.0, 0.0])
    scores = beside.score(["1+1=", "2+2="], ["#2", "#5"], ["2", "4"], rows)
    assert [s["reward"] for s in scores] == [1.5, 0.0] and [s["correct"] for s in scores] == [1.0, 0.0]

    def fails_on_four(prompts, responses, rows):
        return [1.0 / (row["question"] != "2+2=") for row in rows]

    with pytest.raises(rlhf.RewardError, match=r"reward_fn raised ZeroDivisionError.* prompt '2\+2=', response '#5'"):
        reward_worker({"custom": 1.0}, custom=fails_on_four).score(["1+1=", "2+2="], ["#2", "#5"], ["2", "4"], rows)
    with pytest.raises(rlhf.RewardError, match="returned 1 rewards for 2 responses"):
        reward_worker({"custom": 1.0}, custom=lambda p, r, rows: [1.0]).score(["a", "b"], ["x", "y"], ["1", "2"], rows)
    with pytest.raises(rlhf.RewardError, match=r"returned 'high', not a number, for prompt 'b', response 'y'"):
        reward_worker({"custom": 1.0}, custom=lambda p, r, rows: [1.0, "high"]).score(["a", "b"], ["x", "y"],
                                                                                    ["1", "2"], rows)
    # A NaN is returned, naming its component, for the driver's guard to skip the batch
    # (tests/rlhf/core/test_guards.py).
    scores = reward_worker({"custom": 1.0}, custom=lambda p, r, rows: [float("nan"), 1.0]).score(
        ["a", "b"], ["x", "y"], ["1", "2"], rows)
    assert scores[0]["nonfinite"] == "custom=nan" and "nonfinite" not in scores[1]


# ----------------------------------------------------------------------------------------------- runs through Ray


def test_run_the_whole_pipeline_from_python(tmp_path):
    ray_procs = RayProcesses()
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("step "):
            ray_procs.snapshot()

    # eval.every=1: a learning-curve point after step 1 (none after the last step: eval_after is that one)
    result = rlhf.run(rlhf.RunConfig(output_dir=str(tmp_path / "run"), **{**TINY, "eval": {
        "max_new_tokens": 16, "every": 1}}), log=log)

    assert isinstance(result, rlhf.RunResult) and result.output_dir == tmp_path / "run"
    assert result.summary == json.loads((result.output_dir / "summary.json").read_text())
    assert result.summary["steps"] == 2 and {"eval_before", "eval_after", "warmup"} <= set(result.summary)
    curve = result.summary["eval_curve"]
    assert [p["step"] for p in curve] == [1] and curve[0]["n"] == 20 and "1" in curve[0]["by_difficulty"]
    assert any(line.startswith("eval at step 1: accuracy") for line in lines)
    assert result.policy_dir == result.output_dir / "policy" and (result.policy_dir / "model.safetensors").is_file()
    assert result.reward_model_dir is None
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/2", "2/2"]
    assert ray_procs.seen, "no Ray process was seen while the run was going"
    ray_procs.assert_all_gone()


def test_rl_steps_one_by_one_with_a_reward_function_and_datasets_then_an_error(tmp_path):
    """One Ray session (they cost tens of seconds each on a small box): custom steps, then an exception inside the
    ``with`` block, which must propagate and still stop every Ray process."""
    record, broken = tmp_path / "rewards.jsonl", tmp_path / "broken"

    def short_responses(prompts, responses, rows):
        # Runs in a reward worker: what it returns and sees is written where the test can read it. Once the test
        # creates ``broken``, it fails, as a reward function calling a service that went down would.
        import json
        import os

        if os.path.exists(broken):
            raise ConnectionError("reward service down")
        rewards = [1.0 if len(response) < 5 else 0.25 for response in responses]
        with open(record, "a") as f:
            f.write(json.dumps({"rewards": rewards, "columns": sorted(rows[0]), "prompts": prompts}) + "\n")
        return rewards

    ray_procs = RayProcesses()
    train = sums_dataset([(a, b) for a in range(10) for b in range(4)])
    held_out = sums_dataset([(a, 9) for a in range(10)])
    with pytest.raises(rlhf.RewardError, match=r"reward_fn raised ConnectionError\('reward service down'\) on "
                                               r"prompt '\d\+\d=', response '"):
        with rlhf.Trainer(step_config(tmp_path / "run"), reward_fn=short_responses, train_dataset=train,
                          eval_dataset=held_out, log=lambda line: None) as trainer:
            trainer.warmup()
            before = trainer.evaluate()
            ray_procs.snapshot()
            assert ray_procs.workers_seen() >= 3  # rollout worker, reward worker, trainer rank
            steps = [trainer.step() for _ in range(2)]
            policy = trainer.save(tmp_path / "my_policy")
            after = trainer.evaluate()
            summary = trainer.summary
            broken.touch()
            trainer.step()

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2  # once per RL step: evaluation is the verifier's alone
    for metrics, call in zip(steps, calls):
        # reward = 1.0 x verifier (correct: 1, else 0) + 0.5 x the function's reward
        custom_mean = sum(call["rewards"]) / len(call["rewards"])
        assert metrics["reward/mean"] == pytest.approx(metrics["reward/accuracy"] + 0.5 * custom_mean, abs=1e-6)
        assert call["columns"] == ["level", "question", "solution", "source"]
        assert set(call["prompts"]) <= set(train["question"])
    assert [m["step"] for m in steps] == [1, 2]
    assert before["n"] == after["n"] == 10 and set(after["by_difficulty"]) == {"1", "2"}
    assert summary["steps"] == 2 and summary["eval_before"] == before and summary["eval_after"] == after
    assert (policy / "model.safetensors").is_file()
    ray_procs.assert_all_gone()
    assert not (tmp_path / "run" / "summary.json").exists()  # a failed run is not a finished one


def test_readme_scripting_example_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Scripting\n", 1)[1].split("\n## ", 1)[0]
    script = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "example.py").write_text(script)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accuracy after RL:" in done.stdout and "my step 3:" in done.stdout
    summary = json.loads((tmp_path / "runs" / "scripting" / "summary.json").read_text())
    assert summary["steps"] == 3 and "eval_after" in summary
