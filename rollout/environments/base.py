"""What a multi-turn environment is: ``reset(prompt) -> first observation``, ``step(model turn) -> StepResult``.

The rollout (rollout/multi_turn.py) keeps the token ids; an environment deals in text only. It sees each model turn
decoded (special tokens dropped) and answers with the text to append before the model's next turn, or says the
episode is over. One environment object serves one trajectory, built by ``ENVIRONMENTS[name](limits)`` where
``limits`` is the run's ``rollout.multi_turn`` section (tool time, memory, output). Its ``step`` must not raise for
anything the model wrote: a bad call is an observation the model can learn from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.core.config.registry import Registry

ENVIRONMENTS: Registry = Registry("environment")


@dataclass
class StepResult:
    observation: str              # text appended after the model's turn (its tokens carry no loss); "" when done
    done: bool                    # the episode is over: the turn was the model's final answer
    # per turn: tool_calls, tool_errors, tool_s, and turn_reward (per-turn shaping, added to the trajectory's reward);
    # each summed over the trajectory
    info: dict = field(default_factory=dict)


class Environment:
    """The base: one turn, no tools (the single-turn rollout as an environment). Subclasses override ``step``
    (and ``reset`` where the first observation is not the prompt itself)."""

    def __init__(self, limits=None):
        self.limits = limits

    def reset(self, prompt: str) -> str:
        """The text the policy first sees for this prompt (its prompt ids are this text's tokens)."""
        return prompt

    def step(self, turn: str) -> StepResult:
        return StepResult("", True)


ENVIRONMENTS.register("single_turn", Environment)
