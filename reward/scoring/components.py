"""The reward components a RewardWorker sums (``reward.components``: name -> weight), behind one registry.

Each component is built from the run config (and the script's reward function, for ``custom``) and scores a
``ScoringBatch``: one float per response. A new component is one class here (or in its own module) plus one
``REWARD_COMPONENTS.register`` line; ``reward.components`` may then name it.

- ``verifier``: the rule check of the final answer against the reference (``task.verifier``);
- ``rm``: the distilled reward model's quality score (local, or on a reward server: ``reward.rm_endpoint``);
- ``seqcls``: any sequence-classification reward model's score (reward/model/seqcls.py);
- ``custom``: a Python function, from a script or ``reward.custom_fn`` (Ray ships it with cloudpickle);
- ``adaptive``: reasoning length fitted to the problem's difficulty, for correct answers (reward/scoring/adaptive.py);
- ``teacher_kl``: on-policy distillation's per-token term, computed in the update (``per_token``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from reward.scoring.custom import call_reward_fn
from rlhf.core.config.run_config import RunConfig
from rlhf.core.config.registry import Registry
from rlhf.core.models import precision
from rlhf.core.tasks.arithmetic import MAX_LEVEL, MIN_LEVEL


class RewardError(ValueError):
    """A reward that cannot be used (non-finite, or a component that failed), naming the sample it came from."""


# fn(prompts, responses, rows) -> one float per response; rows are the prompts' source records (PromptRow.as_dict).
RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]


@dataclass
class ScoringBatch:
    """What components score: each sample's prompt, response, reference, source record (``rows``, shipped only
    when a custom function reads them) and difficulty; the verifier's verdicts (True/False, None for no answer);
    and the reward model's scores (``quality``, ``rv``, ``cd``) where a component reads the RM."""

    prompts: list[str]
    responses: list[str]
    references: list[str]
    rows: list[dict] | None
    difficulties: list[float | None] | None
    verdicts: list[bool | None]
    rm: list[dict] | None = None


REWARD_COMPONENTS: Registry = Registry("reward component")


@REWARD_COMPONENTS.register("verifier")
class VerifierReward:
    reads_rm = False

    def __init__(self, cfg: RunConfig, custom: RewardFn | None = None):
        self.correct, self.unparseable = cfg.reward.correct, cfg.reward.unparseable

    def score(self, batch: ScoringBatch) -> list[float]:
        return [self.unparseable if v is None else (self.correct if v else 0.0) for v in batch.verdicts]


@REWARD_COMPONENTS.register("rm")
class ModelQualityReward:
    reads_rm = True

    def __init__(self, cfg: RunConfig, custom: RewardFn | None = None):
        pass

    def score(self, batch: ScoringBatch) -> list[float]:
        return [s["quality"] for s in batch.rm]


@REWARD_COMPONENTS.register("seqcls")
class SeqClsComponent:
    reads_rm = False

    def __init__(self, cfg: RunConfig, custom: RewardFn | None = None):
        from reward.model.seqcls import SeqClsReward

        self.model = SeqClsReward(cfg.reward.seqcls_path, cfg.rollout.threads, batch_size=min(cfg.rollout_rows, 16),
                                  text_format=cfg.reward.seqcls_format)

    def score(self, batch: ScoringBatch) -> list[float]:
        try:
            return self.model.score(batch.prompts, batch.responses)
        except Exception as err:  # noqa: BLE001 - re-raised with the batch's first sample for context
            raise RewardError(f"seqcls reward model failed on a batch starting with prompt {batch.prompts[0]!r}, "
                              f"response {batch.responses[0]!r}: {err}") from err


@REWARD_COMPONENTS.register("custom")
class CustomReward:
    reads_rm = False

    def __init__(self, cfg: RunConfig, custom: RewardFn | None = None):
        if custom is None:
            raise ValueError("reward component custom needs a reward function")
        self.fn = custom

    def score(self, batch: ScoringBatch) -> list[float]:
        prompts, responses, rows = batch.prompts, batch.responses, batch.rows
        if rows is None or len(rows) != len(responses):
            raise RewardError("reward component custom needs each sample's prompt record (rows)")
        try:
            scores = call_reward_fn(self.fn, prompts, responses, rows)
        except Exception as err:  # noqa: BLE001 - re-raised naming the sample that fails, found below
            raise RewardError(f"reward_fn raised {err!r} on {self._failing_sample(batch)}") from err
        if len(scores) != len(responses):
            raise RewardError(f"reward_fn returned {len(scores)} rewards for {len(responses)} responses (one per "
                              f"response, in order); the batch starts with prompt {prompts[0]!r}")
        for prompt, response, score in zip(prompts, responses, scores):
            if not isinstance(score, numbers.Real):
                raise RewardError(f"reward_fn returned {score!r}, not a number, for prompt {prompt!r}, "
                                  f"response {response!r}")
        return [float(s) for s in scores]

    def _failing_sample(self, batch: ScoringBatch) -> str:
        """The batch failed as a whole: retry sample by sample to name the one that fails (the error path only)."""
        p, r, rows = batch.prompts, batch.responses, batch.rows
        for i in range(len(r)):
            try:
                call_reward_fn(self.fn, p[i:i + 1], r[i:i + 1], rows[i:i + 1])
            except Exception:  # noqa: BLE001 - any failure identifies the sample
                return f"prompt {p[i]!r}, response {r[i]!r}, row {rows[i]!r}"
        return f"a batch of {len(r)} samples starting with prompt {p[0]!r} (each alone scores fine)"


@REWARD_COMPONENTS.register("adaptive")
class AdaptiveReward:
    def __init__(self, cfg: RunConfig, custom: RewardFn | None = None):
        from reward.scoring.adaptive import AdaptiveLength

        ad = cfg.reward.adaptive
        settings = {**ad.model_dump(), "difficulty_range": ad.difficulty_range or (MIN_LEVEL, MAX_LEVEL)}
        self.reads_rm = ad.source == "rm"
        if self.reads_rm and cfg.reward.rm_endpoint:
            raise ValueError("reward.adaptive.source rm reads the RM's RV/CD heads: it needs a local reward model")
        judge = None
        if ad.source == "teacher":
            from reward.teachers import make_teacher

            judge = make_teacher(cfg.label)
        self.length = AdaptiveLength(settings, judge)

    def score(self, batch: ScoringBatch) -> list[float]:
        try:
            return self.length.rewards(batch.prompts, batch.responses, batch.references,
                                       [bool(v) for v in batch.verdicts], batch.difficulties, batch.rm)
        except ValueError as err:
            raise RewardError(f"adaptive reward: {err}") from err


# On-policy distillation's weight in reward.components; declared here with the others, computed elsewhere.
TEACHER_KL = "teacher_kl"


@REWARD_COMPONENTS.register(TEACHER_KL)
class TeacherKL:
    """On-policy distillation: the teacher's log-prob of every sampled token minus the student's, a dense reward on
    each token. Per token, so the reward workers leave it out; the update adds it to the advantages
    (rlhf/rl/update.py) from the teacher group's log-probs (rlhf/rl/groups/teacher.py)."""

    per_token = True
    reads_rm = False


def sequence_components(weights: dict[str, float]) -> dict[str, type]:
    """The registered classes of the components with a non-zero weight that the reward workers sum (one value per
    response); per-token components (``per_token``) are the update's."""
    return {name: REWARD_COMPONENTS[name] for name, w in weights.items()
            if w != 0 and not getattr(REWARD_COMPONENTS[name], "per_token", False)}


class RewardModelScores:
    """The reward model's scores for the components that read them: a local distilled RM (``rm_path``) with its
    RV/CD heads, or a reward server (``reward.rm_endpoint``) giving quality alone."""

    def __init__(self, cfg: RunConfig, rm_path: str | None, remote: bool):
        self.batch_size = cfg.rollout_rows
        self.reference = cfg.reward_model.use_reference
        self.remote = self.model = None
        self.precision = "fp32"
        if remote:
            from reward.scoring.remote import RemoteRewardClient

            e = cfg.reward.rm_endpoint
            self.remote = RemoteRewardClient(e.url, token_env=e.api_key_env, timeout_s=e.timeout_s,
                                             retries=e.max_retries, batch_size=self.batch_size)
            return
        from transformers import AutoTokenizer

        from reward.model.distilled import DistilledRewardModel, uses_reference

        self.model = DistilledRewardModel.from_pretrained(rm_path).eval()
        if torch.cuda.is_available():  # a GPU given to this worker by cluster.reward.num_gpus
            self.model.to("cuda")
        self.precision = precision.resolve_precision(cfg.reward_model.scoring_precision, precision.cpu_flags(),
                                                     torch.cuda.is_available())
        self.tokenizer = AutoTokenizer.from_pretrained(rm_path)
        self.reference = uses_reference(self.model)

    def __call__(self, prompts: list[str], responses: list[str], references: list[str]) -> list[dict]:
        """One dict per response: ``quality``, and ``rv``/``cd`` from a local RM's heads."""
        from reward.model.distilled import score_texts, with_reference

        if self.reference:
            responses = [with_reference(r, ref) for r, ref in zip(responses, references, strict=True)]
        try:
            if self.remote is not None:
                return [{"quality": float(s)} for s in self.remote.score(prompts, responses)]
            with precision.autocast(self.precision):
                scores = score_texts(self.model, self.tokenizer, prompts, responses, self.batch_size)
        except Exception as err:  # noqa: BLE001 - re-raised with the batch's first sample for context
            raise RewardError(f"reward model failed on a batch starting with prompt {prompts[0]!r}: {err}") from err
        return [{name: float(value) for name, value in s.items()} for s in scores]
