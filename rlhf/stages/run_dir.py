"""The pieces of a run before its actors start: the run directory, the prompts, the student and its tokenizer.

``rlhf.api.Trainer`` holds one run's state and calls these stage by stage (``rlhf.api.run`` is the pipeline);
the RL step itself is rlhf/rl/step.py, over the actors rlhf/rl/launch.py starts.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import yaml

from rlhf.core.data.chat import template_override
from rlhf.core.config.run_config import ConfigError, ModelConfig, RunConfig
from rlhf.core.checkpoints.atomic import output_dir_problem
from rlhf.core.data.datasets import DatasetError, PromptRow, load_rows, usable_rows
from rlhf.core.models.build import (build_student, build_tokenizer, check_model_dir, load_student, resolve_model_path,
                                    save_student)
from rlhf.core.models.build import load_tokenizer as load_model_tokenizer
from rlhf.core.checkpoints.atomic import atomic_dir
from rlhf.core.checkpoints.resume import complete_checkpoints
from rlhf.outputs.metrics import STAGE_METRICS
from rlhf.outputs.samples import SAMPLES_DIR
from reward.model.preference_data import check_preference_file

# The model keys that build a student; a student loaded from model.model_name_or_path has its own.
BUILD_KEYS = tuple(name for name in ModelConfig.model_fields if name not in ("model_name_or_path", "lora"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


class RunDirError(ValueError):
    """An output_dir that cannot take this run (it holds a finished one, or checkpoints to resume from)."""


def load_prompts(cfg: RunConfig, train_dataset=None, eval_dataset=None, tokenizer=None, log=print,
                 stats: dict | None = None) -> tuple[list[PromptRow], list[PromptRow]]:
    """(training pool, held-out set), from the Datasets passed in or the configured task, rendered for ``tokenizer``
    (rlhf/core/data/chat.py); ``stats`` gets the counts. Loaded first in a run: a bad dataset row should stop it before
    minutes of warm-up, not after."""
    train_pool, eval_set = load_rows(cfg.task, cfg.seed, train_dataset, eval_dataset, tokenizer, log, stats)
    if len(train_pool) < cfg.rollout.prompts_per_step:
        raise DatasetError(f"only {len(train_pool)} training prompts for rollout.prompts_per_step="
                           f"{cfg.rollout.prompts_per_step}")
    return train_pool, eval_set


def load_tokenizer(cfg: RunConfig):
    """The student's tokenizer (from its directory, or built), carrying ``task.chat_template``'s override so that
    checkpoints and the policy server use the template the prompts were rendered with."""
    path = cfg.model.model_name_or_path
    tokenizer = load_model_tokenizer(check_model_dir(path)) if path else build_tokenizer(cfg.model.tokenizer)
    override = template_override(cfg.task)
    if override is not None:
        tokenizer.chat_template = override
    return tokenizer


def fitting_prompts(cfg: RunConfig, rows: list[PromptRow], tokenizer, max_positions: int, name: str,
                    log=print, at_least: int = 1) -> list[PromptRow]:
    """The rows whose prompt leaves room for the longest response the run generates within the student's
    ``max_positions``; the others are skipped and counted like any bad row (rlhf.data.usable_rows). Fewer than
    ``at_least`` left is a DatasetError."""
    new_tokens = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens,
                     cfg.label.max_new_tokens if "label" in cfg.stages else 0)
    room = max_positions - new_tokens
    if room <= 0:
        raise ConfigError(f"responses of up to {new_tokens} tokens (rollout/eval/label max_new_tokens) leave no room "
                          f"for a prompt in the student's {max_positions} positions")
    lengths = [len(ids) for ids in tokenizer([r.prompt for r in rows], add_special_tokens=False).input_ids]
    problems = [f"prompt {i} has {n} tokens, over the {room} that fit before a {new_tokens}-token response in "
                f"{max_positions} positions ({rows[i].prompt[:40]!r}...)" for i, n in enumerate(lengths) if n > room]
    kept = usable_rows([r for r, n in zip(rows, lengths) if n <= room], problems, name, log)
    if len(kept) < at_least:
        raise DatasetError(f"only {len(kept)} {name} fit for rollout.prompts_per_step={at_least}")
    return kept


def build_policy(cfg: RunConfig, log=print, tokenizer=None) -> tuple:
    """The student and its tokenizer (``tokenizer``, else the directory's or a built one): loaded from a local
    directory, or built at the configured size."""
    if cfg.model.model_name_or_path:
        student, loaded = load_student(cfg.model.model_name_or_path)
        tokenizer = tokenizer or loaded
        if ignored := ignored_model_keys(cfg.model):
            log(f"warning: {', '.join(ignored)} ignored: the student is model.model_name_or_path "
                f"({cfg.model.model_name_or_path}), whose config.json and tokenizer set them")
    else:
        tokenizer = tokenizer or build_tokenizer(cfg.model.tokenizer)
        student = build_student(cfg.model, tokenizer, cfg.seed)
    log(f"student: {type(student).__name__}, {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters")
    return student, tokenizer


class StageTimer:
    """Seconds spent per pipeline stage, for summary.json (where did the run's time go?)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 1)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)


def refuse_finished_run(cfg: RunConfig) -> None:
    out = Path(cfg.output_dir)
    if problem := output_dir_problem(out):
        raise RunDirError(problem)
    if (out / "summary.json").exists():
        raise RunDirError(f"output_dir {out} holds a finished run: choose another output_dir (or delete it)")


def prepare_run_dir(cfg: RunConfig, resume: bool = False) -> Path:
    """Make ``output_dir`` ready once every input is checked (``check_stage_inputs``): a new run starts afresh
    (the metrics and samples of an earlier, unfinished one removed) where no finished run and no checkpoint is;
    ``resume``: keep what is there (the caller resumes from its newest checkpoint). Writes config.yaml."""
    out = Path(cfg.output_dir)
    refuse_finished_run(cfg)
    if not resume and complete_checkpoints(out):
        raise RunDirError(f"output_dir {out} holds checkpoints of an unfinished run: continue it with --resume, or "
                          f"choose another output_dir (or delete it)")
    check_stage_inputs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in ("metrics.jsonl", STAGE_METRICS):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / SAMPLES_DIR, ignore_errors=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_save(cfg), sort_keys=False))
    return out


def check_stage_inputs(cfg: RunConfig) -> None:
    """The files the listed stages read, checked before the run directory is touched: bad input writes nothing."""
    stages = set(cfg.stages)
    traces = cfg.warmup.traces_file
    if stages & {"warmup", "sft"} and traces and not Path(traces).exists():
        raise DatasetError(f"warmup.traces_file {traces} does not exist: run `distilrl traces` first, or fix the "
                           f"path")
    if "train_rm" in stages:
        for key in ("train_file", "eval_file"):
            if path := getattr(cfg.reward_model, key):
                check_preference_file(path, f"reward_model.{key}")


def ignored_model_keys(model: ModelConfig) -> list[str]:
    """``model.<key>=<value>`` for each build key set away from its default while model_name_or_path is set."""
    if not model.model_name_or_path:
        return []
    return [f"model.{key}={getattr(model, key)}" for key in BUILD_KEYS
            if getattr(model, key) != ModelConfig.model_fields[key].default]


def config_to_save(cfg: RunConfig) -> dict:
    """The resolved config as config.yaml shows it: every default filled in, less the build keys a student loaded
    from model_name_or_path ignores (they would say something about the model that is not so)."""
    data = cfg.model_dump()
    if cfg.model.model_name_or_path:
        data["model"] = {k: v for k, v in data["model"].items() if k not in BUILD_KEYS}
    return data


def write_start_dir(cfg: RunConfig, student, tokenizer, out: Path, changed: bool) -> str:
    """The directory every actor loads the starting policy from: ``out/warmup`` with the student written in Hugging
    Face format where a warm-up ``changed`` it or it was built here; else its source (``untrained_start_dir``)."""
    target = out / "warmup"
    if changed or not cfg.model.model_name_or_path:
        save_student(student, tokenizer, str(target))
        return str(target)
    return untrained_start_dir(cfg, tokenizer, target)


def untrained_start_dir(cfg: RunConfig, tokenizer, target: Path) -> str:
    """Where the actors load a student that no warm-up changed: model.model_name_or_path itself, not a copy (a
    LoRA adapter's base path then names it too). Where the tokenizer differs from the source's files (a
    task.chat_template override, a pad token added: checkpoints copy the start directory's tokenizer), ``target``
    holds hard links to the source's files beside the tokenizer as loaded."""
    source = resolve_model_path(cfg.model.model_name_or_path).resolve()  # a hub name: its cached snapshot
    if template_override(cfg.task) is None and _has_pad_token(source):
        return str(source)
    with atomic_dir(target) as tmp:
        for item in source.iterdir():
            if item.is_file() and item.name not in TOKENIZER_FILES:
                _link_or_copy(item, tmp / item.name)
        tokenizer.save_pretrained(tmp)
    return str(target)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy on disk; model loading refuses symbolic links out of a model directory), or a
    copy where the run directory is on another filesystem."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _has_pad_token(model_dir: Path) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).pad_token is not None


def resumed_start_dir(cfg: RunConfig, out: Path) -> str:
    """The starting policy of a run being resumed: its warmup/ when it wrote one, else the source model."""
    written = out / "warmup"
    return str(written) if written.is_dir() or not cfg.model.model_name_or_path else \
        str(resolve_model_path(cfg.model.model_name_or_path).resolve())


class StartingPolicy:
    """The policy every actor starts from: the in-process student until the first actor needs it, then a directory
    written once (``write_start_dir``; no pickled model in flight); after the dpo stage, its policy."""

    def __init__(self, cfg: RunConfig, student, tokenizer, out: Path):
        self.cfg, self.student, self.tokenizer, self.out = cfg, student, tokenizer, out
        self.path = resumed_start_dir(cfg, out)  # set anew where the student is written

    def directory(self, changed: bool = False) -> str:
        """Where the actors load it; ``changed``: a warm-up trained the student in place."""
        if self.student is not None:
            self.path = write_start_dir(self.cfg, self.student, self.tokenizer, self.out, changed)
            self.student = None
        return self.path


def progress_line(step: int, steps: int, m: dict) -> str:
    # A script may run more steps than algorithm.steps plans; "step 5/2" would read like a bug.
    done = f"{step}/{steps}" if step <= steps else f"{step}"
    # A batch skipped for NaN rewards has no reward/mean (metrics.jsonl keeps finite numbers only).
    return (f"step {done}  reward {m.get('reward/mean', float('nan')):.3f}  acc {m['reward/accuracy']:.3f}  "
            f"kl {m.get('losses/kl', 0.0):.4f}  len {m['charts/response_tokens']:.1f}  {m['perf/step_s']:.1f} s")
