"""The teacher audit during RL: every ``reward.audit_every`` steps the teacher re-judges a sample of the rollouts and
the agreement of the reward (the distilled RM's score) with the teacher's ranking is logged; below
``reward.audit_warn_below`` the alarm is raised (``audit/alarm``), and ``reward.audit_stop_on_alarm`` ends RL there.
"""
from __future__ import annotations

import logging

from reward.model.labelling import judged_row
from rlhf.core.config.run_config import RewardConfig
from rlhf.core.data.datasets import PromptRow

logger = logging.getLogger("distilrl")


def pairwise_agreement(groups: list[list[tuple[float, float]]]) -> tuple[float, int]:
    """Within each group of (rm score, teacher quality) for one prompt's samples: the fraction of pairs the teacher
    tells apart that the RM orders the same way (RM ties count half). Returns (agreement, pairs counted)."""
    agree, pairs = 0.0, 0
    for group in groups:
        for i, (rm_a, teacher_a) in enumerate(group):
            for rm_b, teacher_b in group[i + 1:]:
                if teacher_a == teacher_b:
                    continue
                pairs += 1
                if rm_a == rm_b:
                    agree += 0.5
                elif (rm_a > rm_b) == (teacher_a > teacher_b):
                    agree += 1.0
    return (agree / pairs if pairs else float("nan")), pairs


def audit(teacher, rows: list[PromptRow], samples: list, scores: list[dict], cfg: RewardConfig
          ) -> tuple[dict, list[list[dict]]]:
    """Re-judge a sample of this step's rollouts with the teacher; RM-teacher agreement is the first sign of
    reward hacking when it drops. Returns the audit's figures and the judged groups (one prompt's samples each, as
    labelling writes rows: reward/model/labelling.py), which an RM refresh trains and checks on (paid for once)."""
    n = len(samples) // len(rows)
    groups = max(1, cfg.audit_samples // n)
    take = list(range(min(groups, len(rows)) * n))
    verdicts = teacher.judge([rows[i // n].prompt for i in take], [samples[i].text for i in take],
                             [rows[i // n].answer for i in take])
    key = "rm" if "rm" in scores[0] else "reward"
    grouped = [[(scores[i][key], verdicts[i].quality) for i in range(g * n, (g + 1) * n)
                if verdicts[i].quality is not None] for g in range(len(take) // n)]
    agreement, pairs = pairwise_agreement(grouped)
    judged = [v.quality for v in verdicts if v.quality is not None]
    alarm = bool(pairs) and agreement < cfg.audit_warn_below
    if alarm:
        logger.warning("teacher audit: RM-teacher agreement %.2f is below %.2f: the policy may be exploiting the "
                       "reward model", agreement, cfg.audit_warn_below)
    groups = [[judged_row(rows[g], samples[i].text, "student", verdicts[i]) for i in range(g * n, (g + 1) * n)
               if verdicts[i].quality is not None] for g in range(len(take) // n)]
    return {"audit/rm_teacher_agreement": agreement, "audit/pairs": pairs,
            "audit/teacher_quality": sum(judged) / max(1, len(judged)), "audit/alarm": float(alarm),
            "audit/teacher_calls": len(take)}, groups


def audit_stop(metrics: dict, cfg: RewardConfig) -> str | None:
    """The one line that ends the RL stage when this step's audit raised the alarm and
    ``reward.audit_stop_on_alarm`` is set; None otherwise."""
    if not (cfg.audit_stop_on_alarm and metrics.get("audit/alarm")):
        return None
    return (f"stopped at step {metrics['step']}: the teacher audit's agreement with the reward "
            f"({metrics['audit/rm_teacher_agreement']:.2f} over {metrics['audit/pairs']} pairs) is below "
            f"reward.audit_warn_below={cfg.audit_warn_below}: the policy may be exploiting the reward "
            f"(reward.audit_stop_on_alarm)")
