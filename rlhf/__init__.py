"""distilrl's Python API: ``rlhf.run(cfg)`` for the whole pipeline, ``rlhf.Trainer(cfg)`` for a run driven stage by
stage and step by step, ``rlhf.load_config`` / ``rlhf.RunConfig`` for the config (see rlhf/api.py and the README's
"Scripting" section).

The names load on first use: ``import rlhf.config`` in the CLI and in every Ray worker must not pay for importing
Ray, DeepSpeed and the whole driver.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "RunConfig": "rlhf.config",
    "load_config": "rlhf.config",
    "ConfigError": "rlhf.config",
    "DatasetError": "rlhf.data",
    "RewardError": "reward.worker",
    "RunDirError": "rlhf.driver",
    "ResumeError": "rlhf.resume",
    "NonFiniteError": "rlhf.guards",
    "Trainer": "rlhf.api",
    "RunResult": "rlhf.api",
    "run": "rlhf.api",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from reward.worker import RewardError
    from rlhf.api import RunResult, Trainer, run
    from rlhf.config import ConfigError, RunConfig, load_config
    from rlhf.data import DatasetError
    from rlhf.driver import RunDirError
    from rlhf.guards import NonFiniteError
    from rlhf.resume import ResumeError


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
