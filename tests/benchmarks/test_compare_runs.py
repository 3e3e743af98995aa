"""benchmarks/compare_runs.py: two runs' figures compared, timings aside."""
import json
import sys
from pathlib import Path

from tests.paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from compare_runs import compare  # noqa: E402


def _run(path: Path, reward: float, step_s: float) -> Path:
    path.mkdir()
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": reward, "perf/step_s": step_s,
                                                    "perf/train_gemm_gflops": 100 / step_s}) + "\n")
    (path / "summary.json").write_text(json.dumps({"eval_after": {"accuracy": 0.5}, "wall_s": step_s}))
    return path


def test_timings_differ_and_figures_agree(tmp_path):
    result = compare(_run(tmp_path / "a", 0.25, 1.0), _run(tmp_path / "b", 0.25, 9.0), 0.0)
    assert result["differences"] == [] and result["figures"] == 3


def test_a_changed_figure_is_reported(tmp_path):
    result = compare(_run(tmp_path / "a", 0.25, 1.0), _run(tmp_path / "b", 0.5, 1.0), 0.0)
    assert result["differences"] == ["metrics.jsonl line 1 reward/mean: 0.25 != 0.5"]
