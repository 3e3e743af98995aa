"""Sampled completions a user can read: each RL step's best, worst and a few random rollouts, saved as
``samples/step_N.jsonl`` in the run directory (one JSON object per sample: the prompt, the response, the total
reward and each component's, the advantage it was trained with), and the sample table of report.md.

Best and worst are by total reward (ties keep the batch order); the random ones are drawn from the rest with a
seed fixed by the step, so a resumed run writes the same files.
"""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

SAMPLES_DIR = "samples"
_STEP_FILE = re.compile(r"step_(\d+)\.jsonl$")


def pick(rewards: list[float], k: int, seed: int) -> list[tuple[str, int]]:
    """(kind, index) of the ``k`` highest rewards ("best", highest first), the ``k`` lowest ("worst", lowest first)
    and ``k`` others drawn at random ("random"); fewer where the batch is small, each index once. Non-finite
    rewards rank below every finite one."""
    def key(i: int) -> float:
        return rewards[i] if math.isfinite(rewards[i]) else -math.inf

    order = sorted(range(len(rewards)), key=key, reverse=True)  # stable: ties keep the batch order
    best = order[:k]
    worst = [i for i in reversed(order) if i not in best][:k]
    rest = [i for i in range(len(rewards)) if i not in best and i not in worst]
    drawn = sorted(random.Random(seed).sample(rest, min(k, len(rest))))
    return [("best", i) for i in best] + [("worst", i) for i in worst] + [("random", i) for i in drawn]


def step_records(prompts: list[str], texts: list[str], scores: list[dict], rewards: list[float],
                 advantages: list[float | None] | None, k: int, seed: int) -> list[dict]:
    """The picked samples of one step as records: ``kind``, ``index`` (in the batch), ``prompt``, ``response``,
    ``reward`` (the total the update used), ``rewards`` (each component's raw value), ``advantage`` (None where
    the sample was not trained on), ``correct``."""
    records = []
    for kind, i in pick(rewards, k, seed):
        parts = scores[i].get("parts") or {}
        records.append({"kind": kind, "index": i, "prompt": prompts[i], "response": texts[i],
                        "reward": _number(rewards[i]), "rewards": {name: _number(v) for name, v in parts.items()},
                        "advantage": _number(advantages[i]) if advantages is not None else None,
                        "correct": scores[i].get("correct")})
    return records


def save_step_samples(samples_dir: str | Path, step: int, records: list[dict]) -> Path:
    """Write ``samples_dir/step_<step>.jsonl`` (replacing one a resumed run wrote before); returns its path."""
    path = Path(samples_dir) / f"step_{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def latest_samples(run_dir: str | Path) -> tuple[int, list[dict]] | None:
    """(step, records) of the newest ``samples/step_N.jsonl`` in ``run_dir``; None when there is none."""
    steps = {int(m.group(1)): p for p in (Path(run_dir) / SAMPLES_DIR).glob("step_*.jsonl")
             if (m := _STEP_FILE.search(p.name))}
    if not steps:
        return None
    step = max(steps)
    records = []
    for line in steps[step].read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # cut short by a crash: the records before it still count
    return step, records


def _number(value) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def save_rl_samples(samples_dir: str | Path, step: int, rows: list, samples: list, scores: list[dict],
                    rewards: list[float], advantages: list[float | None] | None, k: int, seed: int) -> Path:
    """``step_records`` of one RL step's batch (``rows``: its prompts, each sampled ``len(samples) // len(rows)``
    times), written by ``save_step_samples``."""
    n = len(samples) // len(rows)
    return save_step_samples(samples_dir, step, step_records([rows[i // n].prompt for i in range(len(samples))],
                                                             [s.text for s in samples], scores, rewards, advantages,
                                                             k, seed))
