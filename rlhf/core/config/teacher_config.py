"""The config sections of the teacher-driven stages: warm-up SFT, teacher traces, and labelling for the distilled
reward model. Part of the one config tree in rlhf/core/config/run_config.py, which re-exports them.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rlhf.core.config.endpoint import Endpoint, refuse_renamed
from rlhf.core.config.training_config import LoraSettings, _Section


# The endpoint keys before they became one Endpoint section (label.endpoint, traces.endpoint).
_OLD_ENDPOINT_KEYS = {"base_url": "endpoint.url", "model": "endpoint.model", "api_key_env": "endpoint.api_key_env",
                      "concurrency": "endpoint.concurrency", "timeout_s": "endpoint.timeout_s",
                      "max_retries": "endpoint.max_retries"}


class WarmupConfig(_Section):
    """Supervised distillation of the teacher's solutions into the student before RL."""

    steps: int = Field(300, ge=0)
    """Optimizer steps of the warm-up (0 with traces_file: epochs passes instead)."""
    batch_size: int = Field(64, gt=0)
    """Examples per warm-up optimizer step."""
    lr: float = Field(2e-3, gt=0)
    """The warm-up's learning rate (AdamW)."""
    terse_fraction: float | list[float] = 0.6
    """Share of teacher solutions written as a bare answer; the rest show their running totals. A mixture, so the
    student knows both ways to answer and RL has a real choice to learn: when to write the steps out. A number: the
    same share at every level; a list: shares at evenly spaced levels from the easiest to the hardest, linear in
    between ([0.4, 0.0]: falling steadily; one per level: exactly those), like a reasoning teacher that writes more
    steps on harder problems."""
    tool_fraction: float = Field(0.0, ge=0, le=1)
    """Share of teacher solutions that hand the chain to the calculator tool (``<call>calculator 7+5-3</call>``,
    the result, then ``#9``; observations carry no loss): for rollout.environment calculator."""
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
    """traces_file's response column."""
    messages_field: str = "messages"
    """traces_file's chat column (OpenAI messages); the assistant turns are trained on."""
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
    lora: LoraSettings | None = None
    """SFT on traces with LoRA adapters (only they train), merged into the student at the end: the student that
    later stages load is a plain model. Unset: full fine-tuning."""

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
    compatible chat endpoint (``endpoint``)."""
    response_field: str = "answer"
    """dataset teacher: the column holding the responses already in the data."""
    model_path: str | None = None
    """hf teacher: a local causal-LM directory that writes the traces."""
    endpoint: Endpoint | None = None
    """openai teacher: the chat endpoint (url, model, api_key_env, timeout_s, max_retries, concurrency)."""
    prompts: int = Field(1000, gt=0)
    """training prompts to write traces for"""
    samples_per_prompt: int = Field(1, gt=0)
    """Responses the teacher writes per prompt."""
    temperature: float = Field(0.7, ge=0)
    """The teacher's sampling temperature."""
    max_new_tokens: int = Field(512, gt=0)
    """Longest trace the teacher writes, in tokens."""
    verbosity: Literal["auto", "low", "medium", "high"] = "auto"
    """auto: the teacher's own; low/medium/high: an instruction in the system prompt (oracle: its verbosity 0/1/2)."""
    scores: Literal["rule", "teacher"] = "rule"
    """Where RV and CD come from: rule (RV: reasoning length, chars_per_rv characters a point; CD: task's
    difficulty_field scaled by difficulty_range, else the reasoning steps of the prompt's correct traces) or teacher
    (label.teacher's judge: oracle, hf or openai)."""
    chars_per_rv: float = Field(40.0, gt=0)
    """rule scores: characters of reasoning per RV point."""
    difficulty_range: tuple[float, float] | None = None
    """rule scores: the dataset difficulty mapped to CD 0 and 9."""
    curriculum: Literal["none", "matched", "low", "medium", "high"] = "matched"
    """Selection per CD bin: none keeps every correct trace; matched/low/medium/high as warmup.curriculum."""
    keep: float = Field(0.5, gt=0, le=1)
    """share of each CD bin's correct traces kept"""
    keep_unverified: bool = True
    """keep traces with no reference to check (when no judge says they are wrong)"""

    @model_validator(mode="before")
    @classmethod
    def _old_endpoint_keys(cls, data):
        return refuse_renamed("traces", data, _OLD_ENDPOINT_KEYS)


class LabelConfig(_Section):
    """Labelling for the distilled RM: student samples (and teacher solutions) judged by the teacher."""

    teacher: str = "oracle"
    """reward.teachers.TEACHERS: oracle, reference (rules against the reference solution), hf (a local LLM judge),
    openai (an endpoint)"""
    teacher_model_path: str | None = None
    """hf: a local causal-LM directory used as the judge"""
    endpoint: Endpoint | None = None
    """openai judge: the chat endpoint (url, model, api_key_env, timeout_s, max_retries, concurrency)."""
    prompts: int = Field(600, gt=0)
    """training prompts to label"""
    eval_prompts: int = Field(150, gt=0)
    """held-out prompts labelled for the RM's evaluation"""
    samples_per_prompt: int = Field(8, gt=0)
    """Student samples per labelled prompt (pairs are formed within a prompt's samples)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the labelled student samples."""
    max_new_tokens: int = Field(56, gt=0)
    """Longest labelled student sample in tokens."""
    teacher_solutions: bool = True
    """add the teacher's own worked solutions beside the student's samples"""
    verifier: str | None = None
    """teacher reference (rule-based, reward/teachers/reference.py): the verifier (task.verifier's names; default
    task.verifier) and the reasoning characters per RV point (as traces.chars_per_rv)."""
    chars_per_rv: float = Field(40.0, gt=0)
    """reference teacher: characters of reasoning per RV point."""

    @model_validator(mode="before")
    @classmethod
    def _old_endpoint_keys(cls, data):
        return refuse_renamed("label", data, _OLD_ENDPOINT_KEYS)

    @model_validator(mode="after")
    def _teacher_settings(self) -> "LabelConfig":
        if self.teacher == "hf" and not self.teacher_model_path:
            raise ValueError("teacher hf needs label.teacher_model_path")
        if self.teacher == "openai" and not (self.endpoint and self.endpoint.model):
            raise ValueError("teacher openai needs label.endpoint with a url and a model")
        return self
