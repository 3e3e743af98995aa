"""The Python API: run the pipeline from a script, or drive a run stage by stage and step by step.

    import rlhf

    cfg = rlhf.load_config("configs/tiny.yaml", ["output_dir=runs/mine"])  # or rlhf.RunConfig(...) in code
    result = rlhf.run(cfg)                      # every configured stage, as `distilrl run` does
    print(result.summary["eval_after"], result.policy_dir)

    with rlhf.Trainer(cfg, reward_fn=my_reward, train_dataset=ds) as trainer:   # or one piece at a time
        trainer.warmup()
        trainer.evaluate()
        metrics = trainer.step()
        trainer.save()

The ``distilrl run`` command goes through ``run`` too: scripts and the CLI share one code path.

``Trainer`` (and ``run``) arguments: ``cfg``: the run's config (``load_config`` or ``RunConfig(...)``); the run
directory is ``cfg.output_dir``. ``reward_fn``: ``fn(prompts, responses, rows) -> list[float]``, one reward per
response, the RL reward's ``custom`` component, weighted by ``cfg.reward.components["custom"]`` (beside or instead
of the verifier and the RM). ``rows[i]`` is the source record of ``prompts[i]`` (a dataset row with all its columns;
for the arithmetic task ``prompt``, ``answer``, ``difficulty``). It runs in the reward worker processes (Ray pickles
it with cloudpickle), so changes it makes to the script's objects are not seen; an error in it stops the step with a
``RewardError`` naming the sample. ``train_dataset``, ``eval_dataset``: ``datasets.Dataset``s of prompts (columns
``task.prompt_field``, ``task.answer_field``, optionally ``task.difficulty_field``) used instead of the task's
training or held-out prompts. ``log``: where progress lines go. ``resume``: continue from the newest complete
checkpoint in ``output_dir`` (rlhf/core/checkpoints/resume.py; a config change that matters is refused with a
``ResumeError``), or start afresh where there is none.

``Trainer``'s attributes: ``output_dir``, ``steps`` (RL steps taken), ``reward_model_dir`` (None until there is
one), ``resumed_step`` (the checkpoint's step, or None). Leaving its ``with`` block stops the actors, and Ray if the
Trainer started it, also when an exception ends it; a clean exit also writes ``summary.json`` (a failed run leaves
none, so its directory can be reused). Stages that depend on each other come in pipeline order: ``warmup`` before
anything starts an actor, and ``train_reward_model`` (or ``dpo``) before the first ``evaluate``/``step``/``train``/
``save`` (the reward workers load the RM; the actors start from the dpo stage's policy).

How the work is split: the checks before anything is written (rlhf/stages/prepare.py), the run's actors
(``RunActors``, rlhf/rl/launch.py), the RL schedule (rlhf/rl/schedule.py) and its checkpoints
(rlhf/rl/run_checkpoint.py); the stages themselves live in rlhf/stages/.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from reward.scoring.worker import RewardFn
from rlhf.core.checkpoints import resume as checkpoints
from rlhf.core.checkpoints.atomic import write_json_atomic
from rlhf.core.config.run_config import RunConfig
from rlhf.outputs.metrics import RunMetrics, eval_scalars
from rlhf.rl.evaluate import curve_point
from rlhf.outputs.provenance import reward_model_record
from rlhf.outputs.report import write_report
from rlhf.outputs.samples import SAMPLES_DIR
from rlhf.rl.launch import RunActors
from rlhf.rl.run_checkpoint import restore_actors, restore_driver, write_checkpoint
from rlhf.rl.schedule import RLSchedule
from rlhf.rl.step import RLStep
from rlhf.stages import reward_model as rm_stages, run_dir, sft
from rlhf.stages.dpo import dpo_stage
from rlhf.stages.prepare import prepare_run
from rlhf.stages.warmup import warmup_stage

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass(frozen=True)
class RunResult:
    """What ``run`` returns: the summary (as written to ``summary.json``) and where the run's files are."""

    summary: dict
    output_dir: Path
    policy_dir: Path | None  # the final policy, Hugging Face format; None when no RL step ran
    reward_model_dir: Path | None  # the distilled RM trained (or reward_model.path); None without one


def run(cfg: RunConfig, reward_fn: RewardFn | None = None, train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None, log: Callable[[str], None] = print, resume: bool = False) -> RunResult:
    """Run the stages ``cfg.stages`` lists, in pipeline order: warm-up, labelling, reward-model training, evaluation
    before RL, RL (``algorithm.steps`` steps), evaluation after, the final policy. The arguments are ``Trainer``'s.

    ``resume``: continue the run in ``cfg.output_dir`` from its newest complete checkpoint (the stages before RL
    are done then); a finished run there is reported and returned as it is, without training."""
    out = Path(cfg.output_dir)
    if resume and (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        log(f"{out} holds a finished run ({summary.get('steps', 0)} RL steps): nothing to resume")
        rm_dir = Path(cfg.reward_model.path) if cfg.reward_model.path else out / "reward_model"
        return RunResult(summary, out, out / "policy" if (out / "policy").is_dir() else None,
                         rm_dir if rm_dir.is_dir() else None)
    with Trainer(cfg, reward_fn, train_dataset, eval_dataset, log, resume=resume) as trainer:
        before_rl = trainer.resumed_step is None  # a checkpoint comes after every stage before RL
        if "traces" in cfg.stages and before_rl:
            trainer.traces()
        if ("warmup" in cfg.stages or "sft" in cfg.stages) and before_rl:
            trainer.warmup()
        if "label" in cfg.stages and before_rl:
            trainer.label()
        if "train_rm" in cfg.stages and before_rl:
            trainer.train_reward_model()
        if "dpo" in cfg.stages and before_rl:
            trainer.dpo()
        if "eval" in cfg.stages and before_rl and "rl" in cfg.stages:  # without RL: one evaluation, at the end
            trainer.evaluate()
        if "rl" in cfg.stages:
            trainer.train()
        if "eval" in cfg.stages:
            trainer.evaluate()
        policy_dir = trainer.save() if trainer.steps else None
    return RunResult(trainer.summary, trainer.output_dir, policy_dir, trainer.reward_model_dir)


class Trainer:
    """One run, driven from Python, with its Ray actors; use it as a context manager. Its arguments, attributes and
    the order its stages come in are described in this module's docstring."""

    def __init__(self, cfg: RunConfig, reward_fn: RewardFn | None = None, train_dataset: Dataset | None = None,
                 eval_dataset: Dataset | None = None, log: Callable[[str], None] = print, resume: bool = False):
        self._start = time.perf_counter()
        run = prepare_run(cfg, reward_fn, train_dataset, eval_dataset, log, resume)
        self.cfg, self.log, cfg = run.cfg, log, run.cfg
        self._reward_fn, self._tokenizer = run.reward_fn, run.tokenizer
        self._train_dataset = train_dataset  # the traces stage writes for these prompts (raw, not rendered)
        self._train_rows, self._eval_rows = run.train_rows, run.eval_rows
        self.output_dir: Path = run.output_dir
        self.resumed_step: int | None = run.checkpoint.step if run.checkpoint else None
        self._summary: dict = {"data": run.data}  # prompt counts, then each stage's figures
        self._schedule = RLSchedule(cfg, self._train_rows, log)  # steps taken, prompt order, launched rollouts
        self.reward_model_dir: Path | None = Path(cfg.reward_model.path) if cfg.reward_model.path else None
        self._starting = run_dir.StartingPolicy(cfg, run.student, run.tokenizer, self.output_dir)
        self._timer = run_dir.StageTimer()
        self._restore: checkpoints.Checkpoint | None = None  # a checkpoint whose actor state is still to load
        if run.checkpoint is not None:
            self._resume_driver(run.checkpoint)  # before metrics.jsonl is opened: it cuts the file to the checkpoint
        self.metrics = RunMetrics(self.output_dir, cfg)  # metrics.jsonl, TensorBoard, W&B
        self._actors = RunActors(cfg, self._starting.directory)
        self._closed = False
        self._wall_s: float | None = None

    @property
    def steps(self) -> int:
        """RL steps taken."""
        return self._schedule.steps

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._actors.stop()
            self.metrics.close()
            self._closed = True

    def warmup(self) -> dict:
        """Supervised distillation of the teacher's solutions into the student (``cfg.warmup``); returns its
        figures. Runs in this process, before any actor starts: they all start from the warmed-up student, written
        to ``output_dir/warmup`` at the end (a warm-up-only run leaves it there, e.g. as a teacher). On a traces
        dataset (``warmup.traces_file`` or the traces stage's output) this is the SFT of rlhf/stages/sft.py."""
        if self._starting.student is None:
            raise RuntimeError("warmup() must come before label(), train_reward_model(), evaluate(), step(), "
                               "train() and save(): the actors start from the warmed-up student")
        with self._timer("warmup"):
            figures, on_traces = warmup_stage(self._starting.student, self._tokenizer, self.cfg, self.output_dir,
                                              self._train_dataset is not None, self.log, self.metrics.log)
        self._summary["warmup"] = figures
        student_dir = self._starting.directory(changed=True)  # plain Hugging Face format
        if on_traces:  # SFT on a traces dataset names where the student went
            figures["student_dir"] = student_dir
        return self._summary["warmup"]

    def traces(self) -> dict:
        """Teacher traces on the training prompts, graded and selected per CD bin (``cfg.traces``), written to
        ``output_dir/traces`` (a ``datasets`` dataset and summary.json); ``warmup()`` then trains on them."""
        with self._timer("traces"):
            self._summary["traces"] = sft.traces_stage(self.cfg, self.output_dir, self.log, self._train_dataset)
        return self._summary["traces"]

    def label(self) -> dict:
        """The teacher judges student samples (``cfg.label``), written to ``output_dir/labels``; returns the
        counts. Labelling resumes where an earlier, unfinished run in this output_dir stopped."""
        with self._timer("label"):
            self._summary["labels"] = rm_stages.label_stage(self.cfg, self._actors.rollout_workers(), self._train_rows,
                                                          self._eval_rows, self.output_dir, self.log)
        return self._summary["labels"]

    def train_reward_model(self, labels_dir: str | Path | None = None) -> dict:
        """Train the distilled RM on the labels (``labels_dir``, by default ``output_dir/labels``; or take
        ``reward_model.path``) and score it against the teacher on held-out labels; returns those figures. RL's
        ``rm`` reward component then uses this RM."""
        if self._actors.loop is not None:
            raise RuntimeError("train_reward_model() must come before evaluate(), step(), train() and save(): the "
                               "reward workers load the reward model when they start")
        with self._timer("train_rm"):
            self._actors.start_ray()  # the RM's DeepSpeed ranks are Ray actors
            rm_dir, self._summary["reward_model"] = rm_stages.reward_model_stage(
                self.cfg, self._starting.directory(), self.output_dir, self.log, labels_dir, self.metrics.log)
        self.reward_model_dir = Path(rm_dir)
        return self._summary["reward_model"]

    def dpo(self) -> dict:
        """Preference optimisation of the starting student on pairs (``cfg.dpo``: the teacher's from labels/, your
        own from ``dpo.train_file``), on DeepSpeed ranks; returns its figures. The policy goes to ``output_dir/dpo``
        and the stages after it (evaluate, step, train, save) start from it."""
        if self._actors.loop is not None:
            raise RuntimeError("dpo() must come before evaluate(), step(), train() and save(): their actors start "
                               "from its policy")
        with self._timer("dpo"):
            self._actors.start_ray()  # the preference trainer's DeepSpeed ranks are Ray actors
            self._starting.path, self._summary["dpo"] = dpo_stage(self.cfg, self._starting.directory(),
                                                                  self.output_dir, self.log, self.metrics.log)
        self._actors.stop_rollout_workers()  # started from the student for labelling: restarted from the new policy
        return self._summary["dpo"]

    def evaluate(self) -> dict:
        """Greedy answers to the held-out prompts, checked by the verifier: ``accuracy``, ``mean_response_tokens``,
        ``n`` and ``by_difficulty`` where the prompts have a difficulty. Recorded in the summary as ``eval_before``
        (the first evaluation before any RL step) or ``eval_after`` (any later one, or a run's without RL)."""
        figures, when = self._held_out(), _evaluation_when(self.cfg, self.steps, self._summary)
        self._summary[f"eval_{when}"] = figures
        self.log(f"eval{f' {when} RL' if 'rl' in self.cfg.stages else ''}: accuracy {figures['accuracy']:.3f}")
        return figures

    def _held_out(self, curve: bool = False) -> dict:
        """Held-out figures, logged as eval/*; ``curve``: a point of the summary's eval_curve (``eval.every``)."""
        with self._timer("eval"):
            figures = self._rl_loop().evaluate(self._eval_rows, self.log)
        self.metrics.log(eval_scalars(figures), self.steps)
        if curve:
            self._summary.setdefault("eval_curve", []).append(curve_point(self.steps, figures))
            self.log(f"eval at step {self.steps}: accuracy {figures['accuracy']:.3f}")
        return figures

    def step(self) -> dict:
        """One RL step on ``rollout.prompts_per_step`` prompts from the training pool; returns its metrics
        (``reward/*``, ``losses/*``, ``perf/*``, ``charts/*``), also appended to ``metrics.jsonl``."""
        loop = self._rl_loop()
        start = time.perf_counter()
        metrics = self._schedule.step(loop, self.metrics.rl_step)
        self._timer.add("rl", time.perf_counter() - start)
        return metrics

    def train(self, steps: int | None = None) -> list[dict]:
        """The RL stage: ``steps`` RL steps (default: those left to ``algorithm.steps``), a checkpoint every
        ``save_every`` steps (``save_checkpoint``), a held-out point every ``eval.every``; returns their metrics."""
        steps = max(self.cfg.algorithm.steps - self.steps, 0) if steps is None else steps
        history, stopped = self._schedule.train(steps, self.step, self.save_checkpoint, lambda: self._held_out(True))
        self._summary.update({"audit_stopped_at": stopped} if stopped is not None else {})
        return history

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoints/step_N`` (policy, trainer ranks' optimizer state, RNG states, batches in
        flight, the driver's state; rlhf/rl/run_checkpoint.py), so that ``distilrl run CONFIG --resume`` continues
        exactly. Atomic: a run killed while writing leaves no ``step_N``. Keeps the newest ``keep_checkpoints``;
        returns the path."""
        path = write_checkpoint(self.output_dir, self._rl_loop(), self._schedule, {
            "summary": self._summary,
            "stage_s": dict(self._timer.seconds),
            "elapsed_s": time.perf_counter() - self._start,
            "reward_model_dir": checkpoints.stored_path(self.reward_model_dir, self.output_dir),
            "config": self.cfg.model_dump(),
        }, self.cfg.keep_checkpoints)
        self.log(f"checkpoint step {self.steps}: {path}")
        return path

    def save(self, path: str | Path | None = None) -> Path:
        """Write the current policy in Hugging Face format (safetensors, with its tokenizer) to ``path``, by
        default ``output_dir/policy``; returns the path."""
        path = Path(path) if path is not None else self.output_dir / "policy"
        self._rl_loop().policy.save_pretrained(str(path))
        return path

    @property
    def summary(self) -> dict:
        """The run's figures so far, as ``summary.json`` holds them at the end: ``warmup``, ``labels``,
        ``reward_model``, ``eval_before``, ``eval_after`` (those that ran), ``steps``, ``stage_s``, ``wall_s``."""
        wall_s = self._wall_s if self._wall_s is not None else round(time.perf_counter() - self._start, 1)
        return {**self._summary, "steps": self.steps, "stage_s": dict(self._timer.seconds), "wall_s": wall_s}

    def close(self) -> None:
        """Stop the actors (and Ray, if this Trainer started it) and write ``summary.json``. Leaving the ``with``
        block calls it; calling it twice does nothing more."""
        if self._closed:
            return
        self._actors.stop()
        self._closed = True
        self._wall_s = round(time.perf_counter() - self._start, 1)
        self.metrics.log({f"perf/stage_{stage}_s": s for stage, s in self._timer.seconds.items()}, self.steps)
        _write_run_end(self.output_dir, self.summary, self.metrics, self.log)

    def _rl_loop(self) -> RLStep:
        """The RL step over the run's actors, started on first use (and given a checkpoint's state on resume)."""
        if self._actors.loop is None:
            loop = self._actors.start_loop(self._tokenizer, self.reward_model_dir, self._reward_fn)
            loop.samples_dir = self.output_dir / SAMPLES_DIR  # each step's samples; the report names the RM used
            self._summary.update(reward_model_record(self.cfg, self.reward_model_dir))
            if self._restore is not None:
                checkpoint, self._restore = self._restore, None
                restore_actors(checkpoint, loop)
            self._schedule.start(loop)
        return self._actors.loop

    def _resume_driver(self, checkpoint: checkpoints.Checkpoint) -> None:
        """The driver's side of a checkpoint, now; the actors' side when they start (``_rl_loop``)."""
        state = restore_driver(checkpoint, self._schedule, self.output_dir / "metrics.jsonl", self.log)
        self._summary = state["summary"]
        self._timer.seconds = dict(state["stage_s"])
        self._start -= state["elapsed_s"]
        if checkpoint.reward_model_dir and not self.cfg.reward_model.path:  # resolved and checked by prepare_run
            self.reward_model_dir = checkpoint.reward_model_dir
        self._restore = checkpoint


def _evaluation_when(cfg: RunConfig, steps: int, summary: dict) -> str:
    """"before": the first evaluation of a run with stage rl, before any RL step; "after": any other."""
    return "before" if "rl" in cfg.stages and steps == 0 and "eval_before" not in summary else "after"


def _write_run_end(output_dir: Path, summary: dict, metrics: RunMetrics, log) -> None:
    """summary.json, the metrics files closed, and the report (whose failure must not hide the results on disk)."""
    write_json_atomic(output_dir / "summary.json", summary)
    metrics.close()
    log(f"wrote {output_dir / 'summary.json'} ({summary['wall_s']:.0f} s)")
    try:
        log(f"wrote {write_report(output_dir)}")
    except Exception as err:  # noqa: BLE001 - the run's results are on disk; a plotting failure must not hide it
        log(f"the run report failed ({type(err).__name__}: {err}); try again with: distilrl report {output_dir}")
