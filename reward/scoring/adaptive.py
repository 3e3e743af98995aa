"""The adaptive-length reward: reason as much as the problem needs, no more and no less.

DistilQwen's adaptive-thinking students fit their reasoning verbosity (RV, 0-9) to the problem's cognitive
difficulty (CD, 0-9). This component rewards exactly that, and only for correct answers (a wrong answer of the
right length earns nothing: correctness is the other components' business, and length must never pay for a wrong
answer):

    target(cd)   = rv_at_cd0 + (rv_at_cd9 - rv_at_cd0) * cd / 9             (target RV rises with CD)
    gap          = rv - target(cd)
    penalty      = over_penalty  * max(0,  gap - tolerance)                  (over-thinking)
                 + under_penalty * max(0, -gap - tolerance)                  (under-thinking)
    length_fit   = correct * max(0, 1 - penalty)                             (in [0, 1])
    skip_bonus   = skip_think_bonus * correct * (no think block) * (cd <= easy_cd)

The component's value is ``length_fit + skip_bonus``; ``reward.components.adaptive`` weights it beside the verifier
or the RM. RV and CD come from one of three sources (``reward.adaptive.source``): ``rule`` (RV from the length of
the reasoning text, CD from the dataset's difficulty field scaled to 0-9), ``teacher`` (the teacher judge's RV and
CD, e.g. the arithmetic task's oracle) or ``rm`` (the distilled reward model's RV and CD heads).
"""
from __future__ import annotations

from rlhf.core.data import think

SCALE_MAX = 9.0  # RV and CD are 0-9 scores


def target_rv(cd: float, rv_at_cd0: float, rv_at_cd9: float) -> float:
    """The reasoning verbosity a problem of difficulty ``cd`` deserves: linear in CD between the two ends."""
    return rv_at_cd0 + (rv_at_cd9 - rv_at_cd0) * min(SCALE_MAX, max(0.0, cd)) / SCALE_MAX


def length_penalty(rv: float, target: float, tolerance: float, over_penalty: float, under_penalty: float) -> float:
    """Penalty for a verbosity off its target by more than ``tolerance`` RV points, per point beyond it."""
    gap = rv - target
    return over_penalty * max(0.0, gap - tolerance) + under_penalty * max(0.0, -gap - tolerance)


def length_fit(correct: bool, rv: float, cd: float, rv_at_cd0: float, rv_at_cd9: float, tolerance: float,
               over_penalty: float, under_penalty: float) -> float:
    """1 for a correct answer whose verbosity fits its difficulty, falling linearly (to 0) as it strays; 0 when
    wrong."""
    if not correct:
        return 0.0
    penalty = length_penalty(rv, target_rv(cd, rv_at_cd0, rv_at_cd9), tolerance, over_penalty, under_penalty)
    return max(0.0, 1.0 - penalty)


def skip_think_bonus(correct: bool, thought: bool, cd: float, easy_cd: float, bonus: float) -> float:
    """``bonus`` for a correct answer given without thinking to an easy problem (CD at most ``easy_cd``)."""
    return bonus if correct and not thought and cd <= easy_cd else 0.0


def rule_rv(response: str, chars_per_rv: float) -> float:
    """RV by rule: one point per ``chars_per_rv`` characters of reasoning (think blocks' text, tags not counted,
    plus answer text before the final ``#``), capped at 9. Continuous, so RL sees every character it saves."""
    return min(SCALE_MAX, len(think.reasoning_text(response)) / chars_per_rv)


def rule_cd(difficulty: float, low: float, high: float) -> float:
    """CD by rule: the dataset's difficulty, ``low``..``high``, scaled linearly to 0..9 (clipped)."""
    if high <= low:
        raise ValueError(f"difficulty range must rise, got [{low}, {high}]")
    return min(SCALE_MAX, max(0.0, SCALE_MAX * (difficulty - low) / (high - low)))


class AdaptiveLength:
    """The component as a reward worker uses it: settings from ``reward.adaptive`` (a dict of AdaptiveConfig's
    fields, ``difficulty_range`` resolved), and a teacher when the source is ``teacher``."""

    def __init__(self, settings: dict, teacher=None):
        self.s = settings
        self.teacher = teacher
        if settings["source"] == "teacher" and teacher is None:
            raise ValueError("reward.adaptive.source teacher needs a teacher")

    def signals(self, prompts: list[str], responses: list[str], references: list[str],
                difficulties: list[float | None] | None, rm_scores: list[dict] | None) -> tuple[list, list]:
        """(RV, CD) per response from the configured source."""
        source = self.s["source"]
        if source == "rm":
            if rm_scores is None:
                raise ValueError("reward.adaptive.source rm needs the reward model's scores")
            return [s["rv"] for s in rm_scores], [s["cd"] for s in rm_scores]
        if source == "teacher":
            verdicts = self.teacher.judge(prompts, responses, references)
            bad = next((v for v in verdicts if v.error or v.rv is None or v.cd is None), None)
            if bad is not None:
                raise ValueError(f"the teacher gave no RV/CD for the adaptive reward: {bad.error}")
            return [v.rv for v in verdicts], [v.cd for v in verdicts]
        if difficulties is None or any(d is None for d in difficulties):
            raise ValueError("reward.adaptive.source rule needs each prompt's difficulty (task.difficulty_field)")
        low, high = self.s["difficulty_range"]
        return ([rule_rv(r, self.s["chars_per_rv"]) for r in responses],
                [rule_cd(d, low, high) for d in difficulties])

    def rewards(self, prompts: list[str], responses: list[str], references: list[str], correct: list[bool],
                difficulties: list[float | None] | None = None, rm_scores: list[dict] | None = None) -> list[float]:
        s = self.s
        rvs, cds = self.signals(prompts, responses, references, difficulties, rm_scores)
        out = []
        for response, ok, rv, cd in zip(responses, correct, rvs, cds, strict=True):
            value = length_fit(ok, rv, cd, s["rv_at_cd0"], s["rv_at_cd9"], s["tolerance"], s["over_penalty"],
                               s["under_penalty"])
            value += skip_think_bonus(ok, think.split_think(response).thought, cd, s["easy_cd"],
                                      s["skip_think_bonus"])
            out.append(value)
        return out
