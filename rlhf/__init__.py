"""distilrl's Python API: ``rlhf.run(cfg)`` for the whole pipeline, ``rlhf.Trainer(cfg)`` for a run driven stage by
stage and step by step, ``rlhf.load_config`` / ``rlhf.RunConfig`` for the config (see rlhf/api.py and the README's
"Scripting" section).

The names load on first use: ``import rlhf.base.config`` in the CLI and in every Ray worker must not pay for importing
Ray, DeepSpeed and the whole driver.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "RunConfig": "rlhf.base.config",
    "load_config": "rlhf.base.config",
    "ConfigError": "rlhf.base.config",
    "DatasetError": "rlhf.base.data",
    "RewardError": "reward.worker",
    "RunDirError": "rlhf.driver",
    "ResumeError": "rlhf.base.resume",
    "NonFiniteError": "rlhf.base.guards",
    "Trainer": "rlhf.api",
    "RunResult": "rlhf.api",
    "run": "rlhf.api",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from reward.worker import RewardError
    from rlhf.api import RunResult, Trainer, run
    from rlhf.base.config import ConfigError, RunConfig, load_config
    from rlhf.base.data import DatasetError
    from rlhf.driver import RunDirError
    from rlhf.base.guards import NonFiniteError
    from rlhf.base.resume import ResumeError


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
