"""Reward shaping applied in the driver before advantages: DAPO's overlong penalty and dynamic sampling."""
from __future__ import annotations

import math

import torch

from rlhf.core.algorithms.advantages import grouped_rewards


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term (<= 0) from each response's length in tokens:

        0                                       if len <= max_length - buffer
        -penalty * (len - (max_length - buffer)) / buffer   within the last ``buffer`` tokens
        -penalty                                if len >= max_length

    A ramp instead of a cliff: responses drift towards the limit gradually, and a hard penalty at truncation
    alone would punish a sound but long answer as if it were wrong. ``buffer`` 0 turns it off (all 0).
    """
    if not 0 <= buffer <= max_length:
        raise ValueError(f"overlong buffer of {buffer} tokens must be between 0 and max_length={max_length}")
    if buffer == 0:
        return torch.zeros(lengths.shape)
    excess = (lengths.float() - (max_length - buffer)).clamp(min=0.0, max=float(buffer))
    return -penalty * excess / buffer


def informative_groups(rewards: torch.Tensor, group_size: int, rows_multiple: int = 1) -> torch.Tensor:
    """DAPO's dynamic sampling, in its simplest form: which rows (B,) bool to train on.

    A group whose rewards are all equal has zero advantage under any group baseline: it adds no gradient but
    still dilutes the token-mean normaliser, so it is dropped. The kept rows must then split evenly across
    ``rows_multiple`` trainer ranks; if they do not, the fewest informative groups are dropped as well: the
    *last* ones in batch order (prompts arrive shuffled), keeping the largest count k with k * group_size a
    multiple of ``rows_multiple``. May keep nothing (all False); the caller then skips the update.
    DAPO proper samples more prompts to refill the batch; this version trains on a smaller one instead.
    """
    grouped = grouped_rewards(rewards, group_size)
    informative = grouped.max(dim=1).values != grouped.min(dim=1).values
    # k groups give k * group_size rows: a multiple of rows_multiple exactly when k is a multiple of this step.
    step = rows_multiple // math.gcd(group_size, rows_multiple)
    keep_count = int(informative.sum()) // step * step
    keep = informative & (informative.cumsum(dim=0) <= keep_count)
    return keep.repeat_interleave(group_size)


def turn_rewards(episodes: list[dict | None]) -> torch.Tensor | None:
    """Per-turn shaping of multi-turn trajectories: each one's summed ``turn_reward`` (what its environment gave
    its turns, e.g. a penalty per failed tool call), to add to its reward; None when no trajectory has any."""
    values = [float((episode or {}).get("turn_reward", 0.0)) for episode in episodes]
    return torch.tensor(values) if any(values) else None
