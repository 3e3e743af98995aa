"""The registries a config names, checked against it before a run touches anything.

The config (rlhf/core/config/run_config.py) sits below the layers that hold the implementations, so it stores plain names;
here, above both, each name is looked up in its registry and an unknown one is refused with one line that names
the key and lists what is registered. The registries: rollout engines (rollout/engines.py), reward components
(reward/scoring/components.py), verifiers (reward/scoring/verifiers.py), teachers (reward/teachers/__init__.py) and advantage
estimators and policy losses (rlhf/core/algorithms/advantages.py, policy_losses.py: checked by the config itself).
"""
from __future__ import annotations

from typing import Callable

from reward.scoring.components import REWARD_COMPONENTS
from reward.teachers import TEACHERS
from reward.scoring.verifiers import VERIFIERS
from rlhf.core.config.run_config import ConfigError, RunConfig
from rollout import vllm_engine  # noqa: F401 - registers the optional vllm engine
from rollout import static_engine  # noqa: F401 - registers hf_static
from rollout.engines import ENGINES
from rollout.environments import ENVIRONMENTS


def check_registered(cfg: RunConfig) -> None:
    """A ConfigError naming the first config key whose value no registry holds."""
    named = [("rollout.engine", cfg.rollout.engine, ENGINES), ("task.verifier", cfg.task.verifier, VERIFIERS),
             ("label.teacher", cfg.label.teacher, TEACHERS)]
    if cfg.rollout.environment != "none":
        named.append(("rollout.environment", cfg.rollout.environment, ENVIRONMENTS))
    named += [(f"reward.components.{name}", name, REWARD_COMPONENTS) for name in cfg.reward.components]
    for key, name, registry in named:
        if name not in registry:
            raise ConfigError(f"config key {key}: {registry.unknown(name)}")


def fit_partial_rollouts(cfg: RunConfig, log: Callable[[str], None]) -> RunConfig:
    """``cfg`` as it runs: partial rollouts on an engine that cannot take new weights between two decoding steps
    (hf: transformers' generate; vllm) fall back to one-step-off asynchronous rollout, said at start, rather than
    refusing a run whose only loss is the overlap within a batch."""
    r = cfg.rollout
    if not r.partial_rollouts or getattr(ENGINES[r.engine], "interruptible", False):
        return cfg
    log(f"rollout.partial_rollouts: the {r.engine} engine cannot take new weights between decoding steps (hf_compact "
        f"and hf_static can); running one-step-off asynchronous rollout instead, up to {r.max_staleness} batch(es) "
        f"ahead")
    return cfg.model_copy(update={"rollout": r.model_copy(update={"partial_rollouts": False})})
