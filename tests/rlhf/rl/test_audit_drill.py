"""The reward-hacking drill: the reward goes wrong mid-run (a custom reward that agreed with the teacher starts
rewarding length) and the teacher audit's alarm must fire within 5 audit intervals; with
``reward.audit_stop_on_alarm`` the RL stage stops there with one line, and report.md says so. A tiny run on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf import Trainer
from rlhf.core.config.run_config import load_config
from rlhf.rl.audit import audit_stop
from tests.paths import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def swappable_reward(flag: Path):
    """The teacher's own judgement (the arithmetic oracle's quality) until ``flag`` exists, then response length:
    a reward model gone wrong, swapped in under the running job. Runs in the reward workers (cloudpickled)."""
    def reward(prompts, responses, rows):
        import os

        from reward.teachers.oracle import OracleTeacher

        if os.path.exists(flag):
            return [float(len(r)) for r in responses]
        return [v.quality for v in OracleTeacher().judge(prompts, responses, [None] * len(prompts))]

    return reward


def test_the_audit_alarm_fires_when_the_reward_goes_wrong_and_stops_the_run(tmp_path):
    flag, out, lines = tmp_path / "corrupted", tmp_path / "run", []
    cfg = load_config(TINY, [f"output_dir={out}", "reward.components={custom: 1.0}", "reward.audit_every=1",
                             "reward.audit_samples=16", "reward.audit_stop_on_alarm=true", "algorithm.steps=12",
                             "warmup.steps=30", "rollout.temperature=1.2"])
    with Trainer(cfg, reward_fn=swappable_reward(flag), log=lines.append) as trainer:
        trainer.warmup()
        honest = [trainer.step() for _ in range(2)]
        assert [m["audit/alarm"] for m in honest] == [0.0, 0.0], honest
        assert sum(m["audit/pairs"] for m in honest) > 0  # the teacher told samples apart: agreement was measured
        flag.touch()
        corrupted = trainer.train(steps=10)
    assert 1 <= len(corrupted) <= 5, [m.get("audit/rm_teacher_agreement") for m in corrupted]  # 5 audit intervals
    assert corrupted[-1]["audit/alarm"] == 1.0 and trainer.steps == 2 + len(corrupted)
    [stop] = [line for line in lines if line.startswith("stopped at step")]
    assert f"stopped at step {trainer.steps}: the teacher audit's agreement" in stop and "\n" not in stop
    assert json.loads((out / "summary.json").read_text())["audit_stopped_at"] == trainer.steps
    report = (out / "report.md").read_text()
    assert f"**Audit alarm** at step {trainer.steps}" in report
    assert f"The run was stopped at step {trainer.steps} (`reward.audit_stop_on_alarm`)" in report


@pytest.mark.parametrize("stop_on_alarm, alarm, expected", [(True, 1.0, True), (True, 0.0, False),
                                                             (False, 1.0, False)])
def test_audit_stop_only_with_the_setting_and_an_alarm(stop_on_alarm, alarm, expected):
    cfg = load_config(None, [f"reward.audit_stop_on_alarm={stop_on_alarm}"]).reward
    metrics = {"step": 7, "audit/alarm": alarm, "audit/rm_teacher_agreement": 0.3, "audit/pairs": 12}
    assert (audit_stop(metrics, cfg) is not None) == expected
