"""The wait for the model, shared by both servers: requests queue for a fixed number of worker threads (one per
model copy), the queue is bounded in length and in wait, and waiting requests that can share a model call are
batched into one.

Order. Requests fall into size classes by cost (the tokens they make the model read or write; class = the cost's
power of two); the smallest class is served first, first come first served within a class. So a light client
behind heavy ones waits for the call in progress, not for every heavy request queued before it. A request that
has waited half the wait bound goes first whatever its size, so a steady stream of light requests cannot starve a
heavy one. Batching takes, after the request served next, the waiting requests with its batch key (requests whose
sampling settings differ cannot share a call) and a cost of at most twice its own plus ``BATCH_SLACK`` (so a light
request never waits for heavy ones batched with it), in order, up to ``max_batch_items`` items and a total cost of
``max_batch_cost`` or the first request's cost, whichever is more: heavy requests run one at a time, so a light
request waits for at most one of them (and its own call).

Bounds. Beyond ``max_queue`` waiting requests, or after ``max_wait_s`` without a turn, ``submit`` raises ``Busy``
(the servers answer 503 with ``Retry-After``): a burst costs latency or a clear refusal, never unbounded memory.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


BATCH_SLACK = 64  # cost (tokens) any request may add to a batch beside a lighter head


class Busy(Exception):
    """No turn for this request: the queue is full, or it waited ``max_wait_s``. ``str()`` says which."""


@dataclass(eq=False)
class _Job:
    payload: Any
    cost: int
    items: int
    batch_key: Hashable | None
    arrived: float = field(default_factory=time.monotonic)
    started: bool = False
    finished: bool = False
    result: Any = None
    error: BaseException | None = None

    @property
    def size_class(self) -> int:
        return max(self.cost, 1).bit_length()


def next_batch(waiting: Sequence[_Job], now: float, age_limit_s: float, max_items: int,
               max_cost: int) -> list[_Job]:
    """The jobs to run next (``waiting`` is in arrival order): the head (the oldest if it has waited
    ``age_limit_s``, else the oldest of the smallest size class), then jobs of its key and similar cost, within
    ``max_items`` items and a cost of ``max(max_cost, head's cost)``."""
    head = waiting[0] if now - waiting[0].arrived >= age_limit_s else min(waiting, key=lambda j: j.size_class)
    batch, items, cost = [head], head.items, head.cost
    if head.batch_key is None:
        return batch
    for job in waiting:
        if job is head or job.batch_key != head.batch_key or job.cost > 2 * head.cost + BATCH_SLACK:
            continue
        if items + job.items > max_items or cost + job.cost > max(max_cost, head.cost):
            break
        batch.append(job)
        items, cost = items + job.items, cost + job.cost
    return batch


class WorkQueue:
    """``submit(payload)`` returns ``run([payload, ...])``'s answer for it, called on a worker thread in a batch of
    waiting payloads; ``run`` returns one result per payload. If a batch of several fails, each payload is run
    alone so that one bad request costs only its own answer; an exception from a single run reaches its caller."""

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], what: str, max_queue: int, max_wait_s: float,
                 workers: int = 1, max_batch_items: int = 1, max_batch_cost: int = 4096):
        if workers <= 0 or max_queue < 0 or max_wait_s <= 0 or max_batch_items <= 0:
            raise ValueError("workers, max_wait_s and max_batch_items must be positive, max_queue non-negative")
        self.run, self.what = run, what
        self.max_queue, self.max_wait_s, self.workers = max_queue, max_wait_s, workers
        self.max_batch_items, self.max_batch_cost = max_batch_items, max_batch_cost
        self._cond = threading.Condition()
        self._waiting: list[_Job] = []
        self._busy = 0  # workers running a batch
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.batches = 0  # calls of run (for tests and the benchmark)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> int:
        return self._busy

    def submit(self, payload: Any, cost: int = 1, items: int = 1, batch_key: Hashable | None = None) -> Any:
        return self.submit_parts([(payload, cost, items)], batch_key)[0]

    def submit_parts(self, parts: Sequence[tuple[Any, int, int]], batch_key: Hashable | None = None) -> list[Any]:
        """One request as several jobs ((payload, cost, items) each), queued together: a heavy request split
        into parts of bounded cost lets lighter requests in between its parts. The wait bound is for the first
        part to start; the results come in order, or the first part's error."""
        jobs = [_Job(payload, cost, items, batch_key) for payload, cost, items in parts]
        with self._cond:
            if self._closed:
                raise Busy("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue + (self.workers - self._busy):
                raise Busy(f"{self.max_queue} requests are already queued for {self.what}")
            self._start_workers()
            self._waiting.extend(jobs)
            self._cond.notify_all()
            deadline = jobs[0].arrived + self.max_wait_s
            while not any(job.started for job in jobs) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    for job in jobs:
                        self._waiting.remove(job)
                    raise Busy(f"no {self.what} slot within {self.max_wait_s:g} s")
                self._cond.wait(left)
            while not all(job.finished for job in jobs) and not self._closed:
                self._cond.wait()
        if not all(job.finished for job in jobs):
            raise Busy("the server is shutting down")
        for job in jobs:
            if job.error is not None:
                raise job.error
        return [job.result for job in jobs]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def _start_workers(self) -> None:
        while len(self._threads) < self.workers:
            thread = threading.Thread(target=self._work, name=f"{self.what}-worker", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = next_batch(self._waiting, time.monotonic(), self.max_wait_s / 2, self.max_batch_items,
                                   self.max_batch_cost)
                for job in batch:
                    self._waiting.remove(job)
                    job.started = True
                self._busy += 1
                self.batches += 1
                self._cond.notify_all()
            self._run(batch)
            with self._cond:
                self._busy -= 1
                for job in batch:
                    job.finished = True
                self._cond.notify_all()

    def _run(self, batch: list[_Job]) -> None:
        try:
            results = list(self.run([job.payload for job in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{self.what} returned {len(results)} results for {len(batch)} requests")
        except Exception as err:
            if len(batch) == 1:
                batch[0].error = err
                return
            for job in batch:
                self._run([job])
            return
        for job, result in zip(batch, results):
            job.result = result
