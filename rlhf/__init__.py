"""distilrl's Python API: ``rlhf.run(cfg)`` for the whole pipeline, ``rlhf.Trainer(cfg)`` for a run driven stage by
stage and step by step, ``rlhf.load_config`` / ``rlhf.RunConfig`` for the config (see rlhf/api.py and the README's
"Scripting" section).

The names load on first use: ``import rlhf.core.config.run_config`` in the CLI and in every Ray worker must not pay for importing
Ray, DeepSpeed and the whole driver.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "RunConfig": "rlhf.core.config.run_config",
    "load_config": "rlhf.core.config.run_config",
    "ConfigError": "rlhf.core.config.run_config",
    "DatasetError": "rlhf.core.data.datasets",
    "RewardError": "reward.scoring.worker",
    "RunDirError": "rlhf.stages.run_dir",
    "ResumeError": "rlhf.core.checkpoints.resume",
    "NonFiniteError": "rlhf.core.guards",
    "Trainer": "rlhf.api",
    "RunResult": "rlhf.api",
    "run": "rlhf.api",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from reward.scoring.worker import RewardError
    from rlhf.api import RunResult, Trainer, run
    from rlhf.core.config.run_config import ConfigError, RunConfig, load_config
    from rlhf.core.data.datasets import DatasetError
    from rlhf.stages.run_dir import RunDirError
    from rlhf.core.guards import NonFiniteError
    from rlhf.core.checkpoints.resume import ResumeError


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
