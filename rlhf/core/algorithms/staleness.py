"""Per-token staleness of a partially rolled-out batch (rollout/partial.py), and the bound on it.

A token sampled from weights version v and trained by the update that starts from version V is V - v updates
old. ``rollout.max_staleness`` bounds that age token by token: an older token stays in the response (the tokens
after it were sampled given it) but carries no loss, through the same ``loss_mask`` multi-turn observations use.
veRL's and AReaL's fully asynchronous trainers bound staleness per batch or per sample; a per-token bound keeps
the fresh tail of a response that spans a weight swap.
"""
from __future__ import annotations

from dataclasses import replace

from rlhf.core.data.samples import Sample


def bound_staleness(samples: list[Sample], trainer_version: int, max_staleness: int) -> tuple[list[Sample], dict]:
    """``samples`` with tokens older than ``max_staleness`` masked out of the loss, and the figures: mean and
    largest per-token staleness, the share of tokens masked, weight versions per response. Samples without
    ``token_versions`` (not partial rollouts) pass unchanged and are not counted."""
    ages, masked, versions, out = [], 0, [], []
    for sample in samples:
        if sample.token_versions is None:
            out.append(sample)
            continue
        age = [trainer_version - v for v in sample.token_versions]
        keep = [int(a <= max_staleness) for a in age]
        mask = sample.loss_mask or [1] * len(age)
        ages += age
        masked += sum(m and not k for m, k in zip(mask, keep))
        versions.append(len(set(sample.token_versions)))
        out.append(replace(sample, loss_mask=[m * k for m, k in zip(mask, keep)]) if 0 in keep else sample)
    if not ages:
        return out, {}
    return out, {"perf/staleness": sum(ages) / len(ages), "perf/staleness_max": max(ages),
                 "perf/stale_tokens_masked": masked / len(ages),
                 "charts/versions_per_response": sum(versions) / len(versions)}
