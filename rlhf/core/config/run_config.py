"""The run configuration: one typed tree of pydantic models, filled from YAML plus ``dotted.key=value`` overrides.

Every field has a default that runs, so an empty YAML file is a valid (tiny) run. Unknown keys and bad values are
refused with a ``ConfigError`` whose one-line message names the key.

Batch units, used everywhere: an RL step takes ``rollout.prompts_per_step`` prompts and samples
``rollout.samples_per_prompt`` responses for each; their product is the step's number of *rollout rows*, which
must split evenly across trainer ranks (``trainer.num_ranks``) and rollout workers (``rollout.num_workers``).
The trainer splits the rollout rows into ``trainer.mini_batches_per_step`` equal *mini-batches* (one optimizer
step each, in batch order; ``algorithm.ppo_epochs`` passes over them), each mini-batch into equal shards across
the ranks, and each shard into *micro-batches* of at most ``trainer.micro_batch_size`` rows (gradient
accumulation: memory only, the update is the same; a micro-batch's rows are packed end to end where that saves
padding, rlhf/core/data/packing.py). So rollout rows must divide by mini_batches_per_step x
num_ranks; ``RunConfig.describe_batches`` prints the derived figures at start.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rlhf.core.config.data_config import EvalConfig, ModelConfig, TaskConfig, ThinkConfig
from rlhf.core.config.hub_config import HubConfig
from rlhf.core.config.preference_config import DPOConfig
from rlhf.core.config.rl_config import AdaptiveConfig, RewardConfig, RewardRefreshConfig, RolloutConfig
from rlhf.core.config.teacher_config import LabelConfig, TracesConfig, WarmupConfig
from rlhf.core.config.training_config import (AlgorithmConfig, ClusterConfig, CriticConfig, EngineConfig, RewardModelConfig,
                                              RoleResources, TrainerConfig, _Section)

__all__ = ["ConfigError", "RunConfig", "load_config", "config_from_dict", "save_config", "ModelConfig",
           "TaskConfig", "WarmupConfig", "ThinkConfig", "RolloutConfig", "AdaptiveConfig", "RewardConfig",
           "LabelConfig", "EngineConfig", "RewardModelConfig", "TrainerConfig", "CriticConfig", "AlgorithmConfig",
           "RoleResources", "ClusterConfig", "EvalConfig", "TracesConfig", "DPOConfig", "RewardRefreshConfig"]


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the key."""


class RunConfig(_Section):
    """A whole run: what YAML files and ``dotted.key=value`` overrides fill (``load_config``), or build it in code,
    sections as dicts or section models: ``RunConfig(output_dir="runs/x", rollout={"prompts_per_step": 8})``."""

    output_dir: str = "runs/quickstart"
    """The run directory: config.yaml, metrics.jsonl, summary.json, report.md, checkpoints and models go here."""
    seed: int = 0
    """Seeds Python, torch and every worker: the same seed and config give the same run on one machine."""
    stages: list[Literal["traces", "warmup", "sft", "label", "train_rm", "dpo", "rl", "eval"]] = [
        "warmup", "rl", "eval"]
    """In pipeline order; any subset runs: warmup -> label -> train_rm -> rl, with eval before and after rl. traces
    (teacher traces, graded and selected) and sft (the warm-up trained on them) come first when listed; dpo
    (preference optimisation on pairs, section dpo) after train_rm: the stages after it start from its policy."""
    call_timeout_s: float = Field(600.0, gt=0)
    """Seconds any single remote call (generate, score, train, weight sync) may take before the run stops."""
    max_worker_restarts: int = Field(3, ge=0)
    """Times a rollout or reward worker whose process died is restarted (its unfinished work re-issued) within one call
    before the run stops; 0 stops at the first death. Trainer ranks are never restarted in place."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N RL steps (0: only the final policy): policy, optimizer, driver and worker state, enough for
    `distilrl run CONFIG --resume` to continue exactly (rlhf/core/checkpoints/resume.py). The newest
    keep_checkpoints are kept."""
    keep_checkpoints: int = Field(2, gt=0)
    """How many of the newest checkpoints (checkpoints/step_N) are kept; older ones are deleted."""
    max_bad_batches: int = Field(3, gt=0)
    """Batches with a NaN or infinite reward, loss or gradient are skipped; this many in a row stop the run."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (needs the wandb package; offline unless WANDB_MODE says otherwise).
    TensorBoard event files are written in output_dir/tensorboard either way."""
    log_samples: int = Field(2, ge=0)
    """Each RL step's K best, K worst and K randomly drawn rollouts (prompt, response, each reward component's value,
    advantage) are saved to output_dir/samples/step_N.jsonl and shown in report.md; 0 saves none."""
    model: ModelConfig = ModelConfig()
    """The student (policy): a local Hugging Face directory, or a small Qwen2 built from the sizes here."""
    task: TaskConfig = TaskConfig()
    """Where prompts, reference answers and difficulties come from, and how answers are checked."""
    warmup: WarmupConfig = WarmupConfig()
    """Supervised warm-up (SFT) of the student before anything else: the oracle's traces or your traces dataset."""
    rollout: RolloutConfig = RolloutConfig()
    """Sampling: the engine, batch units (prompts per step x samples per prompt), length, temperature, workers."""
    reward: RewardConfig = RewardConfig()
    """What RL is rewarded by (a weighted sum of components), teacher audits, and remote reward/teacher endpoints."""
    label: LabelConfig = LabelConfig()
    """Labelling for the distilled RM: which teacher judges the student's samples, on how many prompts."""
    reward_model: RewardModelConfig = RewardModelConfig()
    """The distilled reward model: its training (DeepSpeed ranks, loss weights) or a trained one to use."""
    trainer: TrainerConfig = TrainerConfig()
    """The policy's DeepSpeed trainer ranks: ZeRO stage, learning rate, ranks, micro-batches, threads."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """The RL algorithm: advantage estimator, policy loss and clipping, KL, entropy, shaping."""
    critic: CriticConfig = CriticConfig()
    """PPO's value model (algorithm.advantage gae) on its own DeepSpeed ranks; unused otherwise."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation: greedy answers to the held-out prompts, before and after RL."""
    think: ThinkConfig = ThinkConfig()
    """Qwen3-style think blocks: whether the teacher writes them, and the /think and /no_think switches."""
    traces: TracesConfig = TracesConfig()
    """The traces stage: a teacher writes responses to the training prompts, graded and selected per CD bin."""
    cluster: ClusterConfig = ClusterConfig()
    """Where the Ray actors run: a private local Ray or a cluster, and what each role's actors ask for."""
    dpo: DPOConfig = DPOConfig()
    """Preference optimisation (DPO, IPO, SimPO) of the policy on teacher or your own pairs: stage dpo."""
    hub: HubConfig = HubConfig()
    """The Hugging Face Hub: offline by default; hub.offline=false lets a run download models given by Hub name."""

    @model_validator(mode="after")
    def _batch_units_divide(self) -> "RunConfig":
        rows = self.rollout_rows
        critic = (("critic.num_ranks", self.critic.num_ranks),) if self.algorithm.uses_critic else ()
        for name, parts in (("trainer.num_ranks", self.trainer.num_ranks),
                            ("rollout.num_workers", self.rollout.num_workers),
                            ("trainer.mini_batches_per_step x trainer.num_ranks",
                             self.trainer.mini_batches_per_step * self.trainer.num_ranks), *critic):
            if rows % parts:
                raise ValueError(f"rollout rows per step ({self.rollout.prompts_per_step} prompts x "
                                 f"{self.rollout.samples_per_prompt} samples = {rows}) do not divide by {name}={parts}")
        if self.rollout.prompts_per_step % self.rollout.num_workers:
            raise ValueError(f"rollout.prompts_per_step={self.rollout.prompts_per_step} does not divide by "
                             f"rollout.num_workers={self.rollout.num_workers} (a prompt's samples stay together)")
        return self

    @model_validator(mode="after")
    def _tis_on_for_bf16_rollout(self) -> "RunConfig":
        # bf16 sampling draws from a slightly different distribution than the float32 trainer scores: truncated
        # importance sampling corrects for it unless the config says otherwise (tis_cap given, null included).
        if self.rollout.dtype == "bfloat16" and "tis_cap" not in self.algorithm.model_fields_set:
            self.algorithm.tis_cap = 2.0
        return self

    @model_validator(mode="after")
    def _teacher_kl_fits_the_algorithm(self) -> "RunConfig":
        weighted = {name for name, weight in self.reward.components.items() if weight}
        if self.algorithm.advantage == "on_policy_distillation" and weighted != {"teacher_kl"}:
            raise ValueError(f"algorithm.advantage on_policy_distillation learns from reward.components.teacher_kl "
                             f"alone (components now: {sorted(weighted)}): to add other rewards, keep teacher_kl and "
                             f"pick an estimator for them, e.g. algorithm.advantage=grpo")
        if "teacher_kl" not in weighted:
            return self
        if self.algorithm.dynamic_sampling:
            raise ValueError("algorithm.dynamic_sampling drops groups of equal rewards, but teacher_kl gives every "
                             "token a reward: turn dynamic_sampling off")
        return self

    @model_validator(mode="after")
    def _rm_available(self) -> "RunConfig":
        if self.reward.components.get("rm") and not (self.reward_model.path or "train_rm" in self.stages
                                                     or self.reward.rm_endpoint):
            raise ValueError("reward.components uses rm but there is none: add stage train_rm, or set "
                             "reward_model.path or reward.rm_endpoint")
        return self

    @model_validator(mode="after")
    def _refresh_has_what_it_needs(self) -> "RunConfig":
        r, rf = self.reward, self.reward.refresh
        if not rf.enabled:
            return self
        if not (r.components.get("rm") or (r.components.get("adaptive") and r.adaptive.source == "rm")):
            raise ValueError("reward.refresh refreshes the distilled RM: it needs reward.components.rm (or "
                             "reward.adaptive.source rm)")
        if r.rm_endpoint:
            raise ValueError("reward.refresh swaps new weights into the reward workers: it cannot reach an RM on a "
                             "reward server (reward.rm_endpoint)")
        if not (rf.every or (r.audit_every and (rf.on_alarm or rf.agreement_below is not None))):
            raise ValueError("reward.refresh has no trigger: set reward.refresh.every, or reward.audit_every with "
                             "reward.refresh.on_alarm or reward.refresh.agreement_below")
        if rf.teacher_calls < 2 * self.rollout.samples_per_prompt:
            raise ValueError(f"reward.refresh.teacher_calls={rf.teacher_calls} pays for fewer than two groups of "
                             f"rollout.samples_per_prompt={self.rollout.samples_per_prompt} responses (one to "
                             f"train on, one to check the refreshed RM on)")
        return self

    @model_validator(mode="after")
    def _adaptive_sources(self) -> "RunConfig":
        ad = self.reward.adaptive
        if not self.reward.components.get("adaptive"):
            return self
        if ad.source == "rm" and not (self.reward_model.path or "train_rm" in self.stages):
            raise ValueError("reward.adaptive.source rm needs a local reward model (its RV/CD heads): add stage "
                             "train_rm or set reward_model.path")
        if ad.source == "rule" and self.task.name != "arithmetic" and not (self.task.difficulty_field
                                                                            and ad.difficulty_range):
            raise ValueError("reward.adaptive.source rule needs task.difficulty_field and "
                             "reward.adaptive.difficulty_range (the field's easiest and hardest values)")
        return self

    @model_validator(mode="after")
    def _warmup_has_data(self) -> "RunConfig":
        # The arithmetic oracle's traces teach nothing about another task: never fall back to them silently.
        if "warmup" in self.stages and "sft" in self.stages:
            raise ValueError("stages lists both warmup and sft (the same stage): keep one")
        sft = "sft" in self.stages or ("warmup" in self.stages and self.task.name != "arithmetic")
        written = Path(self.output_dir) / "traces" / "dataset"  # what an earlier `distilrl traces` wrote
        if sft and not (self.warmup.traces_file or "traces" in self.stages or written.is_dir()):
            raise ValueError(f"stage {'sft' if 'sft' in self.stages else 'warmup'} on task {self.task.name} needs "
                             f"a traces dataset: set warmup.traces_file, or add stage traces before it")
        return self

    @model_validator(mode="after")
    def _label_verifier_from_task(self) -> "RunConfig":
        if self.label.verifier is None:  # the reference teacher checks answers as the task does
            self.label.verifier = self.task.verifier
        return self

    @property
    def rollout_rows(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.samples_per_prompt

    def describe_batches(self) -> str:
        """The derived batch figures printed at start, so nobody has to guess the units."""
        rows, t = self.rollout_rows, self.trainer
        mini = rows // t.mini_batches_per_step
        per_rank = mini // t.num_ranks
        micro = min(t.micro_batch_size, per_rank)
        updates = t.mini_batches_per_step * self.algorithm.ppo_epochs
        ahead = (f"; generated up to {self.rollout.max_staleness} step(s) ahead (asynchronous)"
                 if self.rollout.asynchronous else "")
        return (f"batch: {self.rollout.prompts_per_step} prompts x {self.rollout.samples_per_prompt} samples = "
                f"{rows} rollout rows per step; {self.rollout.num_workers} rollout worker(s) x "
                f"{rows // self.rollout.num_workers} rows; {t.mini_batches_per_step} mini-batch(es) of {mini} rows = "
                f"{t.num_ranks} trainer rank(s) x {per_rank} rows in micro-batches of {micro}; {updates} optimizer "
                f"step(s) per RL step ({self.algorithm.ppo_epochs} epoch(s)); {self.algorithm.steps} RL steps{ahead}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (or nothing: all defaults) and apply ``dotted.key=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory: give the YAML file in it, e.g. {path}/config.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text (a binary file, or UTF-16?): save the config as UTF-8 "
                              f"YAML") from None
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key.strip()}: {raw!r} is not a valid YAML value: "
                              f"{' '.join(str(err).split())}") from None
        _set_dotted(data, key.strip(), value)
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"] if part != "[key]")
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = (f"unknown key; did you mean {close}?" if (close := _closest_key(first["loc"])) else
                       "unknown key (check the spelling against rlhf/core/config/run_config.py)")
        elif "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
        raise ConfigError(f"config key {key}: {message}" if key else f"config: {message}") from None


def _closest_key(loc: tuple) -> str | None:
    """The dotted key of the section at ``loc`` spelled most like the unknown key ``loc[-1]``, if one is close."""
    section: Any = RunConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        kinds = (field.annotation, *get_args(field.annotation)) if field is not None else ()
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if section is None:
            return None
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return ".".join([*map(str, loc[:-1]), close[0]]) if close else None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config, every default filled in, so a run directory says exactly what ran."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
