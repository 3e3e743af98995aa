"""The config sections of the student and its data: the model, the task (prompts, answers, verifier), think blocks,
and held-out evaluation. Part of the one config tree in rlhf/core/config/run_config.py, which re-exports them.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rlhf.core.config.training_config import LoraSettings, _Section


class ModelConfig(_Section):
    """The student. Either a local Hugging Face directory, or a Qwen2 of the given size built with random weights."""

    model_name_or_path: str | None = None
    """A local Hugging Face model directory (safetensors) or a .gguf file; none: build a Qwen2 from the sizes below."""
    tokenizer: Literal["char", "qwen2.5"] = "char"
    """For a built student: char (a character-level tokenizer for the arithmetic task) or qwen2.5 (the Qwen2.5 BPE,
    rebuilt offline)."""
    hidden_size: int = Field(128, gt=0)
    """Built student only: the model width."""
    num_layers: int = Field(3, gt=0)
    """Built student only: transformer layers."""
    num_heads: int = Field(4, gt=0)
    """Built student only: attention heads (hidden_size must divide by it)."""
    num_kv_heads: int = Field(2, gt=0)
    """Built student only: key/value heads for grouped-query attention (num_heads must divide by it)."""
    intermediate_size: int = Field(512, gt=0)
    """Built student only: the MLP's inner width."""
    max_position_embeddings: int = Field(128, gt=0)
    """Built student only: the longest sequence (prompt + response) in tokens."""
    lora: LoraSettings | None = None
    """None: full fine-tuning"""

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        return self


class TaskConfig(_Section):
    """Where prompts come from: the synthetic arithmetic task, or a prompt dataset read with ``datasets``
    (``dataset``): a JSONL, JSON, Parquet or CSV file, or a directory written
    by ``save_to_disk``. ``*_prompts`` cap the pools. Dataset prompts are rendered with the chat template below;
    the arithmetic task's stay plain text (the warm-up trains on them so)."""

    name: Literal["arithmetic", "dataset"] = "arithmetic"
    """arithmetic: the built-in synthetic task; dataset: prompts from train_file (the old name jsonl is refused)."""
    train_prompts: int = Field(4000, gt=0)
    """Cap on the training prompt pool."""
    eval_prompts: int = Field(250, gt=0)
    """Cap on the held-out prompts."""
    train_file: str | None = None
    """The prompt dataset: a .jsonl/.json/.parquet/.csv file or a save_to_disk directory."""
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
    """The dataset column holding the prompt (text, or a list of chat messages)."""
    answer_field: str = "answer"
    """The dataset column holding the reference answer the verifier checks against."""
    difficulty_field: str | None = None
    """An optional column with each prompt's difficulty (per-difficulty figures, the adaptive reward's CD)."""
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
    compared by math-verify: 1/2 = 0.5 = \\frac{1}{2}), exact (the whole response), regex, last_number (the last number
    anywhere in the response: a chat model answering in a sentence)."""
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

    @field_validator("name", mode="before")
    @classmethod
    def _old_name(cls, value):
        if value == "jsonl":  # renamed: one word for a prompt dataset of any file format
            raise ValueError("jsonl is the old name of this task: write task.name: dataset")
        return value

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


class EvalConfig(_Section):
    max_new_tokens: int = Field(64, gt=0)
    """Longest greedy answer in held-out evaluation, in tokens."""
    batch_size: int = Field(256, gt=0)
    """Held-out prompts generated at once."""
    every: int = Field(0, ge=0)
    """RL steps between held-out evaluations during RL, a learning curve (0: before and after RL only); each is
    logged as eval/* at its step and listed in summary.json's eval_curve."""
