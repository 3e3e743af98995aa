"""benchmarks/real_vs_trl.py without a model: the seconds-to-reach reading, the refusal of a directory that holds no
model, and the shared settings in our run's config (TRL's side: trl_config, not imported here: trl takes
half a minute to import on a busy 2-core box)."""
import sys
from pathlib import Path

import pytest

from tests.paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import real_vs_trl  # noqa: E402

POINTS = [(0.0, 0, 0.40), (150.2, 12, 0.55), (300.4, 24, 0.61), (450.0, 36, 0.58)]


def test_seconds_to_reach_is_the_first_evaluation_at_or_above_the_target():
    assert real_vs_trl.seconds_to_reach(POINTS, 0.55) == 150.2
    assert real_vs_trl.seconds_to_reach(POINTS, 0.56) == 300.4
    assert real_vs_trl.seconds_to_reach(POINTS, 0.40) == 0.0


def test_seconds_to_reach_a_target_never_met_is_none():
    assert real_vs_trl.seconds_to_reach(POINTS, 0.62) is None
    assert real_vs_trl.seconds_to_reach([], 0.1) is None


def test_a_directory_without_a_model_is_refused_in_one_line(tmp_path: Path):
    with pytest.raises(SystemExit) as stopped:
        real_vs_trl.main(["--model", str(tmp_path), "--out", str(tmp_path / "out")])
    message = str(stopped.value.code)
    assert message.startswith("error: ") and str(tmp_path) in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_our_run_takes_the_shared_settings(tmp_path: Path):
    s = {**real_vs_trl.SETTINGS, "threads": 1}
    cfg = real_vs_trl.ours_config(tmp_path / "model", 8, tmp_path, s)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt) == (s["prompts"], s["samples"])
    assert (cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens, cfg.trainer.lr) == (48, 48, 1e-4)
    assert (cfg.algorithm.kl_coef, cfg.algorithm.loss_aggregation, cfg.task.eval_prompts) == (0.0, "token-mean", 8)
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (s["r"], s["alpha"])
    assert cfg.model.lora.target_modules == real_vs_trl.TARGETS
    assert (cfg.rollout.threads, cfg.trainer.threads) == (1, 1)
