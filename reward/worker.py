"""The RewardWorker Ray actor: scores batches of (prompt, response, reference) with the configured components.

Components (``reward.components``, name -> weight): ``verifier``, the rule check of the final answer against the
reference; ``rm``, the distilled reward model's quality score. The reward is their weighted sum. The verifier's
verdict is always returned too (it is cheap), so metrics show true accuracy even when RL is rewarded by the RM
alone. A component that yields NaN or infinity, or raises, stops the batch with the offending sample named,
rather than poisoning the update silently.
"""
from __future__ import annotations

import math

import torch

from reward.verifiers import final_number_correct


class RewardError(ValueError):
    pass


class RewardWorker:
    def __init__(self, components: dict[str, float], correct: float = 1.0, unparseable: float = 0.0,
                 rm_path: str | None = None, threads: int = 1, batch_size: int = 64):
        self.components = {name: w for name, w in components.items() if w != 0}
        self.correct, self.unparseable = correct, unparseable
        self.batch_size = batch_size
        self.rm = None
        if "rm" in self.components:
            from transformers import AutoTokenizer

            from reward.model import DistilledRewardModel

            torch.set_num_threads(threads)
            self.rm = DistilledRewardModel.from_pretrained(rm_path).eval()
            self.rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> list[dict]:
        """One dict per sample: ``reward``, the verifier's ``correct`` (1.0/0.0) and ``answered``, and ``rm`` (the
        reward model's quality) when that component is on."""
        rm_scores = self._rm_scores(prompts, responses, references) if self.rm is not None else None
        results = []
        for i, (prompt, response, reference) in enumerate(zip(prompts, responses, references, strict=True)):
            verdict = final_number_correct(response, reference)
            parts = {"verifier": self.unparseable if verdict is None else (self.correct if verdict else 0.0)}
            if rm_scores is not None:
                parts["rm"] = rm_scores[i]
            reward = sum(w * parts[name] for name, w in self.components.items())
            if not math.isfinite(reward):
                raise RewardError(f"non-finite reward {reward} ({parts}) for prompt {prompt!r}, response {response!r}")
            result = {"reward": reward, "correct": float(bool(verdict)), "answered": float(verdict is not None)}
            if rm_scores is not None:
                result["rm"] = rm_scores[i]
            results.append(result)
        return results

    def _rm_scores(self, prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
        from reward.model import score_texts, uses_reference, with_reference

        if uses_reference(self.rm):
            responses = [with_reference(r, ref) for r, ref in zip(responses, references, strict=True)]
        try:
            scores = score_texts(self.rm, self.rm_tokenizer, prompts, responses, self.batch_size)
        except Exception as err:  # noqa: BLE001 - re-raised with the batch's first sample for context
            raise RewardError(f"reward model failed on a batch starting with prompt {prompts[0]!r}: {err}") from err
        return [float(s["quality"]) for s in scores]
