"""The RewardWorker Ray actor: scores batches of (prompt, response, reference) with the configured components.

Components (``reward.components``, name -> weight): ``verifier``, the rule check of the final answer against the
reference (``task.verifier``); ``rm``, the distilled reward model's quality score; ``seqcls``, a
sequence-classification reward model's score (reward/seqcls.py); ``custom``, a Python function from a script
(``rlhf.Trainer(cfg, reward_fn=...)``) or the config (``reward.custom_fn``; Ray ships it to this actor with
cloudpickle); ``adaptive``, reasoning length fitted to the problem's difficulty for correct answers
(reward/adaptive.py). The reward is their weighted
sum. The verifier's verdict is always returned too (it is cheap), so metrics show true accuracy even when RL is
rewarded by the RM alone. A component that raises stops the batch with the offending sample named; a NaN or
infinite reward is returned with the components that produced it (``nonfinite``), and the driver skips that batch.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from reward.custom import call_reward_fn
from reward.verifiers import make_verifier


class RewardError(ValueError):
    """A reward that cannot be used (non-finite, or a component that failed), naming the sample it came from."""


# fn(prompts, responses, rows) -> one float per response; rows are the prompts' source records (PromptRow.as_dict).
RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]


class RewardWorker:
    def __init__(self, components: dict[str, float], correct: float = 1.0, unparseable: float = 0.0,
                 rm_path: str | None = None, threads: int = 1, batch_size: int = 64, rm_url: str | None = None,
                 rm_token_env: str | None = None, rm_reference: bool = False, custom: RewardFn | None = None,
                 verifier: str = "final_number", answer_regex: str | None = None, seqcls_path: str | None = None,
                 adaptive: dict | None = None, teacher: dict | None = None):
        """``rm_path``: a distilled RM to load here; or ``rm_url``: a reward server to ask instead, whose RM
        expects the reference answer in its input when ``rm_reference`` is set. ``custom``: the function behind
        the ``custom`` component. ``verifier``, ``answer_regex``: the answer check (``task.verifier``).
        ``seqcls_path``: the sequence-classification reward model behind the ``seqcls`` component.
        ``adaptive``: the ``reward.adaptive`` settings; ``teacher``: the ``label`` settings, for the adaptive
        component's teacher source."""
        self.components = {name: w for name, w in components.items() if w != 0}
        if "custom" in self.components and custom is None:
            raise ValueError("reward component custom needs a reward function")
        self.custom = custom
        self.verify_answer = make_verifier(verifier, answer_regex)
        self.seqcls = None
        if "seqcls" in self.components:
            from reward.seqcls import SeqClsReward

            self.seqcls = SeqClsReward(seqcls_path, threads, batch_size=min(batch_size, 16))
        self.correct, self.unparseable = correct, unparseable
        self.batch_size = batch_size
        self.rm = self.remote = None
        self.rm_reference = rm_reference
        self.adaptive = None
        if "adaptive" in self.components:
            self.adaptive = _adaptive_component(adaptive, teacher)
        # The RM is loaded for its quality score (rm) or for its RV/CD heads (adaptive from the rm source).
        needs_rm = "rm" in self.components or (self.adaptive is not None and adaptive["source"] == "rm")
        if self.adaptive is not None and adaptive["source"] == "rm" and rm_url:
            raise ValueError("reward.adaptive.source rm reads the RM's RV/CD heads: it needs a local reward model")
        if "rm" in self.components and rm_url:
            from reward.remote import RemoteRewardClient

            self.remote = RemoteRewardClient(rm_url, token_env=rm_token_env, batch_size=batch_size)
        elif needs_rm:
            from transformers import AutoTokenizer

            from reward.model import DistilledRewardModel, uses_reference

            torch.set_num_threads(threads)
            self.rm = DistilledRewardModel.from_pretrained(rm_path).eval()
            if torch.cuda.is_available():  # a GPU given to this worker by cluster.reward.num_gpus
                self.rm.to("cuda")
            self.rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
            self.rm_reference = uses_reference(self.rm)

    def score(self, prompts: list[str], responses: list[str], references: list[str],
              rows: list[dict] | None = None, difficulties: list[float | None] | None = None) -> list[dict]:
        """One dict per sample: ``reward``, the verifier's ``correct`` (1.0/0.0) and ``answered``, ``rm`` (the
        reward model's quality) and ``adaptive`` when those components are on, and ``parts``: each weighted
        component's raw value. ``rows``: each sample's prompt
        record, for ``custom``; ``difficulties``: each prompt's difficulty, for ``adaptive`` from the rule source."""
        use_rm = self.rm is not None or self.remote is not None
        rm_full = self._rm_scores(prompts, responses, references) if use_rm else None
        rm_scores = [s["quality"] for s in rm_full] if rm_full is not None and "rm" in self.components else None
        custom_scores = self._custom_scores(prompts, responses, rows) if "custom" in self.components else None
        seqcls_scores = self._seqcls_scores(prompts, responses) if self.seqcls is not None else None
        verdicts = [self.verify_answer(r, ref) for r, ref in zip(responses, references, strict=True)]
        adaptive_scores = None
        if self.adaptive is not None:
            try:
                adaptive_scores = self.adaptive.rewards(prompts, responses, references, [bool(v) for v in verdicts],
                                                        difficulties, rm_full)
            except ValueError as err:
                raise RewardError(f"adaptive reward: {err}") from err
        results = []
        for i, (prompt, response, verdict) in enumerate(zip(prompts, responses, verdicts, strict=True)):
            parts = {"verifier": self.unparseable if verdict is None else (self.correct if verdict else 0.0)}
            if rm_scores is not None:
                parts["rm"] = rm_scores[i]
            if adaptive_scores is not None:
                parts["adaptive"] = adaptive_scores[i]
            if custom_scores is not None:
                parts["custom"] = custom_scores[i]
            if seqcls_scores is not None:
                parts["seqcls"] = seqcls_scores[i]
            reward = sum(w * parts[name] for name, w in self.components.items())
            # parts: each component's raw (unweighted) value, for the reward/<component> metrics.
            result = {"reward": reward, "correct": float(bool(verdict)), "answered": float(verdict is not None),
                      "parts": {name: parts[name] for name in self.components}}
            if not math.isfinite(reward):
                # Returned, not raised: the driver's guard skips the batch and names this (rlhf/guards.py).
                result["nonfinite"] = ", ".join(f"{name}={parts[name]}" for name in self.components
                                                if not math.isfinite(parts[name])) or f"the weighted sum {reward}"
            for name in ("rm", "adaptive"):
                if name in parts:
                    result[name] = parts[name]
            results.append(result)
        return results

    def verify(self, responses: list[str], references: list[str]) -> list[dict]:
        """The verifier's verdict alone (``correct``, ``answered``): what held-out evaluation needs, whatever RL is
        rewarded by."""
        verdicts = [self.verify_answer(r, ref) for r, ref in zip(responses, references, strict=True)]
        return [{"correct": float(bool(v)), "answered": float(v is not None)} for v in verdicts]

    def _custom_scores(self, prompts: list[str], responses: list[str], rows: list[dict] | None) -> list[float]:
        if rows is None or len(rows) != len(responses):
            raise RewardError("reward component custom needs each sample's prompt record (rows)")
        try:
            scores = call_reward_fn(self.custom, prompts, responses, rows)
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
                call_reward_fn(self.custom, prompts[i:i + 1], responses[i:i + 1], rows[i:i + 1])
            except Exception:  # noqa: BLE001 - any failure identifies the sample
                return f"prompt {prompts[i]!r}, response {responses[i]!r}, row {rows[i]!r}"
        return f"a batch of {len(responses)} samples starting with prompt {prompts[0]!r} (each alone scores fine)"

    def _seqcls_scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        try:
            return self.seqcls.score(prompts, responses)
        except Exception as err:  # noqa: BLE001 - re-raised with the batch's first sample for context
            raise RewardError(f"seqcls reward model failed on a batch starting with prompt {prompts[0]!r}, "
                              f"response {responses[0]!r}: {err}") from err

    def _rm_scores(self, prompts: list[str], responses: list[str], references: list[str]) -> list[dict]:
        """One dict per response: ``quality``, and ``rv``/``cd`` from a local RM's heads (a server gives quality)."""
        from reward.model import score_texts, with_reference

        if self.rm_reference:
            responses = [with_reference(r, ref) for r, ref in zip(responses, references, strict=True)]
        try:
            if self.remote is not None:
                return [{"quality": float(s)} for s in self.remote.score(prompts, responses)]
            scores = score_texts(self.rm, self.rm_tokenizer, prompts, responses, self.batch_size)
        except Exception as err:  # noqa: BLE001 - re-raised with the batch's first sample for context
            raise RewardError(f"reward model failed on a batch starting with prompt {prompts[0]!r}: {err}") from err
        return [{name: float(value) for name, value in s.items()} for s in scores]


def _adaptive_component(settings: dict | None, teacher: dict | None):
    from reward.adaptive import AdaptiveLength

    if settings is None:
        raise ValueError("reward component adaptive needs its settings (reward.adaptive)")
    judge = None
    if settings["source"] == "teacher":
        from reward.teachers import make_teacher
        from rlhf.base.config import LabelConfig

        judge = make_teacher(LabelConfig(**(teacher or {})))
    return AdaptiveLength(settings, judge)
