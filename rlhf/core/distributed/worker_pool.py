"""Waiting on Ray actors with a deadline, and pools of stateless workers that are restarted when they die.

A rollout or reward worker holds nothing that cannot be rebuilt (its model is on disk, or comes from trainer rank
0 with a version number), so when its process dies mid-call (killed, out of memory, a lost node) ``WorkerPool``
starts a replacement, lets its owner restore it (``restore``: e.g. the current policy weights) and re-issues the
unfinished part of the call; the caller sees a slower call, and ``restarts`` counts what happened.

Trainer ranks hold optimizer state and sit in collectives together, so one that dies cannot be replaced in place:
``get_all`` stops the run with a one-line ``WorkerDiedError`` naming the rank, never a hang (every wait has the
run's ``call_timeout_s``).
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

logger = logging.getLogger("distilrl")

# After one call of a group fails with an ordinary error, how long to look for a dead actor among the others: a
# rank killed mid-collective makes its peers fail too, and the dead rank is the cause worth reporting.
_ROOT_CAUSE_GRACE_S = 5.0


class WorkerDiedError(RuntimeError):
    """An actor's process died and the run cannot go on (a trainer rank, or a worker out of restarts)."""


def death_reason(err: RayActorError) -> str:
    """One line from Ray's many-line actor-death message: what its constructor raised, or the pid and why the
    process ended, as far as Ray says."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if "error raised in its creation task" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"its constructor raised {lines[-1]}"
    pid = re.search(r"\bpid: (\d+)", text)
    detail = re.search(r"Worker exit detail: (.*?)(?:\. Some common causes|\. There are some potential|$)", text,
                       re.M)
    why = detail.group(1).strip().rstrip(".") if detail else "its process ended"
    return f"pid {pid.group(1)}: {why}" if pid else why


def application_error(err: RayTaskError) -> BaseException:
    """The exception the remote method raised (a RewardError, a StaleWeightsError...), so the caller sees its
    one-line message rather than Ray's wrapper with the remote traceback (kept as ``__cause__``)."""
    cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else None
    if cause is None:
        return err
    cause.__cause__ = err
    return cause


def get_all(refs: Sequence, names: Sequence[str], what: str, timeout_s: float) -> list:
    """``ray.get(refs)`` with a deadline, where a dead actor raises ``WorkerDiedError`` naming it (``names[i]``
    says whose call ``refs[i]`` is, e.g. "trainer rank 1") and a stuck one a ``TimeoutError`` naming who is late.
    Returns the results in order; an error raised by a remote method is re-raised as itself."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending, failure = list(refs), None
    deadline = time.monotonic() + timeout_s
    while pending:
        wait_s = deadline - time.monotonic()
        if failure is not None:
            wait_s = min(wait_s, failure[1] - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(wait_s, 0.0), fetch_local=False)
        if not ready:
            if failure is not None:
                raise failure[0]
            late = ", ".join(names[index[ref]] for ref in pending)
            raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s (waiting for {late}); raise "
                               f"call_timeout_s if the work is just slow")
        ref = ready[0]
        try:
            results[index[ref]] = ray.get(ref)
        except RayActorError as err:
            raise WorkerDiedError(f"{names[index[ref]]} died during {what} ({death_reason(err)}): the run "
                                  f"cannot go on without it") from None
        except RayTaskError as err:
            if failure is None:
                failure = (application_error(err), time.monotonic() + _ROOT_CAUSE_GRACE_S)
    if failure is not None:
        raise failure[0]
    return results


class WorkerPool:
    """``size`` Ray actors of one role, each made by ``start(i)``; a call to them survives a worker's death.

    ``start(i)`` returns a new actor handle for slot ``i`` (not yet waited on). ``restore(handle)``, when set,
    prepares a replacement before it takes over (the rollout pool's owner installs the current weights).
    ``max_restarts``: replacements allowed for one slot within one call before the run stops.
    """

    def __init__(self, role: str, start: Callable[[int], Any], size: int, timeout_s: float, max_restarts: int):
        self.role, self._start, self.timeout_s, self.max_restarts = role, start, timeout_s, max_restarts
        self.restore: Callable[[Any], None] | None = None
        self.restarts = 0  # replacements started so far, over the pool's life
        self.workers = [start(i) for i in range(size)]
        try:
            get_all([w.__ray_ready__.remote() for w in self.workers], self._names(), f"{role} worker start-up",
                    timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, method: str, args: Sequence[tuple | None], what: str, timeout_s: float | None = None) -> list:
        """``worker[i].method(*args[i])`` on every worker whose ``args[i]`` is not None; returns the results in
        order (None where skipped). A worker that dies is replaced and its part re-issued; each part has
        ``timeout_s`` (default the pool's) from when it was last issued."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        results: list[Any] = [None] * len(args)
        pending: dict = {}  # ref -> (slot, deadline)
        deaths = [0] * len(args)
        for i, a in enumerate(args):
            if a is not None:
                pending[self._submit(i, method, a)] = (i, time.monotonic() + timeout_s)
        while pending:
            first_deadline = min(deadline for _, deadline in pending.values())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(first_deadline - time.monotonic(), 0.0),
                                fetch_local=False)
            if not ready:
                # ray.wait can return a hair before its timeout: the part with the first deadline is late anyway.
                now = max(time.monotonic(), first_deadline)
                late = ", ".join(f"{self.role} worker {i}" for i, d in pending.values() if d <= now)
                raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s (waiting for {late}); "
                                   f"raise call_timeout_s if the work is just slow")
            ref = ready[0]
            i, _ = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except RayActorError as err:
                deaths[i] += 1
                self._replace(i, what, err, deaths[i])
                pending[self._submit(i, method, args[i])] = (i, time.monotonic() + timeout_s)
            except RayTaskError as err:
                raise application_error(err) from None
        return results

    def _submit(self, i: int, method: str, args: tuple):
        return getattr(self.workers[i], method).remote(*args)

    def _replace(self, i: int, what: str, err: RayActorError, deaths: int) -> None:
        reason = death_reason(err)
        if deaths > self.max_restarts:
            raise WorkerDiedError(f"{self.role} worker {i} died {deaths} times during {what} (last: {reason}); "
                                  f"giving up after max_worker_restarts={self.max_restarts}")
        logger.warning("%s worker %d died during %s (%s); restarting it and re-issuing its work", self.role, i, what,
                       reason)
        ray.kill(self.workers[i], no_restart=True)  # whatever is left of it (a hung process, a dying node)
        worker = self._start(i)
        get_all([worker.__ray_ready__.remote()], [f"restarted {self.role} worker {i}"], f"{self.role} worker restart",
                self.timeout_s)
        if self.restore is not None:
            self.restore(worker)
        self.workers[i] = worker
        self.restarts += 1

    def _names(self) -> list[str]:
        return [f"{self.role} worker {i}" for i in range(len(self.workers))]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
