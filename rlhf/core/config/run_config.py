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

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from rlhf.core.config.training_config import (AlgorithmConfig, ClusterConfig, CriticConfig, EngineConfig, LoraSettings,
                                        RewardModelConfig, RoleResources, TrainerConfig, _Section)

__all__ = ["ConfigError", "RunConfig", "load_config", "config_from_dict", "save_config", "ModelConfig",
           "TaskConfig", "WarmupConfig", "ThinkConfig", "RolloutConfig", "AdaptiveConfig", "RewardConfig",
           "LabelConfig", "EngineConfig", "RewardModelConfig", "TrainerConfig", "CriticConfig", "AlgorithmConfig",
           "RoleResources", "ClusterConfig", "EvalConfig"]


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the key."""


class ModelConfig(_Section):
    """The student. Either a local Hugging Face directory, or a Qwen2 of the given size built with random weights."""

    model_name_or_path: str | None = None
    tokenizer: Literal["char", "qwen2.5"] = "char"
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(3, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(512, gt=0)
    max_position_embeddings: int = Field(128, gt=0)
    lora: LoraSettings | None = None
    """None: full fine-tuning"""

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        return self


class TaskConfig(_Section):
    """Where prompts come from: the synthetic arithmetic task, or a prompt dataset read with ``datasets``
    (``dataset``; ``jsonl`` is the same, its older name): a JSONL, JSON, Parquet or CSV file, or a directory written
    by ``save_to_disk``. ``*_prompts`` cap the pools. Dataset prompts are rendered with the chat template below;
    the arithmetic task's stay plain text (the warm-up trains on them so)."""

    name: Literal["arithmetic", "jsonl", "dataset"] = "arithmetic"
    train_prompts: int = Field(4000, gt=0)
    eval_prompts: int = Field(250, gt=0)
    train_file: str | None = None
    eval_file: str | None = None
    """none: the held-out prompts come from eval_split or eval_fraction of train_file"""
    train_split: str = "train"
    """the split to use when train_file is a save_to_disk directory of several splits"""
    eval_split: str | None = None
    """e.g. "test": that split of eval_file (or of train_file when eval_file is unset)"""
    eval_fraction: float | None = Field(None, gt=0, lt=1)
    """hold out this share of train_file (shuffled by seed)"""
    shuffle: bool = True
    """shuffle the training pool by the run's seed before train_prompts caps it"""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    difficulty_field: str | None = None
    system_field: str | None = None
    """a column holding each prompt's system prompt (wins over system_prompt)"""
    system_prompt: str | None = None
    """one system prompt for every prompt"""
    chat_template: str = "auto"
    """auto: the tokenizer's own chat template (Qwen's ChatML for qwen2.5), plain text if it has none; plain: the
    prompt text as it is (a system prompt, if any, above it); else a Jinja template, or the path of a .jinja file."""
    chat_template_kwargs: dict[str, Any] = {}
    """extra template variables, e.g. {enable_thinking: false} for Qwen3"""
    max_prompt_tokens: int | None = Field(None, gt=0)
    """drop (and report) prompts longer than this, template included"""
    verifier: str = "final_number"
    """How a response's answer is checked against the reference (reward.scoring.verifiers.VERIFIERS): final_number (the
    number after the last "#"), gsm8k (the same, tolerant of "$", commas and decimals), math (the last \\boxed{...},
    compared by math-verify: 1/2 = 0.5 = \\frac{1}{2}), exact (the whole response), regex."""
    answer_regex: str | None = None
    """regex verifier: the answer is the last match (its first group, if any)"""

    @model_validator(mode="after")
    def _files_for_datasets(self) -> "TaskConfig":
        if self.name != "arithmetic":
            if not self.train_file:
                raise ValueError(f"task {self.name} needs task.train_file")
            if not (self.eval_file or self.eval_split or self.eval_fraction):
                raise ValueError(f"task {self.name} needs held-out prompts: set task.eval_file, task.eval_split "
                                 f"or task.eval_fraction")
        if self.verifier == "regex" and not self.answer_regex:
            raise ValueError("verifier regex needs task.answer_regex")
        return self

    @field_validator("answer_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        return value

    @field_validator("chat_template")
    @classmethod
    def _template_kind(cls, value: str) -> str:
        if value not in ("auto", "plain") and not value.endswith(".jinja") and "{" not in value:
            raise ValueError("must be auto, plain, a Jinja template or the path of a .jinja file")
        return value


class WarmupConfig(_Section):
    """Supervised distillation of the teacher's solutions into the student before RL."""

    steps: int = Field(300, ge=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)
    terse_fraction: float | list[float] = 0.6
    """Share of teacher solutions written as a bare answer; the rest show their running totals. A mixture, so the
    student knows both ways to answer and RL has a real choice to learn: when to write the steps out. A number: the
    same share at every level; a list: shares at evenly spaced levels from the easiest to the hardest, linear in
    between ([0.4, 0.0]: falling steadily; one per level: exactly those), like a reasoning teacher that writes more
    steps on harder problems."""
    curriculum: Literal["none", "matched", "low", "medium", "high"] = "none"
    """RV/CD curriculum (rlhf/stages/curriculum.py): the teacher writes every problem at each verbosity, the traces are
    scored with RV/CD, and per CD bin the ones whose RV is closest to the target are kept. none: the plain
    terse/worked mixture above; matched: target RV rising with CD; low/medium/high: a fixed target RV."""
    curriculum_keep: float = Field(0.34, gt=0, le=1)
    """share of each CD bin's candidate traces kept"""
    traces_file: str | None = None
    """Distillation SFT on a traces dataset (``distilrl traces``' output, or any dataset with prompt/response columns
    or a ``messages`` column) instead of the arithmetic oracle's traces: a save_to_disk directory or a
    .jsonl/.json/.parquet file. Needed whenever the task is not the arithmetic task (no silent fallback)."""
    prompt_field: str = "prompt"
    """traces_file's columns; a messages column (OpenAI format) wins where present"""
    response_field: str = "response"
    messages_field: str = "messages"
    epochs: float = Field(1.0, gt=0)
    """with traces_file: passes over the traces when steps is 0"""
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """traces held out for the held-out loss"""
    eval_every: int = Field(0, ge=0)
    """steps between held-out losses (0: at the end only)"""
    max_length: int | None = Field(None, gt=0)
    """longer examples are dropped and counted (default: the model's)"""
    pack: bool = True
    """padding-free packing of each batch's rows (rlhf/core/data/packing.py) where it saves enough"""

    @field_validator("terse_fraction")
    @classmethod
    def _shares(cls, value):
        shares = value if isinstance(value, list) else [value]
        if not shares or not all(0 <= share <= 1 for share in shares):
            raise ValueError("give a share of bare answers between 0 and 1, or a non-empty list of them")
        return value


class TracesConfig(_Section):
    """Teacher traces on the task's training prompts (``distilrl traces``, reward/teachers/traces.py): a teacher writes
    ``samples_per_prompt`` responses per prompt, the verifier grades them against the reference, RV/CD are scored
    by rule or by the label teacher, and per CD bin the curriculum picks the traces kept. Written to
    ``output_dir/traces`` (a ``datasets`` save_to_disk directory and summary.json)."""

    teacher: Literal["dataset", "oracle", "hf", "openai"] = "oracle"
    """dataset: the responses already in the data (response_field, e.g. GSM8K's worked ``answer``); oracle: the
    arithmetic task's oracle (each verbosity in turn); hf: a local causal LM (model_path); openai: an OpenAI-
    compatible chat endpoint (base_url, model, api_key_env)."""
    response_field: str = "answer"
    model_path: str | None = None
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    concurrency: int = Field(4, gt=0)
    """requests in flight at once (openai)"""
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(2, ge=0)
    prompts: int = Field(1000, gt=0)
    """training prompts to write traces for"""
    samples_per_prompt: int = Field(1, gt=0)
    temperature: float = Field(0.7, ge=0)
    max_new_tokens: int = Field(512, gt=0)
    verbosity: Literal["auto", "low", "medium", "high"] = "auto"
    """auto: the teacher's own; low/medium/high: an instruction in the system prompt (oracle: its verbosity 0/1/2)."""
    scores: Literal["rule", "teacher"] = "rule"
    """Where RV and CD come from: rule (RV: reasoning length, chars_per_rv characters a point; CD: task's
    difficulty_field scaled by difficulty_range, else the reasoning steps of the prompt's correct traces) or teacher
    (label.teacher's judge: oracle, hf or openai)."""
    chars_per_rv: float = Field(40.0, gt=0)
    difficulty_range: tuple[float, float] | None = None
    curriculum: Literal["none", "matched", "low", "medium", "high"] = "matched"
    """Selection per CD bin: none keeps every correct trace; matched/low/medium/high as warmup.curriculum."""
    keep: float = Field(0.5, gt=0, le=1)
    """share of each CD bin's correct traces kept"""
    keep_unverified: bool = True
    """keep traces with no reference to check (when no judge says they are wrong)"""


class ThinkConfig(_Section):
    """Qwen3-style thinking (rlhf/core/data/think.py): reasoning in ``<think>...</think>`` blocks, and prompts switched."""

    format: bool = False
    """The teacher writes its worked steps in a think block (warm-up data); bare answers have none."""
    mode: Literal["auto", "on", "off"] = "auto"
    """on: every rollout/eval prompt ends in /think; off: in /no_think; auto: no switch, the model chooses."""
    switch_fraction: float = Field(0.2, ge=0, le=1)
    """Share of warm-up prompts given a switch that the teacher's solution obeys, so the student learns to follow."""

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML reads a bare on/off as true/false; they mean the modes of the same name here.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class RolloutConfig(_Section):
    engine: str = "hf_compact"
    """What the rollout workers sample with (rollout/engines.py ENGINES): hf_compact, our decode loop over the
    transformers model that drops finished rows (2-2.5x hf on the quickstart's rollouts, the same on fixed-length
    ones); hf, Hugging Face generate, which also applies the checkpoint's saved generation config; vllm, vLLM on a
    GPU (optional extra, rollout/vllm_engine.py). README "Choosing a rollout engine"."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The dtype the engine holds the policy in. bfloat16 pays on CPUs with fast bf16 matmuls (AVX512-BF16, AMX) and on
    GPUs; log-probs are float32 from its logits either way, the mismatch with the trainer's is logged as
    perf/logprob_mismatch, and algorithm.tis_cap defaults to 2 in that mode (set it to null to turn it off)."""
    weight_sync: Literal["object_store", "broadcast"] = "object_store"
    """How new weights reach the workers after an update: object_store, trainer rank 0's full state dict through Ray's
    object store (any layout); broadcast, a torch.distributed group of trainer rank 0 and the workers (gloo on CPU,
    NCCL on GPU) in buckets of sync_bucket_mb, ZeRO-3 parameters gathered one at a time."""
    sync_bucket_mb: float = Field(64.0, gt=0)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vllm engine only: the share of the GPU's memory vLLM takes (weights + KV cache; lower it where the trainer
    shares the GPU), GPUs per worker for tensor parallelism, and whether to release that memory between rollouts
    (sleep/wake) for a trainer on the same GPU."""
    tensor_parallel_size: int = Field(1, gt=0)
    sleep_between_rollouts: bool = False
    num_workers: int = Field(1, gt=0)
    prompts_per_step: int = Field(16, gt=0)
    samples_per_prompt: int = Field(8, gt=1)
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    threads: int = Field(2, gt=0)
    asynchronous: bool = False
    """One-step-off asynchronous rollout: while the trainer updates on batch k the rollout workers already generate
    batch k+1 (up to max_staleness batches ahead) from the weights they hold, which are then max_staleness updates
    behind. Logged as perf/staleness; pair it with algorithm.tis_cap to correct for the older sampler. Overlap needs
    cores for both at once: num_workers x threads + trainer.num_ranks x trainer.threads <= cores."""
    max_staleness: int = Field(1, ge=1)
    """batches generated ahead when asynchronous (their weights' lag, in updates)"""


class AdaptiveConfig(_Section):
    """The adaptive-length reward component (reward/scoring/adaptive.py; formula there): gated on correctness, 1 when the
    reasoning verbosity RV fits the target for the problem's difficulty CD, less as it strays either way."""

    source: Literal["rule", "teacher", "rm"] = "rule"
    """Where RV and CD come from: rule (reasoning length; the dataset's difficulty), teacher (label.teacher's judge,
    e.g. the oracle), rm (the distilled reward model's RV/CD heads)."""
    rv_at_cd0: float = Field(0.0, ge=0, le=9)
    """target RV for the easiest problems"""
    rv_at_cd9: float = Field(8.0, ge=0, le=9)
    """target RV for the hardest; in between, linear in CD"""
    tolerance: float = Field(0.5, ge=0)
    """RV points off target that cost nothing"""
    over_penalty: float = Field(0.5, ge=0)
    """per RV point of over-thinking beyond the tolerance"""
    under_penalty: float = Field(0.5, ge=0)
    """per RV point of under-thinking beyond the tolerance"""
    skip_think_bonus: float = Field(0.0, ge=0)
    """added for a correct answer without a think block when CD is easy"""
    easy_cd: float = Field(2.0, ge=0, le=9)
    """CD at or below which a problem counts as easy for that bonus"""
    chars_per_rv: float = Field(6.0, gt=0)
    """rule source: characters of reasoning per RV point (the oracle's scale)"""
    difficulty_range: tuple[float, float] | None = None
    """rule source: the dataset difficulty mapped to CD 0 and 9; empty: the arithmetic task's levels (1, 6)."""

    @model_validator(mode="after")
    def _range_rises(self) -> "AdaptiveConfig":
        if self.difficulty_range is not None and self.difficulty_range[1] <= self.difficulty_range[0]:
            raise ValueError("difficulty_range must be [low, high] with high > low")
        return self


class RewardConfig(_Section):
    """What RL is rewarded by: a weighted sum of components. ``verifier``: the rule check of the final answer
    against the reference; ``rm``: the distilled reward model's quality score (from ``reward_model``); ``seqcls``:
    any ``AutoModelForSequenceClassification`` reward model's score (``seqcls_path``, e.g. one trained by TRL's
    RewardTrainer); ``custom``: a Python function, ``custom_fn`` or passed from a script
    (``rlhf.Trainer(cfg, reward_fn=...)``); ``adaptive``: reasoning length fitted to difficulty, for correct
    answers (``reward.adaptive``)."""

    num_workers: int = Field(1, gt=0)
    components: dict[str, float] = {"verifier": 1.0}
    """names from reward.scoring.components.REWARD_COMPONENTS"""
    custom_fn: str | None = None
    """The custom component's function: "module.path:function" or "path/to/file.py:function", called as fn(prompts,
    responses, rows) -> one float per response; a coroutine function is awaited."""
    seqcls_path: str | None = None
    """the seqcls component's model: a local directory, safetensors"""
    seqcls_format: Literal["auto", "chat", "plain"] = "auto"
    """How the seqcls model reads a sample, as TRL's RewardTrainer fed it in training: chat (the tokenizer's chat
    template over the conversation), plain (prompt + response + end-of-sequence), auto (chat where the saved
    tokenizer has a template)."""
    adaptive: AdaptiveConfig = AdaptiveConfig()
    teacher_model_path: str | None = None
    """teacher_kl (on-policy distillation): the teacher, a local causal LM with the student's tokenizer, whose log-prob
    of every sampled token, minus the sampler's, is a per-token advantage term; and its Ray workers."""
    teacher_workers: int = Field(1, gt=0)
    teacher_url: str | None = None
    """Or a remote teacher: an OpenAI-compatible completions endpoint that echoes prompt log-probs (vLLM serves one),
    its model name and the environment variable holding its key. It must use the student's tokenizer."""
    teacher_model: str | None = None
    teacher_api_key_env: str | None = None
    rm_url: str | None = None
    """Score the rm component on a reward server (``distilrl serve-rm``) instead of in the reward workers."""
    rm_token_env: str | None = None
    """environment variable holding the server's bearer token"""
    correct: float = 1.0
    """Verifier reward for a correct final answer, and for a response without a parseable answer."""
    unparseable: float = 0.0
    audit_every: int = Field(0, ge=0)
    """Teacher audits during RL: every N steps (0: never) the teacher re-judges a sample of fresh rollouts and the RM-
    teacher agreement is logged; below the threshold a warning says the policy may be hacking the RM."""
    audit_samples: int = Field(64, gt=1)
    audit_warn_below: float = Field(0.8, ge=0, le=1)
    audit_stop_on_alarm: bool = False
    """end the RL stage at an audit below audit_warn_below (then eval, save, report)"""

    @model_validator(mode="after")
    def _some_component(self) -> "RewardConfig":
        if not any(w != 0 for w in self.components.values()):
            raise ValueError("reward.components needs at least one non-zero weight (verifier, rm, seqcls, custom)")
        if self.components.get("teacher_kl") and not (self.teacher_model_path or self.teacher_url):
            raise ValueError("reward.components uses teacher_kl: set reward.teacher_model_path to the teacher's "
                             "directory (a causal LM with the student's tokenizer), or reward.teacher_url")
        if self.teacher_url and not self.teacher_model:
            raise ValueError("reward.teacher_url needs reward.teacher_model (the model name the server knows)")
        if self.components.get("seqcls") and not self.seqcls_path:
            raise ValueError("reward.components uses seqcls: set reward.seqcls_path to its model directory")
        return self

    @field_validator("custom_fn")
    @classmethod
    def _function_spec(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("must read module.path:function or path/to/file.py:function")
        return value


class LabelConfig(_Section):
    """Labelling for the distilled RM: student samples (and teacher solutions) judged by the teacher."""

    teacher: str = "oracle"
    """reward.teachers.TEACHERS: oracle, reference (rules against the reference solution), hf (a local LLM judge),
    openai (an endpoint)"""
    teacher_model_path: str | None = None
    """hf: a local causal-LM directory used as the judge"""
    base_url: str | None = None
    """openai: the endpoint, e.g. http://127.0.0.1:8000/v1"""
    model: str | None = None
    """openai: the model name"""
    api_key_env: str | None = None
    """openai: the environment variable holding the key (never written anywhere)"""
    concurrency: int = Field(4, gt=0)
    prompts: int = Field(600, gt=0)
    """training prompts to label"""
    eval_prompts: int = Field(150, gt=0)
    """held-out prompts labelled for the RM's evaluation"""
    samples_per_prompt: int = Field(8, gt=0)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(56, gt=0)
    teacher_solutions: bool = True
    """add the teacher's own worked solutions beside the student's samples"""
    verifier: str | None = None
    """teacher reference (rule-based, reward/teachers/reference.py): the verifier (task.verifier's names; default
    task.verifier) and the reasoning characters per RV point (as traces.chars_per_rv)."""
    chars_per_rv: float = Field(40.0, gt=0)

    @model_validator(mode="after")
    def _teacher_settings(self) -> "LabelConfig":
        if self.teacher == "hf" and not self.teacher_model_path:
            raise ValueError("teacher hf needs label.teacher_model_path")
        if self.teacher == "openai" and not (self.base_url and self.model):
            raise ValueError("teacher openai needs label.base_url and label.model")
        return self


class EvalConfig(_Section):
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(256, gt=0)


class RunConfig(_Section):
    """A whole run: what YAML files and ``dotted.key=value`` overrides fill (``load_config``), or build it in code,
    sections as dicts or section models: ``RunConfig(output_dir="runs/x", rollout={"prompts_per_step": 8})``."""

    output_dir: str = "runs/quickstart"
    seed: int = 0
    stages: list[Literal["traces", "warmup", "sft", "label", "train_rm", "rl", "eval"]] = ["warmup", "rl", "eval"]
    """In pipeline order; any subset runs: warmup -> label -> train_rm -> rl, with eval before and after rl. traces
    (teacher traces, graded and selected) and sft (the warm-up trained on them) come first when listed."""
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
    max_bad_batches: int = Field(3, gt=0)
    """Batches with a NaN or infinite reward, loss or gradient are skipped; this many in a row stop the run."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (needs the wandb package; offline unless WANDB_MODE says otherwise).
    TensorBoard event files are written in output_dir/tensorboard either way."""
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    warmup: WarmupConfig = WarmupConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    label: LabelConfig = LabelConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    critic: CriticConfig = CriticConfig()
    eval: EvalConfig = EvalConfig()
    think: ThinkConfig = ThinkConfig()
    traces: TracesConfig = TracesConfig()
    cluster: ClusterConfig = ClusterConfig()

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
    def _checkpoints_are_synchronous(self) -> "RunConfig":
        # A checkpoint taken while the next batch is already being generated would lose that batch's prompts on
        # resume (they are drawn, not yet trained on): exact resume needs the synchronous schedule for now.
        if self.rollout.asynchronous and self.save_every:
            raise ValueError("rollout.asynchronous does not take checkpoints yet: set save_every=0, or turn "
                             "asynchronous rollout off for a resumable run")
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
                                                     or self.reward.rm_url):
            raise ValueError("reward.components uses rm but there is none: add stage train_rm, or set "
                             "reward_model.path or reward.rm_url")
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
            message = "unknown key (check the spelling against rlhf/core/config/run_config.py)"
        elif "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
        raise ConfigError(f"config key {key}: {message}" if key else f"config: {message}") from None


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
