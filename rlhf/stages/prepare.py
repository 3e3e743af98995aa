"""What a run checks and loads before it touches its run directory: bad input leaves what is there as it was.

Registries, the reward function, optional model directories, W&B, the checkpoint to resume from, the tokenizer, the
prompts (rendered, too-long ones skipped), the memory plan, and the student; then the run directory is prepared.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from reward.model.seqcls import check_seqcls_dir
from reward.scoring.custom import load_reward_fn
from reward.scoring.worker import RewardFn
from rlhf.core.checkpoints import resume as checkpoints
from rlhf.core.config.run_config import ConfigError, RunConfig
from rlhf.core.data.datasets import PromptRow
from rlhf.core.models.build import check_model_dir
from rlhf.core.data.hub_datasets import local_datasets
from rlhf.core.models.hub import download_models
from rlhf.core.models.memory import check_run_memory
from rlhf.core.models.model_import import student_from_gguf
from rlhf.outputs.metrics import check_wandb
from rlhf.registered import check_registered, fit_partial_rollouts
from rlhf.stages import run_dir


@dataclass
class PreparedRun:
    """A run's inputs, checked and loaded; ``student`` is None on resume (the actors start from output_dir/warmup)."""

    cfg: RunConfig
    reward_fn: RewardFn | None
    checkpoint: checkpoints.Checkpoint | None
    tokenizer: object
    student: object
    train_rows: list[PromptRow]
    eval_rows: list[PromptRow]
    output_dir: Path
    data: dict = field(default_factory=dict)  # prompt counts (and those dropped as too long)


def prepare_run(cfg: RunConfig, reward_fn: RewardFn | None, train_dataset, eval_dataset,
                log: Callable[[str], None], resume: bool) -> PreparedRun:
    check_registered(cfg)
    cfg = fit_partial_rollouts(cfg, log)  # an engine without a decode loop of ours: one-step-off, said here
    reward_fn = check_reward_fn(cfg, reward_fn)
    if cfg.reward.components.get("seqcls"):
        check_seqcls_dir(cfg.reward.seqcls_path)
    check_wandb(cfg)
    download_models({"model.model_name_or_path": cfg.model.model_name_or_path,
                     "reward_model.path": cfg.reward_model.path}, cfg.hub.offline, log)  # only where allowed
    cfg = student_from_gguf(cfg, log)  # a .gguf student, imported once: every actor loads a HF directory
    cfg = local_datasets(cfg, log)  # prompt datasets given by Hub id: their downloaded copies
    run_dir.refuse_finished_run(cfg)
    checkpoint = checkpoint_to_resume(cfg, log) if resume else None
    tokenizer = run_dir.load_tokenizer(cfg)
    data: dict = {}
    train_rows, eval_rows = run_dir.load_prompts(cfg, train_dataset, eval_dataset, tokenizer, log, data)
    if "rl" in cfg.stages:  # the RL batch figures mean nothing to a run without RL
        log(cfg.describe_batches())
    log(check_run_memory(cfg, tokenizer, [row.prompt for row in train_rows]))  # refuses a run that cannot fit
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    student, tokenizer = run_dir.build_policy(cfg, log, tokenizer)
    positions = student.config.max_position_embeddings
    train_rows = run_dir.fitting_prompts(cfg, train_rows, tokenizer, positions, "training prompts", log,
                                         at_least=cfg.rollout.prompts_per_step)
    eval_rows = run_dir.fitting_prompts(cfg, eval_rows, tokenizer, positions, "held-out prompts", log)
    if cfg.reward_model.path:
        check_model_dir(cfg.reward_model.path, "reward_model.path", "ForSequenceClassification")
    output_dir = run_dir.prepare_run_dir(cfg, resume=checkpoint is not None)
    if checkpoint is not None:
        # The actors start from the run's own starting policy (output_dir/warmup), then take the checkpoint's
        # state; the student built above only checked the model settings. The tokenizer stays the one built
        # here: the same object as the first run's, so lengths count alike.
        student = None
    return PreparedRun(cfg, reward_fn, checkpoint, tokenizer, student, train_rows, eval_rows, output_dir, data)


def checkpoint_to_resume(cfg: RunConfig, log) -> checkpoints.Checkpoint | None:
    """The newest complete checkpoint in output_dir, once the config is checked against its own."""
    checkpoint = checkpoints.newest_usable_checkpoint(cfg.output_dir, log)  # damaged: the one before
    if checkpoint is None:
        log(f"no complete checkpoint in {cfg.output_dir}: starting the run from the beginning")
        return None
    accepted = checkpoints.check_config(checkpoint.state["config"], cfg.model_dump(), checkpoint.step, cfg.output_dir)
    if not cfg.reward_model.path:  # the RM the run scored with (reward_model.path, when set, is checked as config)
        checkpoint = checkpoints.with_reward_model_dir(checkpoint, cfg.output_dir)
    log(f"resuming {cfg.output_dir} from step {checkpoint.step} ({checkpoint.path}); config changes: "
        f"{'; '.join(accepted) if accepted else 'none'}")
    return checkpoint


def check_reward_fn(cfg: RunConfig, reward_fn) -> RewardFn | None:
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
