"""What a run directory holds, as the report reads it: ``summary.json``, ``metrics.jsonl`` (one line per RL
step), ``stage_metrics.jsonl`` (one line per warm-up/SFT and reward-model training step), ``config.yaml`` and the
newest ``samples/step_N.jsonl``. Read leniently: a missing or cut-short file gives empty data, not an error.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from rlhf.outputs.diagnostics import setting
from rlhf.outputs.metrics import STAGE_METRICS
from rlhf.outputs.samples import latest_samples

# reward/* figures of an RL step that are not a reward component's mean (rlhf/rl/step.py, rlhf/rl/update.py).
NOT_COMPONENTS = {"mean", "std", "accuracy", "answered", "zero_signal_groups", "overlong_penalty",
                  "dropped_groups", "kl_penalty"}


class RunData:
    """One run directory's files, parsed."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        has_summary, has_metrics = (self.dir / "summary.json").is_file(), (self.dir / "metrics.jsonl").is_file()
        if not (has_summary or has_metrics):
            raise FileNotFoundError(f"{self.dir} has no summary.json or metrics.jsonl: give the output_dir of a "
                                    f"distilrl run")
        self.summary: dict = json.loads((self.dir / "summary.json").read_text()) if has_summary else {}
        self.steps: list[dict] = _json_lines(self.dir / "metrics.jsonl")
        self.stage_steps: list[dict] = _json_lines(self.dir / STAGE_METRICS)
        config = self.dir / "config.yaml"
        self.config: dict = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
        self.samples: tuple[int, list[dict]] | None = latest_samples(self.dir)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric over the RL steps that logged a finite value of it."""
        return _series(self.steps, name)

    def stage_series(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one warm-up/SFT (``sft/*``, ``warmup/*``) or RM training (``rm/*``) figure."""
        return _series(self.stage_steps, name)

    def eval(self, when: str) -> dict:
        return self.summary.get(f"eval_{when}") or {}

    @property
    def has_rl(self) -> bool:
        """Whether the run had an RL stage (its config says so, or it logged RL steps)."""
        stages = self.conf("stages")
        return bool(self.steps) or stages is None or "rl" in stages

    def components(self) -> list[tuple[str, float | None]]:
        """(name, weight) of each reward component with a logged ``reward/<name>`` series: the config's, in its
        order, then any other the metrics hold (weight None: not in the config)."""
        weights = self.conf("reward.components") or {}
        logged = {key.split("/", 1)[1] for m in self.steps for key in m
                  if key.startswith("reward/") and key.count("/") == 1 and key.split("/")[1] not in NOT_COMPONENTS}
        named = [(name, float(w)) for name, w in weights.items() if name in logged]
        return named + [(name, None) for name in sorted(logged - set(weights))]

    def difficulty_levels(self) -> list[str]:
        levels = {*(self.eval("before").get("by_difficulty") or {}), *(self.eval("after").get("by_difficulty") or {})}
        return sorted(levels, key=lambda level: (float(level) if is_number(level) else math.inf, level))

    def conf(self, dotted: str, default=None):
        return setting(self.config, dotted, default)


def _json_lines(path: Path) -> list[dict]:
    lines = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: the steps before it still count
    return lines


def _series(steps: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(int(m.get("step", i + 1)), float(m[name])) for i, m in enumerate(steps)
              if isinstance(m.get(name), (int, float)) and math.isfinite(m[name])]
    return [s for s, _ in points], [v for _, v in points]


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
