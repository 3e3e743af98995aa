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
padding, rlhf/packing.py). So rollout rows must divide by mini_batches_per_step x
num_ranks; ``RunConfig.describe_batches`` prints the derived figures at start.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf.base.algorithms import ADVANTAGE_ESTIMATORS


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Section):
    """LoRA adapters on the policy (rlhf/base/lora.py, through peft): only the adapters train; the reference is the
    same model with them off; rollout workers and exports get merged weights. Setting any key turns LoRA on."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)  # the adapters' output is scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)
    # Linear layers to adapt, by name (Qwen2/Llama: the attention and MLP projections).
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], min_length=1)


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
    lora: LoraSettings | None = None  # None: full fine-tuning

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
    eval_file: str | None = None  # none: the held-out prompts come from eval_split or eval_fraction of train_file
    train_split: str = "train"  # the split to use when train_file is a save_to_disk directory of several splits
    eval_split: str | None = None  # e.g. "test": that split of eval_file (or of train_file when eval_file is unset)
    eval_fraction: float | None = Field(None, gt=0, lt=1)  # hold out this share of train_file (shuffled by seed)
    shuffle: bool = True  # shuffle the training pool by the run's seed before train_prompts caps it
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    difficulty_field: str | None = None
    system_field: str | None = None  # a column holding each prompt's system prompt (wins over system_prompt)
    system_prompt: str | None = None  # one system prompt for every prompt
    # auto: the tokenizer's own chat template (Qwen's ChatML for qwen2.5), plain text if it has none; plain: the
    # prompt text as it is (a system prompt, if any, above it); else a Jinja template, or the path of a .jinja file.
    chat_template: str = "auto"
    chat_template_kwargs: dict[str, Any] = {}  # extra template variables, e.g. {enable_thinking: false} for Qwen3
    max_prompt_tokens: int | None = Field(None, gt=0)  # drop (and report) prompts longer than this, template included
    # How a response's answer is checked against the reference (reward.verifiers.VERIFIERS): final_number (the
    # number after the last "#"), gsm8k (the same, tolerant of "$", commas and decimals), math (the last
    # \boxed{...}, compared by math-verify: 1/2 = 0.5 = \frac{1}{2}), exact (the whole response), regex.
    verifier: Literal["final_number", "gsm8k", "math", "exact", "regex"] = "final_number"
    answer_regex: str | None = None  # regex verifier: the answer is the last match (its first group, if any)

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
    # Share of teacher solutions written as a bare answer; the rest show their running totals. A mixture, so the
    # student knows both ways to answer and RL has a real choice to learn: when to write the steps out. A number:
    # the same share at every level; a list: shares at evenly spaced levels from the easiest to the hardest, linear
    # in between ([0.4, 0.0]: falling steadily; one per level: exactly those), like a reasoning teacher that writes
    # more steps on harder problems.
    terse_fraction: float | list[float] = 0.6
    # RV/CD curriculum (rlhf/curriculum.py): the teacher writes every problem at each verbosity, the traces are
    # scored with RV/CD, and per CD bin the ones whose RV is closest to the target are kept. none: the plain
    # terse/worked mixture above; matched: target RV rising with CD; low/medium/high: a fixed target RV.
    curriculum: Literal["none", "matched", "low", "medium", "high"] = "none"
    curriculum_keep: float = Field(0.34, gt=0, le=1)  # share of each CD bin's candidate traces kept

    @field_validator("terse_fraction")
    @classmethod
    def _shares(cls, value):
        shares = value if isinstance(value, list) else [value]
        if not shares or not all(0 <= share <= 1 for share in shares):
            raise ValueError("give a share of bare answers between 0 and 1, or a non-empty list of them")
        return value


class ThinkConfig(_Section):
    """Qwen3-style thinking (rlhf/think.py): reasoning in ``<think>...</think>`` blocks, and prompts switched."""

    # The teacher writes its worked steps in a think block (warm-up data); bare answers have none.
    format: bool = False
    # on: every rollout/eval prompt ends in /think; off: in /no_think; auto: no switch, the model chooses.
    mode: Literal["auto", "on", "off"] = "auto"
    # Share of warm-up prompts given a switch that the teacher's solution obeys, so the student learns to follow.
    switch_fraction: float = Field(0.2, ge=0, le=1)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML reads a bare on/off as true/false; they mean the modes of the same name here.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class RolloutConfig(_Section):
    num_workers: int = Field(1, gt=0)
    prompts_per_step: int = Field(16, gt=0)
    samples_per_prompt: int = Field(8, gt=1)
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    threads: int = Field(2, gt=0)
    # One-step-off asynchronous rollout: while the trainer updates on batch k the rollout workers already generate
    # batch k+1 (up to max_staleness batches ahead) from the weights they hold, which are then max_staleness
    # updates behind. Logged as perf/staleness; pair it with algorithm.tis_cap to correct for the older sampler.
    # Overlap needs cores for both at once: num_workers x threads + trainer.num_ranks x trainer.threads <= cores.
    asynchronous: bool = False
    max_staleness: int = Field(1, ge=1)  # batches generated ahead when asynchronous (their weights' lag, in updates)


class AdaptiveConfig(_Section):
    """The adaptive-length reward component (reward/adaptive.py; formula there): gated on correctness, 1 when the
    reasoning verbosity RV fits the target for the problem's difficulty CD, less as it strays either way."""

    # Where RV and CD come from: rule (reasoning length; the dataset's difficulty), teacher (label.teacher's
    # judge, e.g. the oracle), rm (the distilled reward model's RV/CD heads).
    source: Literal["rule", "teacher", "rm"] = "rule"
    rv_at_cd0: float = Field(0.0, ge=0, le=9)  # target RV for the easiest problems
    rv_at_cd9: float = Field(8.0, ge=0, le=9)  # target RV for the hardest; in between, linear in CD
    tolerance: float = Field(0.5, ge=0)  # RV points off target that cost nothing
    over_penalty: float = Field(0.5, ge=0)  # per RV point of over-thinking beyond the tolerance
    under_penalty: float = Field(0.5, ge=0)  # per RV point of under-thinking beyond the tolerance
    skip_think_bonus: float = Field(0.0, ge=0)  # added for a correct answer without a think block when CD is easy
    easy_cd: float = Field(2.0, ge=0, le=9)  # CD at or below which a problem counts as easy for that bonus
    chars_per_rv: float = Field(6.0, gt=0)  # rule source: characters of reasoning per RV point (the oracle's scale)
    # rule source: the dataset difficulty mapped to CD 0 and 9; empty: the arithmetic task's levels (1, 6).
    difficulty_range: tuple[float, float] | None = None

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
    components: dict[Literal["verifier", "rm", "seqcls", "custom", "adaptive"], float] = {"verifier": 1.0}
    # The custom component's function: "module.path:function" or "path/to/file.py:function", called as
    # fn(prompts, responses, rows) -> one float per response; a coroutine function is awaited.
    custom_fn: str | None = None
    seqcls_path: str | None = None  # the seqcls component's model: a local directory, safetensors
    adaptive: AdaptiveConfig = AdaptiveConfig()
    # Score the rm component on a reward server (``distilrl serve-rm``) instead of in the reward workers.
    rm_url: str | None = None
    rm_token_env: str | None = None  # environment variable holding the server's bearer token
    # Verifier reward for a correct final answer, and for a response without a parseable answer.
    correct: float = 1.0
    unparseable: float = 0.0
    # Teacher audits during RL: every N steps (0: never) the teacher re-judges a sample of fresh rollouts and the
    # RM-teacher agreement is logged; below the threshold a warning says the policy may be hacking the RM.
    audit_every: int = Field(0, ge=0)
    audit_samples: int = Field(64, gt=1)
    audit_warn_below: float = Field(0.8, ge=0, le=1)

    @model_validator(mode="after")
    def _some_component(self) -> "RewardConfig":
        if not any(w != 0 for w in self.components.values()):
            raise ValueError("reward.components needs at least one non-zero weight (verifier, rm, seqcls, custom)")
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

    teacher: Literal["oracle", "hf", "openai"] = "oracle"
    teacher_model_path: str | None = None  # hf: a local causal-LM directory used as the judge
    base_url: str | None = None  # openai: the endpoint, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # openai: the model name
    api_key_env: str | None = None  # openai: the environment variable holding the key (never written anywhere)
    concurrency: int = Field(4, gt=0)
    prompts: int = Field(600, gt=0)  # training prompts to label
    eval_prompts: int = Field(150, gt=0)  # held-out prompts labelled for the RM's evaluation
    samples_per_prompt: int = Field(8, gt=0)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(56, gt=0)
    teacher_solutions: bool = True  # add the teacher's own worked solutions beside the student's samples

    @model_validator(mode="after")
    def _teacher_settings(self) -> "LabelConfig":
        if self.teacher == "hf" and not self.teacher_model_path:
            raise ValueError("teacher hf needs label.teacher_model_path")
        if self.teacher == "openai" and not (self.base_url and self.model):
            raise ValueError("teacher openai needs label.base_url and label.model")
        return self


class RewardModelConfig(_Section):
    """The distilled reward model: trained from the warm-up student's backbone on the labels, on DeepSpeed ranks."""

    path: str | None = None  # use this trained RM instead of training one (stage train_rm then only evaluates)
    # Give the RM the dataset's reference answer beside the response (a reference-guided judge, as the teacher is).
    # Off, a small RM must recompute the answer itself: on the quickstart task it then ranks pairs far worse.
    use_reference: bool = True
    num_ranks: int = Field(2, gt=0)
    zero_stage: Literal[2, 3] = 2
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(32, gt=0)  # pairs per optimizer step
    max_length: int = Field(128, gt=0)
    # Loss weights: Bradley-Terry on pairs (with the teacher's margin), regression of quality (0-1) and RV/CD (0-9)
    # on the teacher's scores, and KL to the teacher's soft labels (or one-hot scores). Small weights on the 0-9
    # terms keep their larger squared errors from drowning the ranking signal.
    bt_weight: float = Field(1.0, ge=0)
    quality_weight: float = Field(0.1, ge=0)
    rv_weight: float = Field(0.01, ge=0)
    cd_weight: float = Field(0.01, ge=0)
    kl_weight: float = Field(0.02, ge=0)


class TrainerConfig(_Section):
    """The policy trainer group: one DeepSpeed data-parallel rank per Ray actor."""

    num_ranks: int = Field(2, gt=0)
    zero_stage: Literal[2, 3] = 2
    lr: float = Field(1e-4, gt=0)
    # The learning rate rises linearly from 0 to lr over this many optimizer steps. A fresh Adam's first steps move
    # every weight by about lr whatever its gradient's size; measured on configs/adaptive.yaml's warmed-up student,
    # one such step at lr 1.5e-4 took training accuracy from 0.66 to 0.08. 0: the full lr from the first step.
    lr_warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(64, gt=0)  # rows per forward/backward on one rank (memory only)
    # Optimizer steps per pass over a rollout batch: the rows split into this many equal mini-batches, in order.
    mini_batches_per_step: int = Field(1, gt=0)
    threads: int = Field(1, gt=0)
    # The GPU path (ignored on CPU): bf16 weights and activations (fp32 master weights in the optimizer),
    # activation recomputation to fit long responses, and ZeRO offload to host memory: "optimizer" (ZeRO-2/3) or
    # "optimizer+params" (ZeRO-3 only). Attention is PyTorch SDPA, transformers' default.
    bf16: bool = False
    gradient_checkpointing: bool = False
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> "TrainerConfig":
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise ValueError("trainer.offload optimizer+params needs trainer.zero_stage 3 (ZeRO-2 keeps parameters "
                             "on every rank)")
        return self

    def zero_options(self) -> dict:
        """Extra keys of DeepSpeed's zero_optimization section for the offload chosen."""
        host = {"device": "cpu", "pin_memory": True}
        return {"optimizer": {"offload_optimizer": host},
                "optimizer+params": {"offload_optimizer": host, "offload_param": host}}.get(self.offload, {})


class CriticConfig(_Section):
    """PPO's critic (algorithm.advantage gae): a value model on its own DeepSpeed data-parallel ranks, started from
    the warm-up student's backbone with a fresh scalar head (rlhf/critic.py). Unused by the other estimators."""

    num_ranks: int = Field(2, gt=0)
    zero_stage: Literal[2, 3] = 2
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(64, gt=0)
    threads: int = Field(1, gt=0)


class AlgorithmConfig(_Section):
    """The RL algorithm: advantage estimator, clipped policy loss and its regularisers, reward shaping.

    The defaults are GRPO: group-normalised advantages, clipped token-mean policy loss, no entropy bonus, no
    dynamic sampling, no overlong penalty. Formulas are in rlhf/algorithms.py, one pure function per option.
    """

    steps: int = Field(60, ge=0)  # RL steps (one rollout batch each)
    # Passes over each rollout batch; optimizer steps per RL step = ppo_epochs x trainer.mini_batches_per_step.
    # With more than one, the PPO ratio's denominator is the trainer's log-probs before the batch's first update.
    ppo_epochs: int = Field(1, gt=0)
    # Truncated importance sampling: the policy-gradient term of each token is weighted by
    # min(exp(trainer log-prob before the update - rollout log-prob), tis_cap), correcting for tokens sampled by
    # a different policy (inference-engine numerics; older weights with rollout.asynchronous). None: off. 2 is usual.
    tis_cap: float | None = Field(None, gt=0)
    # How rewards become advantages (rlhf.algorithms.ADVANTAGE_ESTIMATORS):
    #   grpo: (r - group mean) / group std;  dr_grpo: r - group mean (pair with loss_aggregation dr-grpo);
    #   rloo: r - mean of the group's other samples;  reinforce_plus_plus: no group baseline, returns whitened
    #   over all response tokens of the batch;  reinforce_plus_plus_baseline: r - group mean, then whitened so;
    #   gae: PPO with a critic (section critic): GAE over token rewards (the reward on the last response token),
    #   with the gamma, lam, value_clip, whiten_advantages, kl_in_reward and critic_warmup_steps below.
    # The REINFORCE++ pair take the KL to the reference in the loss (kl_coef below), not in the reward as in
    # the paper: the reference log-probs are only computed on the trainer ranks, during the update.
    advantage: str = "grpo"
    # How per-token losses are averaged: token-mean (every token in the batch equal; DAPO), seq-mean (every
    # response equal, tokens averaged within it; original GRPO), dr-grpo (sum / (rows * max_new_tokens)).
    loss_aggregation: Literal["token-mean", "seq-mean", "dr-grpo"] = "token-mean"
    # PPO ratio clip range [1 - clip_low, 1 + clip_high]. clip_high > clip_low is DAPO's clip-higher (e.g. 0.28
    # over 0.2): room for unlikely tokens to grow, against entropy collapse.
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    # Weight of the per-token KL(policy || reference) in the loss (0: no reference model is loaded), and its
    # estimator: k1 = log ratio (unbiased, can be < 0), k2 = log ratio^2 / 2, k3 = exp(-lr) + lr - 1 (>= 0).
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # Entropy bonus, in loss units per nat of per-token entropy: loss_t = pg_t - entropy_coef * H_t + KL term.
    # Small values (1e-4 to 1e-3) when entropy collapses early; 0 adds nothing (and costs nothing).
    entropy_coef: float = Field(0.0, ge=0)
    # DAPO dynamic sampling: drop the groups whose rewards are all equal (zero advantage, no gradient) from the
    # update, and log their count as reward/dropped_groups. If the remaining rows do not divide by
    # trainer.num_ranks, the last informative groups are dropped too; a step with nothing left skips its update.
    # Useful once many prompts are always solved (or never): their groups would only dilute the loss.
    dynamic_sampling: bool = False
    # DAPO soft overlong punishment, added to the reward: 0 up to rollout.max_new_tokens - overlong_buffer
    # tokens, then falling linearly to -overlong_penalty at rollout.max_new_tokens. overlong_buffer in tokens,
    # 0 = off; overlong_penalty in reward units (1.0 = a verifier reward). reward/mean then includes it, and
    # reward/overlong_penalty logs its batch mean. Use when truncated answers are common (charts/truncated_rate).
    overlong_buffer: int = Field(0, ge=0)
    overlong_penalty: float = Field(1.0, ge=0)
    # PPO (advantage gae) only. GAE's discount and trace decay over response tokens: gamma = lam = 1 (the default,
    # as in veRL and OpenRLHF) makes the advantage the return minus the value, unbiased however rough the critic;
    # lam < 1 trusts the critic more (less variance, more bias).
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1)
    # Clip range of the value loss, in reward units, around the values the advantages were computed with (0: off).
    value_clip: float = Field(0.2, ge=0)
    # Whiten the GAE advantages over the batch's response tokens (mean 0, std 1) before the policy loss.
    whiten_advantages: bool = True
    # Where the KL to the reference goes: in the token rewards (-kl_coef * KL_t on every response token, k-estimator
    # kl_estimator, before GAE; the critic learns it too) instead of in the loss. Needs kl_coef > 0.
    kl_in_reward: bool = False
    # The first N RL steps train the critic alone (the policy is frozen, no weight sync), so the first policy
    # updates see values that already fit the warm-up student's returns rather than a random head.
    critic_warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _known_estimator(self) -> "AlgorithmConfig":
        if self.advantage not in (*ADVANTAGE_ESTIMATORS, "gae"):
            raise ValueError(f"unknown advantage estimator {self.advantage!r}: use "
                             f"{', '.join((*ADVANTAGE_ESTIMATORS, 'gae'))}")
        return self

    @model_validator(mode="after")
    def _ppo_options(self) -> "AlgorithmConfig":
        ppo = self.advantage == "gae"
        if not ppo and (self.kl_in_reward or self.critic_warmup_steps):
            raise ValueError("kl_in_reward and critic_warmup_steps are PPO options: set advantage gae")
        if ppo and self.dynamic_sampling:
            raise ValueError("dynamic_sampling drops groups of equal rewards, which only a group baseline ignores: "
                             "turn it off with advantage gae (the critic learns from those rows too)")
        if self.kl_in_reward and not self.kl_coef:
            raise ValueError("kl_in_reward needs kl_coef > 0 (the weight of the KL penalty in the reward)")
        if ppo and self.steps and self.critic_warmup_steps >= self.steps:
            raise ValueError(f"critic_warmup_steps={self.critic_warmup_steps} leaves no policy update in "
                             f"steps={self.steps}: make it smaller than steps")
        return self


class RoleResources(_Section):
    """What one actor of a role asks Ray for: CPUs, GPUs (fractions share a GPU) and custom node resources (e.g.
    ``{trainer_node: 1}`` to keep the role on the nodes started with ``ray start --resources='{"trainer_node": 8}'``)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = {}


class ClusterConfig(_Section):
    """Where the run's Ray actors go (rlhf/cluster.py).

    ``address``: ``local`` starts a private Ray in this process; ``auto`` joins the cluster ``ray start`` made on
    this node (or the one RAY_ADDRESS names, as under ``ray job submit``); ``host:port`` / ``ray://host:port`` join
    that one. Per role, what each actor asks for; unset roles keep the defaults that suit one machine: a trainer
    rank takes ``trainer.threads`` CPUs and one GPU when the cluster has a GPU per rank, a rollout worker one CPU
    (and one GPU when the trainer ranks take GPUs), a reward worker no reservation (it scores while the others
    wait). The reference model lives on the trainer ranks, beside the batch it scores, so it has no role here.
    """

    address: str = "local"
    connect_timeout_s: float = Field(30.0, gt=0)  # how long an unreachable address may take to fail
    placement_timeout_s: float = Field(120.0, gt=0)  # how long the trainer ranks may wait for their resources
    # PACK: trainer ranks on as few nodes as possible (fast collectives); SPREAD: spread if possible;
    # STRICT_PACK: all on one node; STRICT_SPREAD: each rank on its own node.
    trainer_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    trainer: RoleResources | None = None
    critic: RoleResources | None = None
    rollout: RoleResources | None = None
    reward: RoleResources | None = None

    @model_validator(mode="after")
    def _address_form(self) -> "ClusterConfig":
        a = self.address
        if a not in ("local", "auto") and not (":" in a and a.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"cluster.address must be local, auto, host:port or ray://host:port, not {a!r}")
        return self


class EvalConfig(_Section):
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(256, gt=0)


class RunConfig(_Section):
    """A whole run: what YAML files and ``dotted.key=value`` overrides fill (``load_config``), or build it in code,
    sections as dicts or section models: ``RunConfig(output_dir="runs/x", rollout={"prompts_per_step": 8})``."""

    output_dir: str = "runs/quickstart"
    seed: int = 0
    # In pipeline order; any subset runs: warmup -> label -> train_rm -> rl, with eval before and after rl.
    stages: list[Literal["warmup", "label", "train_rm", "rl", "eval"]] = ["warmup", "rl", "eval"]
    # Seconds any single remote call (generate, score, train, weight sync) may take before the run stops.
    call_timeout_s: float = Field(600.0, gt=0)
    # Times a rollout or reward worker whose process died is restarted (its unfinished work re-issued) within one
    # call before the run stops; 0 stops at the first death. Trainer ranks are never restarted in place.
    max_worker_restarts: int = Field(3, ge=0)
    # Checkpoint every N RL steps (0: only the final policy): policy, optimizer, driver and worker state, enough
    # for `distilrl run CONFIG --resume` to continue exactly (rlhf/resume.py). The newest keep_checkpoints are kept.
    save_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, gt=0)
    # Batches with a NaN or infinite reward, loss or gradient are skipped; this many in a row stop the run.
    max_bad_batches: int = Field(3, gt=0)
    # Also log metrics to Weights & Biases (needs the wandb package; offline unless WANDB_MODE says otherwise).
    # TensorBoard event files are written in output_dir/tensorboard either way.
    wandb: bool = False
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
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _batch_units_divide(self) -> "RunConfig":
        rows = self.rollout_rows
        critic = (("critic.num_ranks", self.critic.num_ranks),) if self.algorithm.advantage == "gae" else ()
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
    def _checkpoints_are_synchronous(self) -> "RunConfig":
        # A checkpoint taken while the next batch is already being generated would lose that batch's prompts on
        # resume (they are drawn, not yet trained on): exact resume needs the synchronous schedule for now.
        if self.rollout.asynchronous and self.save_every:
            raise ValueError("rollout.asynchronous does not take checkpoints yet: set save_every=0, or turn "
                             "asynchronous rollout off for a resumable run")
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
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
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
            message = "unknown key (check the spelling against rlhf/config.py)"
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
