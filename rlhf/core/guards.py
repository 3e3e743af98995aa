"""Numerical guards: a batch with a NaN or infinite reward, loss or gradient is skipped (no optimizer update),
counted, and after ``max_bad_batches`` such batches in a row the run stops, naming where the values came from."""
from __future__ import annotations

import math


class NonFiniteError(RuntimeError):
    """Too many batches in a row had non-finite rewards, losses or gradients."""


def reward_fault(prompts: list[str], scores: list[dict]) -> str | None:
    """None when every reward is finite; else where the first non-finite one came from. ``scores``: the reward
    workers' per-sample dicts, whose ``nonfinite`` names the offending components (e.g. ``"rm=nan"``)."""
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s["reward"])]
    if not bad:
        return None
    first = scores[bad[0]]
    source = first.get("nonfinite") or f"reward={first['reward']}"
    return (f"non-finite reward from {source} in {len(bad)} of {len(scores)} samples (first on prompt "
            f"{prompts[bad[0]]!r})")


def update_fault(train_metrics: dict) -> str | None:
    """None when the trainer applied its update; else why it skipped it: a non-finite loss, or (with a finite
    loss) a non-finite gradient norm. DeepSpeed refuses a step whose gradient norm is not finite."""
    loss = train_metrics.get("losses/policy_loss", 0.0)
    if not math.isfinite(loss):
        return f"non-finite policy loss {loss}"
    if train_metrics.get("faults/update_skipped"):
        return f"non-finite gradient (norm {train_metrics.get('losses/grad_norm')})"
    return None


class BatchGuard:
    """Counts skipped batches; ``check`` raises ``NonFiniteError`` once ``max_in_a_row`` came one after another."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # batches skipped in the whole run
        self.in_a_row = 0
        self.last_fault: str | None = None  # why the latest batch was skipped; None when it was not

    def record(self, fault: str | None) -> None:
        """One batch: ``fault`` says why it was skipped, None when it was trained on."""
        self.last_fault = fault
        if fault is None:
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1

    def check(self, step: int) -> None:
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(f"stopping at step {step}: {self.in_a_row} batches in a row skipped for non-finite "
                                 f"values (max_bad_batches={self.max_in_a_row}); the last: {self.last_fault}")

    def state(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row, "last_fault": self.last_fault}

    def load_state(self, state: dict) -> None:
        self.skipped, self.in_a_row, self.last_fault = state["skipped"], state["in_a_row"], state["last_fault"]


def finite_metrics(metrics: dict) -> dict:
    """Metrics without NaN or infinite floats (a skipped batch's loss), so metrics.jsonl stays strict JSON."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
