"""The data side of an on-policy RM refresh (rlhf/rl/rm_refresh.py), as small pure functions.

A refresh has the teacher judge whole groups (one prompt's samples) of recent rollouts, so that pairs form within
a group as in labelling; some groups are held out to check the refreshed RM, the rest train it together with a
replay of its original pairs, so that it learns the new samples without forgetting the old ones.
"""
from __future__ import annotations

import math
import random


def budget_groups(available: int, group_size: int, teacher_calls: int) -> int:
    """How many whole groups of ``group_size`` samples ``teacher_calls`` judgments pay for, at most ``available``
    (one teacher call judges one response)."""
    return min(available, teacher_calls // group_size)


def split_groups(count: int, held_out_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """(training groups, held-out groups): ``count`` group indices drawn apart by ``rng``, at least one on each
    side when there are two or more, about ``held_out_fraction`` of them held out; each list ascending."""
    if count < 2:
        return list(range(count)), []
    held = min(count - 1, max(1, round(count * held_out_fraction)))
    chosen = set(rng.sample(range(count), held))
    return [i for i in range(count) if i not in chosen], sorted(chosen)


def replay_count(new_pairs: int, available: int, fraction: float) -> int:
    """Original pairs to replay beside ``new_pairs`` fresh ones so that they make ``fraction`` of the mix
    (replayed / (replayed + new)), at most ``available``."""
    if fraction <= 0 or new_pairs == 0:
        return 0
    return min(available, round(new_pairs * fraction / (1.0 - fraction)))


def mix_replay(new: list[dict], originals: list[dict], fraction: float, rng: random.Random) -> list[dict]:
    """The refresh's training pairs: all new pairs and a random ``replay_count`` of the originals, shuffled."""
    mixed = list(new) + rng.sample(originals, replay_count(len(new), len(originals), fraction))
    rng.shuffle(mixed)
    return mixed


def keeps_agreement(before: float, after: float) -> bool:
    """Whether a refreshed RM may replace the current one: it must agree with the teacher on the held-out slice at
    least as often as before. Without a measurable slice (no pair the teacher tells apart) there is nothing to
    show it did not get worse, so it may not."""
    if math.isnan(after):
        return False
    return math.isnan(before) or after >= before


def batch_rm_version(scores: list[dict]) -> int | None:
    """The one RM version that scored a batch (each score dict's ``rm_version``); None when no RM scored it.
    A batch scored by two versions would mix two reward functions in one advantage: refused."""
    versions = {s["rm_version"] for s in scores if "rm_version" in s}
    if len(versions) > 1:
        raise RuntimeError(f"one batch was scored by reward-model versions {sorted(versions)}: a weight swap "
                           f"reached the reward workers mid-batch")
    return versions.pop() if versions else None
