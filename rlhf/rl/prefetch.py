"""Rollouts launched ahead of the trainer: synchronous and one-step-off asynchronous RL on the same path.

Each RL step consumes one ``LaunchedRollout``: a generation already submitted to the rollout workers, tagged with
the weights version it samples from. ``RolloutPrefetch.next`` hands out the oldest one after launching as many as
the run allows to stay in flight behind it: none when synchronous (``rollout.asynchronous`` false), so generation,
scoring and the update follow one another as before; up to ``rollout.max_staleness`` when asynchronous, so the
rollout workers generate batch k+1 while batch k is scored and trained.

Why the weights versions come out right without locks: a Ray actor runs the calls of one caller in the order they
were submitted, and the driver submits each weight sync right after its update. A generation launched before a
sync therefore samples from the weights before it. With max_staleness 1 (v: updates the weights have had):

    step 1: launch gen 1 (v0), gen 2 (v0); wait gen 1; score; update (trainer v0 -> v1); sync v1 (queued after gen 2)
    step 2: launch gen 3 (v1); wait gen 2 (v0); score; update (v1 -> v2; staleness 1); sync v2 (after gen 3)
    step k: launch gen k+1 (v[k-1]); wait gen k (v[k-2]); score; update (staleness 1); sync

The update of a batch generated s versions ago is off-policy by s updates: ``perf/staleness`` logs s (0 on the
first step, then max_staleness), and ``algorithm.tis_cap`` corrects the policy gradient with the ratio of the
trainer's log-probs before the update to the sampler's (the behaviour policy's) ones.

In the middle of a run: an evaluation, or any other generation the driver asks for, is queued on the rollout
workers behind the in-flight batch and the latest weight sync, so it waits for both and always uses the current
weights (those after every update so far), never the in-flight batch's older ones. A checkpoint holds the
trainer's weights after the last update; the in-flight batch is not part of it. Its prompts were drawn already
(``LaunchedRollout.rows``): a resume that must continue the same prompt order launches those rows again, from
the restored weights (so that one batch is generated with staleness 0). No more batches are launched than the
run has steps left (``next``'s ``remaining``), so the last step leaves nothing in flight.

Fully asynchronous (``rollout.partial_rollouts``): the same launches, but a sync does not queue behind the
generation in flight. Its calls run in the workers' ``weights`` concurrency group, beside ``generate``, which
installs the new weights after its current decoding step and continues the unfinished responses from them
(rollout/partial.py). A batch therefore carries tokens of several versions, each recorded; the step bounds their
age token by token (rlhf/core/algorithms/staleness.py) instead of by the batch's launch version.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable


@dataclass
class LaunchedRollout:
    """A generation submitted to the rollout workers and not collected yet."""

    rows: list        # the PromptRows whose samples are being generated, in order
    version: int      # weights version (updates applied) the workers sample them from
    calls: list       # the workers' pending generate calls (Ray object refs), one per worker, in prompt order


class RolloutPrefetch:
    """Launches rollouts through ``launch`` (which draws the next prompts and submits their generation) and hands
    them out oldest first, keeping up to ``depth`` more in flight: 0 synchronous, max_staleness asynchronous."""

    def __init__(self, launch: Callable[[], LaunchedRollout], depth: int):
        if depth < 0:
            raise ValueError(f"pipeline depth must be >= 0, not {depth}")
        self._launch, self.depth = launch, depth
        self._in_flight: deque[LaunchedRollout] = deque()

    def next(self, remaining: int) -> LaunchedRollout:
        """The rollout for this step; before returning it, launch the following ones so that up to ``depth`` of
        them (never more than the ``remaining`` steps planned after this one) are being generated behind it."""
        behind = min(self.depth, max(remaining, 0))
        while len(self._in_flight) < 1 + behind:
            self._in_flight.append(self._launch())
        return self._in_flight.popleft()

    @property
    def in_flight(self) -> list[LaunchedRollout]:
        """Launched and not handed out yet (what a checkpoint would have to relaunch on resume)."""
        return list(self._in_flight)
