"""A run that cannot learn says so: per-component reward figures, and warnings (with the cause and the setting to
change) on a run built to be stuck, in report.md too; a healthy run gets none."""
from __future__ import annotations

import json

import pytest
import yaml

from tests.scoring import reward_worker
from rlhf.outputs.diagnostics import component_figures, fresh_warnings, learning_warnings
from rlhf.outputs.report import write_report

SETTINGS = {"rollout": {"max_new_tokens": 48, "samples_per_prompt": 8, "temperature": 0.7}, "trainer": {"lr": 1e-4}}


def step(n: int, truncated=0.1, no_signal=0.2, accuracy=0.5, grad_norm=0.3) -> dict:
    return {"step": n, "charts/truncated_rate": truncated, "reward/zero_signal_groups": no_signal,
            "reward/accuracy": accuracy, "losses/grad_norm": grad_norm, "reward/mean": accuracy}


# MATH with a too-short token budget: every response cut off, every group all-zero, nothing to learn from.
STUCK = [step(n, truncated=1.0, no_signal=1.0, accuracy=0.0, grad_norm=0.0) for n in range(1, 7)]


def test_component_figures_are_each_components_raw_mean():
    worker = reward_worker({"verifier": 1.0, "custom": 0.5}, custom=lambda p, r, rows: [len(x) for x in r])
    scores = worker.score(["1+1=", "2+2="], ["#2", "#55"], ["2", "4"], [{}, {}])
    assert [s["parts"] for s in scores] == [{"verifier": 1.0, "custom": 2.0}, {"verifier": 0.0, "custom": 3.0}]
    assert component_figures(scores) == {"reward/verifier": 0.5, "reward/custom": 2.5}  # unweighted
    assert component_figures([{"parts": {"rm": float("nan")}}, {"parts": {"rm": 1.0}}]) == {"reward/rm": 1.0}
    assert component_figures([{"reward": 1.0}]) == {}


def test_a_stuck_run_is_named_with_causes_and_settings():
    warnings = learning_warnings(STUCK, SETTINGS)
    assert len(warnings) == 3
    truncated, no_signal, zero_grad = warnings
    assert "most rollouts are truncated (100%" in truncated and "steps 2-6" in truncated
    assert "rollout.max_new_tokens (now 48)" in truncated and "algorithm.overlong_buffer" in truncated
    assert "most groups have no learning signal (100%" in no_signal and "cut off before answering" in no_signal
    assert zero_grad.startswith("the gradient has been zero for the last 3 steps (steps 4-6)")


def test_a_healthy_run_gets_no_warning():
    assert learning_warnings([step(n) for n in range(1, 10)], SETTINGS) == []
    assert learning_warnings([], SETTINGS) == []
    # a stuck start that recovered: only the recent steps count
    assert learning_warnings(STUCK + [step(n) for n in range(7, 13)], SETTINGS) == []


@pytest.mark.parametrize("accuracy, cause", [
    (0.0, "too hard for the policy"), (1.0, "algorithm.dynamic_sampling"),
    (0.5, "rollout.samples_per_prompt (now 8)"),
])
def test_groups_without_signal_name_the_likely_cause(accuracy, cause):
    history = [step(n, no_signal=0.9, accuracy=accuracy) for n in range(1, 6)]
    (warning,) = learning_warnings(history, SETTINGS)
    assert "most groups have no learning signal (90%" in warning and cause in warning


def test_zero_gradient_alone_points_at_the_learning_rate():
    history = [step(1), step(2, grad_norm=0.0), step(3, grad_norm=0.0), step(4, grad_norm=0.0)]
    (warning,) = learning_warnings(history, SETTINGS)
    assert "zero for the last 3 steps (steps 2-4)" in warning and "trainer.lr (now 0.0001)" in warning
    assert learning_warnings(history[:3], SETTINGS) == []  # two zero steps are not yet "several"


def test_report_shows_the_warnings(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in STUCK))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(SETTINGS))
    report = write_report(tmp_path).read_text()
    assert "## Warnings: this run may not be learning" in report
    assert "raise rollout.max_new_tokens (now 48)" in report
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(step(n)) + "\n" for n in range(1, 6)))
    assert "## Warnings" not in write_report(tmp_path).read_text()


def test_the_console_says_each_sign_once_while_it_lasts():
    said: set[str] = set()
    history = [step(n, no_signal=0.9) for n in range(1, 6)]
    assert len(fresh_warnings(history, SETTINGS, said)) == 1
    history.append(step(6, no_signal=0.9))
    assert fresh_warnings(history, SETTINGS, said) == []  # still stuck: not repeated every step
    history += [step(n) for n in range(7, 12)]
    assert fresh_warnings(history, SETTINGS, said) == [] and said == set()  # recovered
    history += [step(n, no_signal=0.9) for n in range(12, 17)]
    assert len(fresh_warnings(history, SETTINGS, said)) == 1  # stuck again: said again
