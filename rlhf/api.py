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
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import ray
import torch

from rlhf.stages import reward_model as distill
from reward.scoring.custom import load_reward_fn
from reward.model.seqcls import check_seqcls_dir
from reward.scoring.worker import RewardFn
from rlhf.rl import launch as actors
from rlhf.stages import curriculum, run_dir as driver, sft
from rlhf.outputs import diagnostics
from rlhf.core.checkpoints import resume as checkpoints
from rlhf.core.checkpoints.atomic import atomic_dir, write_json_atomic
from rlhf.core.config.run_config import ConfigError, RunConfig
from rlhf.core.guards import finite_metrics
from rlhf.core.models.memory import check_run_memory
from rlhf.core.models.model_import import student_from_gguf
from rlhf.outputs.metrics import RunMetrics, check_wandb, eval_scalars
from rlhf.core.models.build import check_model_dir, save_student
from rlhf.rl.prefetch import RolloutPipeline
from rlhf.registered import check_registered
from rlhf.rl.step import RLLoop
from rlhf.core.progress import Progress
from rlhf.outputs.report import write_report
from rlhf.stages.warmup import run_warmup

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
        if "eval" in cfg.stages and before_rl:
            trainer.evaluate()
        if "rl" in cfg.stages:
            trainer.train()
        if "eval" in cfg.stages:
            trainer.evaluate()
        policy_dir = trainer.save() if trainer.steps else None
    return RunResult(trainer.summary, trainer.output_dir, policy_dir, trainer.reward_model_dir)


class Trainer:
    """One run, driven from Python, with its Ray actors; use it as a context manager.

    ``cfg``: the run's config (``load_config`` or ``RunConfig(...)``); the run directory is ``cfg.output_dir``.
    ``reward_fn``: ``fn(prompts, responses, rows) -> list[float]``, one reward per response, the RL reward's
    ``custom`` component, weighted by ``cfg.reward.components["custom"]`` (beside or instead of the verifier and
    the RM). ``rows[i]`` is the source record of ``prompts[i]`` (a dataset row with all its columns; for the
    arithmetic task ``prompt``, ``answer``, ``difficulty``). It runs in the reward worker processes (Ray pickles it
    with cloudpickle), so changes it makes to the script's objects are not seen; an error in it stops the step
    with a ``RewardError`` naming the sample. ``train_dataset``, ``eval_dataset``: ``datasets.Dataset``s of
    prompts (columns ``task.prompt_field``, ``task.answer_field``, optionally ``task.difficulty_field``) used
    instead of the task's training or held-out prompts. ``log``: where progress lines go. ``resume``: continue
    from the newest complete checkpoint in ``output_dir`` (see rlhf/core/checkpoints/resume.py; a config change that matters is
    refused with a ``ResumeError``), or start afresh where there is none. Attributes: ``output_dir``, ``steps``
    (RL steps taken), ``reward_model_dir`` (None until there is one), ``resumed_step`` (the checkpoint's step, or
    None).

    Leaving the ``with`` block stops the actors, and Ray if this Trainer started it, also when an exception ends
    it; a clean exit also writes ``summary.json`` (a failed run leaves none, so its directory can be reused).
    Stages that depend on each other come in pipeline order: ``warmup`` before anything starts an actor, and
    ``train_reward_model`` before the first ``evaluate``/``step``/``train``/``save`` (the reward workers load the RM).
    """

    def __init__(self, cfg: RunConfig, reward_fn: RewardFn | None = None, train_dataset: Dataset | None = None,
                 eval_dataset: Dataset | None = None, log: Callable[[str], None] = print, resume: bool = False):
        check_registered(cfg)
        reward_fn = _check_reward_fn(cfg, reward_fn)
        if cfg.reward.components.get("seqcls"):
            check_seqcls_dir(cfg.reward.seqcls_path)
        check_wandb(cfg)
        cfg = student_from_gguf(cfg, log)  # a .gguf student, imported once: every actor loads a HF directory
        self.cfg, self.log = cfg, log
        self._reward_fn = reward_fn
        self._train_dataset = train_dataset  # the traces stage writes for these prompts (raw, not rendered)
        self._start = time.perf_counter()
        # Every input is checked before the run directory is touched: bad input leaves what is there as it was.
        driver.refuse_finished_run(cfg)
        checkpoint = self._checkpoint_to_resume(cfg) if resume else None
        self.resumed_step: int | None = checkpoint.step if checkpoint else None
        tokenizer = driver.load_tokenizer(cfg)
        self._summary: dict = {"data": {}}  # prompt counts (and those dropped as too long), then each stage's figures
        train_rows, eval_rows = driver.load_prompts(cfg, train_dataset, eval_dataset, tokenizer, log,
                                                    self._summary["data"])
        log(cfg.describe_batches())
        log(check_run_memory(cfg, tokenizer, [row.prompt for row in train_rows]))  # refuses a run that cannot fit
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self._student, self._tokenizer = driver.build_policy(cfg, log, tokenizer)
        positions = self._student.config.max_position_embeddings
        self._train_rows = driver.fitting_prompts(cfg, train_rows, self._tokenizer, positions, "training prompts", log,
                                                  at_least=cfg.rollout.prompts_per_step)
        self._eval_rows = driver.fitting_prompts(cfg, eval_rows, self._tokenizer, positions, "held-out prompts", log)
        if cfg.reward_model.path:
            check_model_dir(cfg.reward_model.path, "reward_model.path", "ForSequenceClassification")
        self.output_dir: Path = driver.prepare_run_dir(cfg, resume=checkpoint is not None)
        if checkpoint is not None:
            # The actors start from the run's own starting policy (output_dir/warmup), then take the checkpoint's
            # state; the student built above only checked the model settings. The tokenizer stays the one built
            # here: the same object as the first run's, so lengths count alike.
            self._student = None
        self._rl_progress: Progress | None = None  # the RL stage's progress bar, while train() runs
        self._last_metrics: dict = {}
        self._history: list[dict] = []  # recent steps' metrics, for the signs of a run that cannot learn
        self._warned: set[str] = set()  # those signs said on the console while they last
        self._order = random.Random(cfg.seed + 3)  # which prompts each RL step takes
        self.reward_model_dir: Path | None = Path(cfg.reward_model.path) if cfg.reward_model.path else None
        self.steps = 0  # RL steps taken
        self._timer = driver.StageTimer()
        self._restore: checkpoints.Checkpoint | None = None  # a checkpoint whose actor state is still to load
        if checkpoint is not None:
            self._resume_driver(checkpoint)  # before metrics.jsonl is opened: it cuts the file to the checkpoint
        self.metrics = RunMetrics(self.output_dir, cfg)  # metrics.jsonl, TensorBoard, W&B
        self._rollout: actors.WorkerPool | None = None
        self._loop: RLLoop | None = None
        self._rollouts: RolloutPipeline | None = None  # generations launched ahead (asynchronous rollout)
        self._plan_end = cfg.algorithm.steps  # launch nothing ahead for steps beyond this one (see rlhf.rl.prefetch)
        self._owns_ray = False
        self._closed = False
        self._wall_s: float | None = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop_actors()
            self.metrics.close()
            self._closed = True

    # --------------------------------------------------------------------------------------------------- stages

    def warmup(self) -> dict:
        """Supervised distillation of the teacher's solutions into the student (``cfg.warmup``); returns its
        figures. Runs in this process, before any actor starts: they all start from the warmed-up student, written
        to ``output_dir/warmup`` at the end (a warm-up-only run leaves it there, e.g. as a teacher). On a traces
        dataset (``warmup.traces_file`` or the traces stage's output) this is the SFT of rlhf/stages/sft.py."""
        if self._student is None:
            raise RuntimeError("warmup() must come before label(), train_reward_model(), evaluate(), step(), "
                               "train() and save(): the actors start from the warmed-up student")
        traces = sft.traces_path(self.cfg, self.output_dir, self._train_dataset is not None, self.log)
        if traces is not None:  # distillation SFT on a traces dataset (rlhf/stages/sft.py)
            with self._timer("warmup"):
                self._summary["warmup"] = sft.run_sft(self._student, self._tokenizer, self.cfg, traces, self.log,
                                                      self.metrics.log)
            self._summary["warmup"]["student_dir"] = self._start_dir()  # plain Hugging Face format
            return self._summary["warmup"]
        with self._timer("warmup"):
            adaptive = self.cfg.reward.adaptive  # a matched curriculum aims at the adaptive reward's RV targets
            self._summary["warmup"] = run_warmup(
                self._student, self._tokenizer, self.cfg.warmup, self.cfg.seed, self.log, self.cfg.think,
                curriculum.target_fn("matched", adaptive.rv_at_cd0, adaptive.rv_at_cd9), self.metrics.log)
            self._start_dir()
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
            self._summary["labels"] = distill.label_stage(self.cfg, self._rollout_workers(), self._train_rows,
                                                          self._eval_rows, self.output_dir, self.log)
        return self._summary["labels"]

    def train_reward_model(self, labels_dir: str | Path | None = None) -> dict:
        """Train the distilled RM on the labels (``labels_dir``, by default ``output_dir/labels``; or take
        ``reward_model.path``) and score it against the teacher on held-out labels; returns those figures. RL's
        ``rm`` reward component then uses this RM."""
        if self._loop is not None:
            raise RuntimeError("train_reward_model() must come before evaluate(), step(), train() and save(): the "
                               "reward workers load the reward model when they start")
        with self._timer("train_rm"):
            self._start_ray()  # the RM's DeepSpeed ranks are Ray actors
            rm_dir, self._summary["reward_model"] = distill.reward_model_stage(
                self.cfg, self._start_dir(), self.output_dir, self.log, labels_dir, self.metrics.log)
        self.reward_model_dir = Path(rm_dir)
        return self._summary["reward_model"]

    def evaluate(self) -> dict:
        """Greedy answers to the held-out prompts, checked by the verifier: ``accuracy``, ``mean_response_tokens``,
        ``n`` and ``by_difficulty`` where the prompts have a difficulty. Recorded in the summary as ``eval_before``
        (the first evaluation before any RL step) or ``eval_after`` (any later one; the latest counts)."""
        loop = self._rl_loop()
        with self._timer("eval"):
            figures = loop.evaluate(self._eval_rows, self.log)
        when = "before" if self.steps == 0 and "eval_before" not in self._summary else "after"
        self._summary[f"eval_{when}"] = figures
        self.metrics.log(eval_scalars(figures), self.steps)
        self.log(f"eval {when} RL: accuracy {figures['accuracy']:.3f}")
        return figures

    def step(self) -> dict:
        """One RL step on ``rollout.prompts_per_step`` prompts from the training pool; returns its metrics
        (``reward/*``, ``losses/*``, ``perf/*``, ``charts/*``), also appended to ``metrics.jsonl``."""
        loop = self._rl_loop()
        start = time.perf_counter()
        if self.cfg.rollout.asynchronous:
            # This batch was launched while the previous one trained (rlhf/rl/prefetch.py).
            launched = self._rollouts.next(remaining=self._plan_end - self.steps - 1)
            metrics = loop.step(self.steps + 1, launched.rows, launched)
        else:
            # Generated now, through the rollout worker pool: a worker that dies mid-call is restarted and its part
            # re-issued (launched calls bypass the pool, so asynchronous rollout stops on a dead worker instead).
            rows = self._order.sample(self._train_rows, self.cfg.rollout.prompts_per_step)
            metrics = loop.step(self.steps + 1, rows)
        metrics = finite_metrics(metrics)
        self.steps += 1
        self._last_metrics = metrics
        self.metrics.rl_step(metrics)
        self._history = [*self._history, metrics][-diagnostics.WINDOW:]
        for warning in diagnostics.fresh_warnings(self._history, self.cfg.model_dump(), self._warned):
            self.log(f"warning: {warning}")
        if self._rl_progress is not None:
            self._rl_progress.update(reward=metrics["reward/mean"], acc=metrics["reward/accuracy"],
                                     kl=metrics.get("losses/kl", 0.0), len=metrics["charts/response_tokens"])
        else:
            self.log(driver.progress_line(self.steps, self.cfg.algorithm.steps, metrics))
        self._timer.add("rl", time.perf_counter() - start)
        if loop.guard.last_fault:
            self.log(f"step {self.steps}: batch skipped, no update: {loop.guard.last_fault}")
        loop.guard.check(self.steps)  # NonFiniteError after max_bad_batches skipped in a row
        return metrics

    def train(self, steps: int | None = None) -> list[dict]:
        """The RL stage: ``steps`` RL steps (default: those left to ``algorithm.steps``), with a checkpoint in
        ``output_dir/checkpoints/step_N`` every ``save_every`` steps (see ``save_checkpoint``); returns their
        metrics."""
        steps = max(self.cfg.algorithm.steps - self.steps, 0) if steps is None else steps
        self._plan_end = self.steps + steps
        history: list[dict] = []

        def line(done: int, total: int, figures: dict) -> str:  # plain-log progress: the usual step line
            return driver.progress_line(self.steps, self.cfg.algorithm.steps, self._last_metrics)

        self._rl_progress = Progress(steps, "RL", "step", self.log, line=line)
        try:
            for i in range(1, steps + 1):
                history.append(self.step())
                if stop := distill.audit_stop(history[-1], self.cfg.reward):  # the reward-hacking alarm
                    self.log(stop)
                    self._summary["audit_stopped_at"] = self.steps
                    break
                if self.cfg.save_every and self.steps % self.cfg.save_every == 0 and i < steps:
                    self.save_checkpoint()
        finally:
            self._rl_progress.close()
            self._rl_progress = None
        return history

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoints/step_N``: the policy (``policy/``, Hugging Face format), every trainer
        rank's optimizer state, the RNG states of the driver and the rollout workers, and the driver's state, so
        that ``distilrl run CONFIG --resume`` continues exactly. Atomic: a run killed while writing leaves no
        ``step_N``. Keeps the newest ``keep_checkpoints``; returns the path."""
        loop = self._rl_loop()
        path = checkpoints.checkpoint_dir(self.output_dir, self.steps)
        with atomic_dir(path) as tmp:
            rollout_rng = loop.save_state(tmp)
            torch.save({"driver": checkpoints.torch_rng_state(), "rollout": rollout_rng}, tmp / checkpoints.RNG_FILE)
            write_json_atomic(tmp / checkpoints.STATE_FILE, {
                "step": self.steps,
                "weights_version": loop.version,
                "prompt_order": checkpoints.python_rng_state(self._order.getstate()),
                "python_rng": checkpoints.python_rng_state(random.getstate()),
                "guard": loop.guard.state(),
                "summary": self._summary,
                "stage_s": dict(self._timer.seconds),
                "elapsed_s": time.perf_counter() - self._start,
                "reward_model_dir": str(self.reward_model_dir) if self.reward_model_dir else None,
                "config": self.cfg.model_dump(),
            })
        checkpoints.prune_checkpoints(self.output_dir, self.cfg.keep_checkpoints)
        self.log(f"checkpoint step {self.steps}: {path}")
        return path

    def save(self, path: str | Path | None = None) -> Path:
        """Write the current policy in Hugging Face format (safetensors, with its tokenizer) to ``path``, by
        default ``output_dir/policy``; returns the path."""
        path = Path(path) if path is not None else self.output_dir / "policy"
        self._rl_loop().trainer.save_pretrained(str(path))
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
        self._stop_actors()
        self._closed = True
        self._wall_s = round(time.perf_counter() - self._start, 1)
        write_json_atomic(self.output_dir / "summary.json", self.summary)
        self.metrics.log({f"perf/stage_{stage}_s": s for stage, s in self._timer.seconds.items()}, self.steps)
        self.metrics.close()
        self.log(f"wrote {self.output_dir / 'summary.json'} ({self._wall_s:.0f} s)")
        try:
            self.log(f"wrote {write_report(self.output_dir)}")
        except Exception as err:  # noqa: BLE001 - the run's results are on disk; a plotting failure must not hide it
            self.log(f"the run report failed ({type(err).__name__}: {err}); try again with: distilrl report "
                     f"{self.output_dir}")

    # ------------------------------------------------------------------------------------- actors, started lazily

    def _start_dir(self) -> str:
        """Every actor loads the starting policy from this directory: one copy on disk, no pickled model in
        flight. Written once, when the first actor needs it; the in-process student is dropped then."""
        start_dir = self.output_dir / "warmup"
        if self._student is not None:
            save_student(self._student, self._tokenizer, str(start_dir))
            self._student = None
        return str(start_dir)

    def _rollout_workers(self) -> list:
        if self._closed:
            raise RuntimeError("this Trainer is closed")
        if not self._rollout:
            start_dir = self._start_dir()
            self._start_ray()
            self._rollout = actors.make_rollout_workers(self.cfg, start_dir)
        return self._rollout

    def _start_ray(self) -> None:
        # A Ray the script started itself is the script's to stop; the one started here is stopped in close().
        self._owns_ray = self._owns_ray or not ray.is_initialized()
        actors.start_ray(self.cfg)

    def _rl_loop(self) -> RLLoop:
        """The trainer ranks and reward workers beside the rollout workers, started on first use."""
        if self._loop is None:
            rollout = self._rollout_workers()
            if self.cfg.reward.components.get("rm") and not (self.reward_model_dir or self.cfg.reward.rm_url):
                raise ConfigError("reward.components uses rm but there is no reward model yet: call "
                                  "train_reward_model() first, or set reward_model.path or reward.rm_url")
            self._loop = loop = actors.build_loop(self.cfg, self._start_dir(), self._tokenizer, rollout,
                                                  str(self.reward_model_dir) if self.reward_model_dir else None,
                                                  self._reward_fn)
            if self._restore is not None:
                checkpoint, self._restore = self._restore, None
                rng = checkpoints.load_rng_file(checkpoint.path / checkpoints.RNG_FILE)
                self._loop.load_state(checkpoint.path, rng["rollout"], checkpoint.state["weights_version"],
                                      checkpoint.state["guard"])
            r = self.cfg.rollout
            if r.asynchronous:  # the synchronous schedule generates each batch in step() instead
                self._rollouts = RolloutPipeline(lambda: loop.launch(self._order.sample(self._train_rows,
                                                                                       r.prompts_per_step)),
                                                 r.max_staleness)
        return self._loop

    # ------------------------------------------------------------------------------------------------- resuming

    def _checkpoint_to_resume(self, cfg: RunConfig) -> checkpoints.Checkpoint | None:
        """The newest complete checkpoint in output_dir, once the config is checked against its own."""
        checkpoint = checkpoints.newest_usable_checkpoint(cfg.output_dir, self.log)  # damaged: the one before
        if checkpoint is None:
            self.log(f"no complete checkpoint in {cfg.output_dir}: starting the run from the beginning")
            return None
        accepted = checkpoints.check_config(checkpoint.state["config"], cfg.model_dump(), checkpoint.step,
                                            cfg.output_dir)
        self.log(f"resuming {cfg.output_dir} from step {checkpoint.step} ({checkpoint.path}); config changes: "
                 f"{'; '.join(accepted) if accepted else 'none'}")
        return checkpoint

    def _resume_driver(self, checkpoint: checkpoints.Checkpoint) -> None:
        """The driver's side of a checkpoint, now; the actors' side when they start (``_rl_loop``)."""
        state = checkpoint.state
        self.steps = checkpoint.step
        self._summary = state["summary"]
        self._timer.seconds = dict(state["stage_s"])
        self._start -= state["elapsed_s"]
        if state["reward_model_dir"] and not self.cfg.reward_model.path:
            self.reward_model_dir = Path(state["reward_model_dir"])
        self._order.setstate(checkpoints.python_rng_tuple(state["prompt_order"]))
        random.setstate(checkpoints.python_rng_tuple(state["python_rng"]))
        checkpoints.set_torch_rng_state(checkpoints.load_rng_file(checkpoint.path / checkpoints.RNG_FILE)["driver"])
        dropped = checkpoints.truncate_metrics(self.output_dir / "metrics.jsonl", checkpoint.step)
        if dropped:
            self.log(f"metrics.jsonl: dropped {dropped} line(s) after step {checkpoint.step}, to be run again")
        self._restore = checkpoint

    def _stop_actors(self) -> None:
        try:
            if self._loop is not None:
                self._loop.shutdown()
            if self._rollout:
                self._rollout.shutdown()
        finally:
            self._loop, self._rollout, self._rollouts = None, None, None
            if self._owns_ray:
                ray.shutdown()
                self._owns_ray = False


def _check_reward_fn(cfg: RunConfig, reward_fn) -> RewardFn | None:
    """A reward function (passed in, or ``reward.custom_fn``) and the custom component's weight come together, or
    neither does; returns the function."""
    weight = cfg.reward.components.get("custom", 0.0)
    if reward_fn is not None and cfg.reward.custom_fn:
        raise ConfigError("reward.custom_fn is set and a reward_fn was passed too: use one of them")
    if cfg.reward.custom_fn:
        reward_fn = load_reward_fn(cfg.reward.custom_fn)
    if reward_fn is None and weight:
        raise ConfigError("reward.components.custom needs a reward function: set reward.custom_fn "
                          "(module.path:function or file.py:function), or pass reward_fn to rlhf.Trainer or rlhf.run")
    if reward_fn is not None and not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable as fn(prompts, responses, rows), not a "
                        f"{type(reward_fn).__name__}")
    if reward_fn is not None and not weight:
        raise ConfigError("reward_fn has no weight: set reward.components.custom, e.g. {'custom': 1.0} to reward "
                          "by it alone or {'verifier': 1.0, 'custom': 0.5} beside the verifier")
    return reward_fn
