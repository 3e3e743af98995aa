"""The RewardWorker Ray actor: scores batches of (prompt, response, reference) with the configured components.

The reward is the weighted sum of ``reward.components`` (reward/scoring/components.py). The verifier's verdict is always
returned too (it is cheap), so metrics show true accuracy even when RL is rewarded by the RM alone, and so is each
component's own value (``parts``), and the local RM's weight version (``rm_version``; a refresh swaps new weights
in between batches). A component that raises stops the batch with the offending sample named; a NaN
or infinite reward is returned with the components that produced it (``nonfinite``), and the driver skips that
batch.
"""
from __future__ import annotations

import math

from reward.scoring.components import RewardError, RewardFn, RewardModelScores, ScoringBatch, sequence_components
from reward.scoring.verifiers import Verifier, make_verifier, verdict_figures
from rlhf.core.config.run_config import RunConfig
from rlhf.core.distributed import threads

__all__ = ["RewardWorker", "RewardError", "RewardFn"]


class RewardWorker:
    def __init__(self, cfg: RunConfig, rm_path: str | None = None, custom: RewardFn | None = None,
                 components: dict[str, type] | None = None, verifier: Verifier | None = None):
        """``cfg``: the run's config (reward, task's verifier, reward_model); ``rm_path``: a distilled RM to load
        here for the components that read one (unless ``reward.rm_endpoint`` serves the ``rm`` component);
        ``custom``: the function behind the ``custom`` component. ``components`` (name -> class) and ``verifier``:
        the registry entries the config names, as the driver resolved them (so entries a script registered reach
        this actor by value); by default looked up here."""
        threads.apply("reward worker", cfg.rollout.threads)
        classes = components if components is not None else sequence_components(cfg.reward.components)
        self.weights = {name: cfg.reward.components[name] for name in classes}
        self.components = {name: classes[name](cfg, custom) for name in self.weights}
        self.verify_answer = verifier or make_verifier(cfg.task.verifier, cfg.task.answer_regex)
        self.rm_scores = None
        if any(c.reads_rm for c in self.components.values()):
            self.rm_scores = RewardModelScores(cfg, rm_path, remote="rm" in self.weights and bool(cfg.reward.rm_endpoint))
        self.rm_version = 0  # of the local RM's weights: 0 as loaded, then each refresh's (set_rm_weights)

    def score(self, prompts: list[str], responses: list[str], references: list[str],
              rows: list[dict] | None = None, difficulties: list[float | None] | None = None,
              answers: list[str] | None = None) -> list[dict]:
        """One dict per sample: ``reward``, the verifier's ``correct`` (1.0/0.0) and ``answered``, each component's
        value in ``parts`` (and as ``rm``/``adaptive`` when those are on). ``rows``: each sample's prompt record,
        for ``custom``; ``difficulties``: each prompt's difficulty, for ``adaptive`` from the rule source;
        ``answers``: the text the verifier reads where it is not the response (a multi-turn trajectory's final
        turn: the reward model sees the whole trajectory, the verifier the final answer)."""
        verdicts = [self.verify_answer(r, ref) for r, ref in zip(answers or responses, references, strict=True)]
        batch = ScoringBatch(prompts, responses, references, rows, difficulties, verdicts)
        if self.rm_scores is not None:
            batch.rm = self.rm_scores(prompts, responses, references)
        values = {name: component.score(batch) for name, component in self.components.items()}
        results = []
        for i, verdict in enumerate(verdicts):
            parts = {name: values[name][i] for name in self.components}
            reward = sum(w * parts[name] for name, w in self.weights.items())
            result = {"reward": reward, "correct": float(bool(verdict)), "answered": float(verdict is not None),
                      "parts": parts}
            if not math.isfinite(reward):
                # Returned, not raised: the driver's guard skips the batch and names this (rlhf/core/guards.py).
                result["nonfinite"] = ", ".join(f"{name}={parts[name]}" for name in self.weights
                                                if not math.isfinite(parts[name])) or f"the weighted sum {reward}"
            for name in ("rm", "adaptive"):
                if name in parts:
                    result[name] = parts[name]
            if self._local_rm():
                result["rm_version"] = self.rm_version
            results.append(result)
        return results

    def set_rm_weights(self, state_dict: dict, version: int) -> None:
        """Hot-swap the local RM's weights for a refreshed RM's (rlhf/rl/rm_refresh.py), without a restart. An
        actor runs one call at a time, so a ``score`` call is scored by one version, and says which."""
        if not self._local_rm():
            raise RuntimeError("this reward worker holds no local reward model whose weights could be swapped")
        self.rm_scores.model.load_state_dict(state_dict)
        self.rm_version = version

    def _local_rm(self) -> bool:
        return self.rm_scores is not None and self.rm_scores.model is not None

    def verify(self, responses: list[str], references: list[str]) -> list[dict]:
        """The verifier's verdict alone (``correct``, ``answered``): what held-out evaluation needs, whatever RL is
        rewarded by."""
        return verdict_figures(self.verify_answer, responses, references)
