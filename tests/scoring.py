"""A RewardWorker from the few settings a test cares about, through the run config as the actors get it."""
from __future__ import annotations

from reward.scoring.worker import RewardWorker
from rlhf.core.config.run_config import RunConfig


def reward_worker(components: dict[str, float], custom=None, rm_path: str | None = None,
                  verifier: str = "final_number", use_reference: bool = False, **reward) -> RewardWorker:
    """``reward``: fields of the reward section (correct, unparseable, rm_endpoint, seqcls_path, adaptive, ...), set
    as given (unvalidated, so a test can hand in a NaN)."""
    cfg = RunConfig(task={"verifier": verifier}, reward_model={"use_reference": use_reference})
    cfg.reward = cfg.reward.model_copy(update={"components": components, **reward})
    return RewardWorker(cfg, rm_path, custom)
