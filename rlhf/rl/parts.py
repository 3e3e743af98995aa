"""What the RL step asks of its parts, as Protocols: the step (rlhf/rl/step.py) is written against these, so "go to
definition" on ``self.reward.score`` lands here; tests/rlhf/rl/test_parts.py checks the real parts offer every member.
The real parts: ``RolloutGroup`` (rlhf/rl/groups/rollout.py), ``RewardGroup`` (rlhf/rl/groups/reward.py),
``PolicyUpdate`` (rlhf/rl/update.py) and a teacher from reward/teachers/ as the auditor."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from rlhf.core.data.datasets import PromptRow
from rlhf.core.data.samples import Sample
from rlhf.rl.prefetch import LaunchedRollout


class Rollout(Protocol):
    """The rollout workers as one group: sampling now or launched ahead, and the policy's weights with a version."""

    version: int  # updates the weights the workers sample with have had
    restarts: int  # worker processes restarted so far

    def generate(self, prompts: list[str], n: int, greedy: bool) -> list[Sample]: ...
    def launch(self, rows: list[PromptRow]) -> LaunchedRollout: ...
    def collect(self, launched: LaunchedRollout) -> list[Sample]: ...
    def wait(self, launched: LaunchedRollout) -> LaunchedRollout: ...
    def sync(self, version: int | None = None) -> None: ...
    def finish_sync(self) -> None: ...
    def rng_states(self) -> list: ...
    def set_rng_states(self, states: list) -> None: ...


class Reward(Protocol):
    """The reward workers as one group: each sample scored (reward, correct, answered, each component's value)."""

    restarts: int

    def score(self, rows: list[PromptRow], samples: list[Sample]) -> list[dict]: ...
    def verify(self, texts: list[str], references: list[str]) -> list[dict]: ...
    def shutdown(self) -> None: ...


class Update(Protocol):
    """The update half of a step: advantages, then the trainer ranks' (and critic's) optimizer steps."""

    policy: object  # the policy's trainer ranks (TrainerGroup)

    def __call__(self, step: int, samples: list[Sample], rewards: torch.Tensor, group_size: int,
                 difficulties: list | None = None) -> tuple[dict, bool]: ...
    def save_state(self, path: Path) -> None: ...
    def load_state(self, path: Path) -> None: ...
    def shutdown(self) -> None: ...


class Auditor(Protocol):
    """A teacher that judges responses (quality, correctness, RV, CD) for the audit."""

    def judge(self, prompts: list[str], responses: list[str], references: list[str]) -> list: ...
