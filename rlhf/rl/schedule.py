"""The RL stage's schedule, top to bottom: which prompts each step takes, whether their generation was launched
ahead (one-step-off asynchronous) or runs now (synchronous), what is watched after each step (non-finite figures,
signs of a run that cannot learn, skipped batches), when the audit alarm stops RL, and when checkpoints are written.

    for each step:
        rows    <- the next prompts (a seeded draw: the same order on resume)
        metrics <- RLStep.step(rows, launched-ahead generation or None)      (rlhf/rl/step.py)
        record metrics; warn on signs of a run that cannot learn; stop after max_bad_batches skipped in a row
        the audit alarm with reward.audit_stop_on_alarm -> stop RL here
        every save_every steps -> checkpoint (rlhf/rl/run_checkpoint.py)
        every eval.every steps -> a held-out evaluation, a point of the learning curve

``rlhf.api.Trainer`` owns one ``RLSchedule`` and calls ``step`` (one step, from Python) and ``train`` (the stage).
"""
from __future__ import annotations

import random
from typing import Callable

from rlhf.core.config.run_config import RunConfig
from rlhf.core.data.datasets import PromptRow
from rlhf.core.guards import finite_metrics
from rlhf.core.progress import Progress
from rlhf.outputs import diagnostics
from rlhf.rl.audit import audit_stop
from rlhf.rl.prefetch import LaunchedRollout, RolloutPrefetch
from rlhf.rl.step import RLStep
from rlhf.stages.run_dir import progress_line


class RLSchedule:
    """Steps taken, the prompt order, the rollouts launched ahead and what the run has said about its steps."""

    def __init__(self, cfg: RunConfig, train_rows: list[PromptRow], log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self._train_rows = train_rows
        self.order = random.Random(cfg.seed + 3)  # which prompts each RL step takes
        self.steps = 0  # RL steps taken
        self.plan_end = cfg.algorithm.steps  # launch nothing ahead for steps beyond this one (rlhf/rl/prefetch.py)
        self._launched: RolloutPrefetch | None = None  # generations launched ahead (asynchronous rollout)
        self._put_back: list[LaunchedRollout] = []  # a resumed run's batches that were in flight at its checkpoint
        self._progress: Progress | None = None  # the RL stage's progress bar, while train() runs
        self._last_metrics: dict = {}
        self._history: list[dict] = []  # recent steps' metrics, for the signs of a run that cannot learn
        self._warned: set[str] = set()  # those signs said on the console while they last

    @property
    def train_rows(self) -> list[PromptRow]:
        return self._train_rows

    def draw(self) -> list[PromptRow]:
        return self.order.sample(self._train_rows, self.cfg.rollout.prompts_per_step)

    def start(self, loop: RLStep) -> None:
        """Called once the step's actors run: asynchronous rollout launches generations ahead from here on, after
        the batches a resumed run had in flight."""
        r = self.cfg.rollout
        if r.asynchronous:  # the synchronous schedule generates each batch in step() instead
            self._launched = RolloutPrefetch(lambda: loop.launch(self.draw()), r.max_staleness)
            self._launched.put_back(self._put_back)
            self._put_back = []

    def put_back(self, batches: list[LaunchedRollout]) -> None:
        """A checkpoint's batches in flight (with their samples): the first steps after ``start`` train them."""
        self._put_back = batches

    def in_flight(self, loop: RLStep) -> list[LaunchedRollout]:
        """The batches launched ahead and not trained on yet, generated to the end (a checkpoint stores them; the
        run goes on with them)."""
        return self._launched.wait_in_flight(loop.rollout.wait) if self._launched is not None else []

    def step(self, loop: RLStep, record: Callable[[dict], None]) -> dict:
        """One RL step; ``record`` writes its metrics (before a guard may stop the run, so they are kept)."""
        if self._launched is not None:
            # This batch was launched while the previous one trained (rlhf/rl/prefetch.py).
            launched = self._launched.next(remaining=self.plan_end - self.steps - 1)
            metrics = loop.step(self.steps + 1, launched.rows, launched)
        else:
            # Generated now, through the rollout worker pool: a worker that dies mid-call is restarted and its part
            # re-issued (launched calls bypass the pool, so asynchronous rollout stops on a dead worker instead).
            metrics = loop.step(self.steps + 1, self.draw())
        metrics = finite_metrics(metrics)
        self.steps += 1
        self._last_metrics = metrics
        record(metrics)
        self._watch(metrics)
        if loop.guard.last_fault:
            self.log(f"step {self.steps}: batch skipped, no update: {loop.guard.last_fault}")
        loop.guard.check(self.steps)  # NonFiniteError after max_bad_batches skipped in a row
        return metrics

    def _watch(self, metrics: dict) -> None:
        """Warnings when recent steps show a run that cannot learn, and the progress bar (or a plain line)."""
        self._history = [*self._history, metrics][-diagnostics.WINDOW:]
        for warning in diagnostics.fresh_warnings(self._history, self.cfg.model_dump(), self._warned):
            self.log(f"warning: {warning}")
        if self._progress is not None:
            self._progress.update(reward=metrics["reward/mean"], acc=metrics["reward/accuracy"],
                                  kl=metrics.get("losses/kl", 0.0), len=metrics["charts/response_tokens"])
        else:
            self.log(progress_line(self.steps, self.cfg.algorithm.steps, metrics))

    def train(self, steps: int, step: Callable[[], dict], save_checkpoint: Callable[[], object],
              evaluate: Callable[[], object]) -> tuple[list, int | None]:
        """``steps`` calls of ``step``, a checkpoint every ``save_every`` steps and an ``evaluate`` every
        ``eval.every`` (neither after the run's last step: the caller saves and evaluates then); returns their
        metrics and the step the audit alarm stopped RL at (or None)."""
        self.plan_end = self.steps + steps
        history: list[dict] = []

        def line(done: int, total: int, figures: dict) -> str:  # plain-log progress: the usual step line
            return progress_line(self.steps, self.cfg.algorithm.steps, self._last_metrics)

        self._progress = Progress(steps, "RL", "step", self.log, line=line)
        try:
            for i in range(1, steps + 1):
                history.append(step())
                if stop := audit_stop(history[-1], self.cfg.reward):  # the reward-hacking alarm
                    self.log(stop)
                    return history, self.steps
                if self.cfg.save_every and self.steps % self.cfg.save_every == 0 and i < steps:
                    save_checkpoint()
                every = self.cfg.eval.every
                if every and self.steps % every == 0 and self.steps < self.cfg.algorithm.steps:
                    evaluate()
        finally:
            self._progress.close()
            self._progress = None
        return history, None
