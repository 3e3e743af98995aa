"""The RewardWorker Ray actor: scores batches of (prompt, response, reference) with the configured rewards.

In this version the reward is the rule verifier alone; the distilled reward model plugs in beside it later.
A reward that comes out NaN or infinite is reported with the offending sample instead of poisoning the batch.
"""
from __future__ import annotations

import math

from reward.verifiers import final_number_correct


class RewardError(ValueError):
    pass


class RewardWorker:
    def __init__(self, correct: float, unparseable: float):
        self.correct, self.unparseable = correct, unparseable

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> list[dict]:
        """One dict per sample: ``reward`` plus the verifier's verdict (``correct``: 1.0, 0.0; ``answered``)."""
        results = []
        for prompt, response, reference in zip(prompts, responses, references, strict=True):
            verdict = final_number_correct(response, reference)
            reward = self.unparseable if verdict is None else (self.correct if verdict else 0.0)
            if not math.isfinite(reward):
                raise RewardError(f"non-finite reward {reward} for prompt {prompt!r}, response {response!r}")
            results.append({"reward": reward, "correct": float(bool(verdict)), "answered": float(verdict is not None)})
        return results
