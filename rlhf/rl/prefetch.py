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
weights (those after every update so far), never the in-flight batch's older ones. No more batches are launched
than the run has steps left (``next``'s ``remaining``), so the last step leaves nothing in flight.

Checkpoints and resume: a checkpoint waits for the batches in flight (``wait_in_flight``) and stores their samples,
rows and launch versions (rlhf/rl/run_checkpoint.py); the live run goes on with those samples, and a resumed run
puts them back at the front of the queue (``put_back``), so both train the same batches in the same order. The
rollout workers' RNG states and the weights the checkpoint holds come after those generations and after the last
update's sync (a Ray actor runs one caller's calls in order), so the next launch samples exactly as it would have:
one-step-off resume is bit-exact. Fully asynchronous runs (below) at max_staleness 0 have nothing in flight and are
exact too; above 0, a sync lands at a decoding step that depends on timing, so such runs differ from run to run
anyway, and what resume keeps is the accounting: no sample lost or repeated, each token's version as sampled.

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
    """A generation submitted to the rollout workers and not trained on yet."""

    rows: list        # the PromptRows whose samples are being generated, in order
    version: int      # weights version (updates applied) the workers sample them from
    calls: list       # the workers' pending generate calls (Ray object refs), one per worker, in prompt order
    samples: list | None = None  # the generated samples once waited for ahead of their step (a checkpoint), or
                                 # put back by a resume; ``calls`` is then empty


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
        """Launched and not handed out yet, oldest first."""
        return list(self._in_flight)

    def wait_in_flight(self, wait: Callable[[LaunchedRollout], LaunchedRollout]) -> list[LaunchedRollout]:
        """Each batch in flight generated to the end by ``wait`` (which returns it with its samples), kept in place
        for the steps to come; returns them, oldest first, for a checkpoint to store."""
        self._in_flight = deque(wait(launched) for launched in self._in_flight)
        return self.in_flight

    def put_back(self, batches: list[LaunchedRollout]) -> None:
        """A resumed run's batches that were in flight at its checkpoint, ahead of any launched since: the next
        steps take them first, in their order."""
        self._in_flight.extendleft(reversed(batches))
