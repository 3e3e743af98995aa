"""Where a run's figures go: ``metrics.jsonl`` (one JSON object per RL step), TensorBoard event files in
``output_dir/tensorboard`` (always, offline: ``tensorboard --logdir runs/``), and Weights & Biases when the config
asks for it (``wandb: true``; offline unless ``WANDB_MODE`` says otherwise; the ``wandb`` package is optional).

Scalar names are namespaced as in metrics.jsonl: ``reward/*``, ``losses/*``, ``perf/*``, ``charts/*``, ``audit/*``
per RL step; ``eval/*`` for held-out evaluations (at the RL step they followed), ``warmup/*``, ``sft/*`` and
``rm/*`` per warm-up/SFT and reward-model training step (also appended to ``stage_metrics.jsonl``, which the report
draws the loss curves from), ``perf/stage_*_s`` for the time each stage took.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

from rlhf.core.config.run_config import ConfigError, RunConfig

TENSORBOARD_DIR = "tensorboard"
STAGE_METRICS = "stage_metrics.jsonl"  # one line per warm-up/SFT or RM training step: {"step": N, "sft/loss": ...}
STAGE_PREFIXES = ("warmup/", "sft/", "rm/")


def check_wandb(cfg: RunConfig) -> None:
    """``wandb: true`` needs the package; said before the run starts, not after its first step."""
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("config key wandb: the wandb package is not installed (pip install wandb), or set "
                              "wandb=false; TensorBoard files are written either way") from None


def scalars(figures: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``figures`` (nested dicts flattened with ``/``), named ``prefix + key``."""
    flat: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalars(value, f"{name}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


def eval_scalars(figures: dict) -> dict[str, float]:
    """A held-out evaluation as ``eval/accuracy``, ``eval/mean_response_tokens``, ``eval/n`` and per difficulty
    ``eval/difficulty_<d>/accuracy`` (and its response tokens)."""
    flat = scalars({k: v for k, v in figures.items() if k != "by_difficulty"}, "eval/")
    for level, group in (figures.get("by_difficulty") or {}).items():
        flat.update(scalars({k: v for k, v in group.items() if k != "n"}, f"eval/difficulty_{level}/"))
    return flat


class RunMetrics:
    """One run's metric sinks. ``rl_step`` appends to metrics.jsonl and logs scalars; ``log`` logs scalars (warm-up,
    RM training, evaluations), those of the stages before RL also to stage_metrics.jsonl. ``close`` flushes the
    event files; a closed one reopens on the next write (a script may keep stepping its Trainer after
    ``summary``-time figures went out)."""

    def __init__(self, output_dir: str | Path, cfg: RunConfig):
        self.output_dir, self.cfg = Path(output_dir), cfg
        self._writer = None
        self._wandb_run = None

    def rl_step(self, metrics: dict) -> None:
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self._scalars_out(scalars({k: v for k, v in metrics.items() if k != "step"}), int(metrics["step"]))

    def log(self, figures: dict, step: int) -> None:
        values = scalars(figures)
        staged = {name: value for name, value in values.items() if name.startswith(STAGE_PREFIXES)}
        if staged:
            with open(self.output_dir / STAGE_METRICS, "a") as f:
                f.write(json.dumps({"step": step, **staged}) + "\n")
        self._scalars_out(values, step)

    def _scalars_out(self, values: dict[str, float], step: int) -> None:
        """To TensorBoard, and W&B when on."""
        if not values:
            return
        writer = self._tensorboard()
        for name, value in values.items():
            writer.add_scalar(name, value, step)
        if self.cfg.wandb:
            # W&B's own step may only grow, and warm-up, RM and RL steps each count from 1: the step goes in as a
            # field to plot against instead.
            self._wandb().log({**values, "step": step})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR), flush_secs=10)
            config = (self.output_dir / "config.yaml")
            if config.is_file():  # the resolved config beside the curves, in TensorBoard's Text tab
                self._writer.add_text("config", "```\n" + config.read_text() + "\n```", 0)
        return self._writer

    def _wandb(self):
        if self._wandb_run is None:
            import wandb

            self._wandb_run = wandb.init(project="distilrl", name=self.output_dir.name, dir=str(self.output_dir),
                                         mode=os.environ.get("WANDB_MODE", "offline"),
                                         config=self.cfg.model_dump())
        return self._wandb_run
