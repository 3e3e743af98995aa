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
                 rm_path: str | None = None, threads: int = 1, batch_size: int = 64, rm_url: str | None = None,
                 rm_token_env: str | None = None, rm_reference: bool = False):
        """``rm_path``: a distilled RM to load here; or ``rm_url``: a reward server to ask instead, whose RM
        expects the reference answer in its input when ``rm_reference`` is set."""
        self.components = {name: w for name, w in components.items() if w != 0}
        self.correct, self.unparseable = correct, unparseable
        self.batch_size = batch_size
        self.rm = self.remote = None
        self.rm_reference = rm_reference
        if "rm" in self.components and rm_url:
            from reward.remote import RemoteRewardClient

            self.remote = RemoteRewardClient(rm_url, token_env=rm_token_env, batch_size=batch_size)
        elif "rm" in self.components:
            from transformers import AutoTokenizer

            from reward.model import DistilledRewardModel, uses_reference

            torch.set_num_threads(threads)
            self.rm = DistilledRewardModel.from_pretrained(rm_path).eval()
            self.rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
            self.rm_reference = uses_reference(self.rm)

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> list[dict]:
        """One dict per sample: ``reward``, the verifier's ``correct`` (1.0/0.0) and ``answered``, and ``rm`` (the
        reward model's quality) when that component is on."""
        use_rm = self.rm is not None or self.remote is not None
        rm_scores = self._rm_scores(prompts, responses, references) if use_rm else None
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
        from reward.model import score_texts, with_reference

        if self.rm_reference:
            responses = [with_reference(r, ref) for r, ref in zip(responses, references, strict=True)]
        try:
            if self.remote is not None:
                return [float(s) for s in self.remote.score(prompts, responses)]
            scores = score_texts(self.rm, self.rm_tokenizer, prompts, responses, self.batch_size)
        except Exception as err:  # noqa: BLE001 - re-raised with the batch's first sample for context
            raise RewardError(f"reward model failed on a batch starting with prompt {prompts[0]!r}: {err}") from err
        return [float(s["quality"]) for s in scores]
