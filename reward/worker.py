"""The RewardWorker Ray actor: scores batches of (prompt, response, reference) with the configured components.

Components (``reward.components``, name -> weight): ``verifier``, the rule check of the final answer against the
reference; ``rm``, the distilled reward model's quality score; ``custom``, a Python function passed in from a script
(``rlhf.Trainer(cfg, reward_fn=...)``; Ray ships it to this actor with cloudpickle). The reward is their weighted
sum. The verifier's verdict is always returned too (it is cheap), so metrics show true accuracy even when RL is
rewarded by the RM alone. A component that raises stops the batch with the offending sample named; a NaN or
infinite reward is returned with the components that produced it (``nonfinite``), and the driver skips that batch.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from reward.verifiers import final_number_correct


class RewardError(ValueError):
    """A reward that cannot be used (non-finite, or a component that failed), naming the sample it came from."""


# fn(prompts, responses, rows) -> one float per response; rows are the prompts' source records (PromptRow.as_dict).
RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]


class RewardWorker:
    def __init__(self, components: dict[str, float], correct: float = 1.0, unparseable: float = 0.0,
                 rm_path: str | None = None, threads: int = 1, batch_size: int = 64, rm_url: str | None = None,
                 rm_token_env: str | None = None, rm_reference: bool = False, custom: RewardFn | None = None):
        """``rm_path``: a distilled RM to load here; or ``rm_url``: a reward server to ask instead, whose RM
        expects the reference answer in its input when ``rm_reference`` is set. ``custom``: the function behind
        the ``custom`` component."""
        self.components = {name: w for name, w in components.items() if w != 0}
        if "custom" in self.components and custom is None:
            raise ValueError("reward component custom needs a reward function")
        self.custom = custom
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
            if torch.cuda.is_available():  # a GPU given to this worker by cluster.reward.num_gpus
                self.rm.to("cuda")
            self.rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
            self.rm_reference = uses_reference(self.rm)

    def score(self, prompts: list[str], responses: list[str], references: list[str],
              rows: list[dict] | None = None) -> list[dict]:
        """One dict per sample: ``reward``, the verifier's ``correct`` (1.0/0.0) and ``answered``, and ``rm`` (the
        reward model's quality) when that component is on. ``rows``: each sample's prompt record, for ``custom``."""
        use_rm = self.rm is not None or self.remote is not None
        rm_scores = self._rm_scores(prompts, responses, references) if use_rm else None
        custom_scores = self._custom_scores(prompts, responses, rows) if "custom" in self.components else None
        results = []
        for i, (prompt, response, reference) in enumerate(zip(prompts, responses, references, strict=True)):
            verdict = final_number_correct(response, reference)
            parts = {"verifier": self.unparseable if verdict is None else (self.correct if verdict else 0.0)}
            if rm_scores is not None:
                parts["rm"] = rm_scores[i]
            if custom_scores is not None:
                parts["custom"] = custom_scores[i]
            reward = sum(w * parts[name] for name, w in self.components.items())
            result = {"reward": reward, "correct": float(bool(verdict)), "answered": float(verdict is not None)}
            if not math.isfinite(reward):
                # Returned, not raised: the driver's guard skips the batch and names this (rlhf/guards.py).
                result["nonfinite"] = ", ".join(f"{name}={parts[name]}" for name in self.components
                                                if not math.isfinite(parts[name])) or f"the weighted sum {reward}"
            if rm_scores is not None:
                result["rm"] = rm_scores[i]
            results.append(result)
        return results

    def verify(self, responses: list[str], references: list[str]) -> list[dict]:
        """The verifier's verdict alone (``correct``, ``answered``): what held-out evaluation needs, whatever RL is
        rewarded by."""
        verdicts = [final_number_correct(r, ref) for r, ref in zip(responses, references, strict=True)]
        return [{"correct": float(bool(v)), "answered": float(v is not None)} for v in verdicts]

    def _custom_scores(self, prompts: list[str], responses: list[str], rows: list[dict] | None) -> list[float]:
        if rows is None or len(rows) != len(responses):
            raise RewardError("reward component custom needs each sample's prompt record (rows)")
        try:
            scores = list(self.custom(prompts, responses, rows))
        except Exception as err:  # noqa: BLE001 - re-raised naming the sample that fails, found below
            raise RewardError(f"reward_fn raised {err!r} on {self._failing_sample(prompts, responses, rows)}") from err
        if len(scores) != len(responses):
            raise RewardError(f"reward_fn returned {len(scores)} rewards for {len(responses)} responses (one per "
                              f"response, in order); the batch starts with prompt {prompts[0]!r}")
        for prompt, response, score in zip(prompts, responses, scores):
            if not isinstance(score, numbers.Real):
                raise RewardError(f"reward_fn returned {score!r}, not a number, for prompt {prompt!r}, "
                                  f"response {response!r}")
        return [float(s) for s in scores]

    def _failing_sample(self, prompts: list[str], responses: list[str], rows: list[dict]) -> str:
        """The batch failed as a whole: retry sample by sample to name the one that fails (the error path only)."""
        for i in range(len(responses)):
            try:
                self.custom(prompts[i:i + 1], responses[i:i + 1], rows[i:i + 1])
            except Exception:  # noqa: BLE001 - any failure identifies the sample
                return f"prompt {prompts[i]!r}, response {responses[i]!r}, row {rows[i]!r}"
        return f"a batch of {len(responses)} samples starting with prompt {prompts[0]!r} (each alone scores fine)"

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
