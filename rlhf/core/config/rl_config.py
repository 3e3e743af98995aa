"""The config sections RL samples and rewards by: rollout (engine, batch units, sampling) and reward (components,
the adaptive-thinking reward, audits, remote endpoints). Part of the one config tree in rlhf/core/config/run_config.py,
which re-exports them.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rlhf.core.config.endpoint import Endpoint, refuse_renamed
from rlhf.core.config.training_config import _Section


class MultiTurnConfig(_Section):
    """The limits of multi-turn rollouts (``rollout.environment``; rollout/multi_turn.py) and of each tool call
    (rollout/environments/sandbox.py). Each limit ends a trajectory with its own finish reason."""

    max_turns: int = Field(4, gt=0)
    """Model turns per trajectory; one still calling tools after this many ends with finish reason max_turns."""
    max_total_tokens: int = Field(128, gt=0)
    """Tokens after the prompt per trajectory, model turns and observations together (each turn is also capped by
    rollout.max_new_tokens); a trajectory over it ends with finish reason length."""
    max_tool_seconds: float = Field(10.0, gt=0)
    """Tool time per trajectory; past it the trajectory ends with finish reason tool_error."""
    max_tool_errors: int = Field(3, gt=0)
    """Failed tool calls (unreadable call, hang, crash, flood) per trajectory that end it with finish reason
    tool_error."""
    tool_seconds: float = Field(2.0, gt=0)
    """Wall-clock (and CPU) limit of one tool call; a call past it is killed and answered with an error."""
    tool_memory_mb: int = Field(256, ge=64)
    """Address-space limit of one tool call's process, in MB."""
    tool_output_bytes: int = Field(2000, gt=0)
    """Output limit of one tool call; more is an error observation, not a truncation."""
    tool_error_reward: float = 0.0
    """Per-turn shaping of the tool environments: added to a trajectory's reward for each tool call that failed
    (e.g. -0.1; 0: off). Any environment may shape turns the same way, with a turn_reward in its StepResult info."""


class RolloutConfig(_Section):
    """How the rollout workers sample: the engine and its dtype, batch units, length and temperature, weight sync."""

    engine: str = "hf_compact"
    """What the rollout workers sample with (rollout/engines.py ENGINES): hf_compact, our decode loop over the
    transformers model that drops finished rows (2-2.5x hf on the quickstart's rollouts, the same on fixed-length
    ones); hf_static, the same loop over a key/value cache allocated once per call with fused sampling
    (rollout/static_engine.py: no per-token cache copy, for real models' small batches); hf, Hugging Face generate,
    which also applies the checkpoint's saved generation config; vllm, vLLM on a GPU (optional extra,
    rollout/vllm_engine.py). README "Choosing a rollout engine"."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The dtype the engine holds the policy in. bfloat16 pays on CPUs with fast bf16 matmuls (AVX512-BF16, AMX) and on
    GPUs; log-probs are float32 from its logits either way, the mismatch with the trainer's is logged as
    perf/logprob_mismatch, and algorithm.tis_cap defaults to 2 in that mode (set it to null to turn it off)."""
    weight_sync: Literal["object_store", "broadcast"] = "object_store"
    """How new weights reach the workers after an update: object_store, trainer rank 0's full state dict through Ray's
    object store (any layout); broadcast, a torch.distributed group of trainer rank 0 and the workers (gloo on CPU,
    NCCL on GPU) in buckets of sync_bucket_mb, ZeRO-3 parameters gathered one at a time."""
    sync_bucket_mb: float = Field(64.0, gt=0)
    """broadcast weight sync: the size of each bucket of weights sent at once."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vllm engine only: the share of the GPU's memory vLLM takes (weights + KV cache; lower it where the trainer
    shares the GPU), GPUs per worker for tensor parallelism, and whether to release that memory between rollouts
    (sleep/wake) for a trainer on the same GPU."""
    tensor_parallel_size: int = Field(1, gt=0)
    """vllm engine only: GPUs each rollout worker's vLLM shards the policy over."""
    sleep_between_rollouts: bool = False
    """vllm engine only: release vLLM's GPU memory between rollouts (sleep/wake) for a trainer on the same GPU."""
    max_model_len: int | None = Field(None, gt=0)
    """vllm engine only: the longest prompt + response vLLM holds (its KV cache must fit one at start). Unset: the
    run fills it with task.max_prompt_tokens + the longer of rollout and eval max_new_tokens, else 4096 within the
    model's context."""
    weight_transfer: Literal["ipc", "nccl"] | None = None
    """vllm engine with weight_sync broadcast: vLLM's own transfer backend, chosen at start from the placement (ipc
    where trainer and rollout share GPUs, nccl across GPUs); a value set here must match that choice."""
    num_workers: int = Field(1, gt=0)
    """Rollout worker actors; a step's prompts split evenly across them (a prompt's samples stay together)."""
    prompts_per_step: int = Field(16, gt=0)
    """Prompts per RL step (batch unit 1)."""
    samples_per_prompt: int = Field(8, gt=1)
    """Responses sampled per prompt, the group GRPO normalises over (batch unit 2)."""
    max_new_tokens: int = Field(48, gt=0)
    """Longest response in tokens; longer ones are cut and counted as truncated."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of RL rollouts (log-probs are of the tempered distribution)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: each token is drawn from the fewest most likely tokens whose probability reaches top_p (1: no
    truncation). The sampler's log-probs are those of the truncated distribution; the trainer's recomputed ones are
    not truncated, so the difference shows in perf/logprob_mismatch and algorithm.tis_cap corrects for it."""
    top_k: int = Field(0, ge=0)
    """Each token is drawn from the top_k most likely tokens only (0: no limit); log-probs as for top_p."""
    threads: int = Field(2, gt=0)
    """Torch threads of each rollout worker."""
    asynchronous: bool = False
    """One-step-off asynchronous rollout: while the trainer updates on batch k the rollout workers already generate
    batch k+1 (up to max_staleness batches ahead) from the weights they hold, which are then max_staleness updates
    behind. Logged as perf/staleness; pair it with algorithm.tis_cap to correct for the older sampler. Overlap needs
    cores for both at once: num_workers x threads + trainer.num_ranks x trainer.threads <= cores."""
    max_staleness: int = Field(1, ge=0)
    """Batches generated ahead when asynchronous (their weights' lag, in updates; 0: none ahead, the synchronous
    schedule through the asynchronous path). With partial_rollouts, the bound on each trained token's age: tokens
    sampled more than this many updates before the one that trains on them carry no loss."""
    partial_rollouts: bool = False
    """Fully asynchronous rollout (with asynchronous): generation never waits for an update; new weights reach a
    rollout worker in the middle of a batch, are installed between two decoding steps, and the unfinished responses
    continue from them (rollout/partial.py), each token's weights version recorded. Logged: perf/staleness (mean
    per token), perf/staleness_max, perf/stale_tokens_masked, charts/versions_per_response. Needs weight_sync
    object_store and single-turn rollouts; an engine with our own decode loop (hf_compact, hf_static): on hf and
    vllm the run says so at start and runs one-step-off asynchronous rollout instead."""
    environment: str = "none"
    """The multi-turn environment each sample is a trajectory in (rollout/environments/ ENVIRONMENTS: calculator,
    the arithmetic task with a calculator tool; tools, the calculator and a Python sandbox; or one a script
    registers); none: one response per sample. Token ids in and out, observations masked out of the loss. README
    "Agents: tools and multi-turn"."""
    multi_turn: MultiTurnConfig = MultiTurnConfig()
    """The limits of multi-turn rollouts and of their tool calls (with ``environment``)."""

    @model_validator(mode="after")
    def _partial_rollouts_fit(self) -> "RolloutConfig":
        if not self.partial_rollouts:
            return self
        for wrong, why in ((not self.asynchronous, "it is a mode of asynchronous rollout: set rollout.asynchronous=true"),
                           (self.weight_sync != "object_store", "weights reach the workers mid-batch through the "
                            "object store only: set rollout.weight_sync=object_store"),
                           (self.environment != "none", "multi-turn trajectories are not continued across weight "
                            "swaps: set rollout.environment=none")):
            if wrong:
                raise ValueError(f"rollout.partial_rollouts: {why}")
        return self


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


class RewardRefreshConfig(_Section):
    """On-policy refresh of the distilled RM during RL (rlhf/rl/rm_refresh.py): when a trigger fires, the teacher
    labels a budgeted sample of the latest rollouts, the RM trains on them (with a replay of its original pairs) on
    its own DeepSpeed ranks, and the new weights reach the reward workers with a version number (``rm/version``),
    unless a held-out slice of the new labels says the RM got worse: then it is rolled back."""

    enabled: bool = False
    """Refresh the distilled RM during RL when a trigger below fires (the rm component, scored in the reward
    workers; not with reward.rm_endpoint)."""
    on_alarm: bool = True
    """Trigger: a teacher audit's alarm (agreement below reward.audit_warn_below; needs reward.audit_every)."""
    agreement_below: float | None = Field(None, ge=0, le=1)
    """Trigger: an audit's RM-teacher agreement below this (needs reward.audit_every); null: off."""
    every: int = Field(0, ge=0)
    """Trigger: every this many RL steps, audited or not; 0: off."""
    min_gap: int = Field(1, gt=0)
    """RL steps at least between two refreshes."""
    teacher_calls: int = Field(64, gt=1)
    """Teacher judgments per refresh, one per response: whole groups of rollout.samples_per_prompt responses, paired
    within each group as in labelling."""
    recent_steps: int = Field(1, gt=0)
    """The refresh draws its groups from the rollouts of this many latest RL steps."""
    replay_fraction: float = Field(0.5, ge=0, lt=1)
    """Share of the refresh's training pairs replayed from the RM's original labels (output_dir/labels/train), so
    that it does not forget them; none where the run has no such labels. The rest are the pairs of every group
    judged in this run's refreshes so far."""
    held_out_fraction: float = Field(0.25, gt=0, lt=1)
    """Share of the freshly labelled groups kept out of training to check the refreshed RM: its agreement with the
    teacher on them and on earlier refreshes' held-out groups must not fall, or the refresh is rolled back (weights
    and optimizer state) and logged."""
    epochs: int = Field(2, gt=0)
    """Passes over the refresh's pairs, reward_model.batch_size pairs per optimizer step at reward_model.lr."""


class RewardConfig(_Section):
    """What RL is rewarded by: a weighted sum of components. ``verifier``: the rule check of the final answer
    against the reference; ``rm``: the distilled reward model's quality score (from ``reward_model``); ``seqcls``:
    any ``AutoModelForSequenceClassification`` reward model's score (``seqcls_path``, e.g. one trained by TRL's
    RewardTrainer); ``custom``: a Python function, ``custom_fn`` or passed from a script
    (``rlhf.Trainer(cfg, reward_fn=...)``); ``adaptive``: reasoning length fitted to difficulty, for correct
    answers (``reward.adaptive``)."""

    num_workers: int = Field(1, gt=0)
    """Reward worker actors; a step's samples split evenly across them."""
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
    """The adaptive-thinking component's settings: reasoning verbosity (RV) fitted to cognitive difficulty (CD)."""
    teacher_model_path: str | None = None
    """teacher_kl (on-policy distillation): the teacher, a local causal LM with the student's tokenizer, whose log-prob
    of every sampled token, minus the sampler's, is a per-token advantage term; and its Ray workers."""
    teacher_workers: int = Field(1, gt=0)
    """teacher_kl with a local teacher: its log-prob worker actors."""
    teacher_endpoint: Endpoint | None = None
    """Or a remote teacher: an OpenAI-compatible completions endpoint that echoes prompt log-probs (vLLM serves one),
    with its model name and the environment variable holding its key. It must use the student's tokenizer."""
    rm_endpoint: Endpoint | None = None
    """Score the rm component on a reward server (``distilrl serve-rm``) instead of in the reward workers; its
    api_key_env holds the server's bearer token."""
    correct: float = 1.0
    """Verifier reward for a correct final answer, and for a response without a parseable answer."""
    unparseable: float = 0.0
    """Verifier reward for a response without a parseable final answer."""
    audit_every: int = Field(0, ge=0)
    """Teacher audits during RL: every N steps (0: never) the teacher re-judges a sample of fresh rollouts and the RM-
    teacher agreement is logged; below the threshold a warning says the policy may be hacking the RM."""
    audit_samples: int = Field(64, gt=1)
    """Rollouts the teacher re-judges at each audit (whole groups)."""
    audit_warn_below: float = Field(0.8, ge=0, le=1)
    """RM-teacher pairwise agreement below which an audit raises the alarm (audit/alarm)."""
    audit_stop_on_alarm: bool = False
    """end the RL stage at an audit below audit_warn_below (then eval, save, report)"""
    refresh: RewardRefreshConfig = RewardRefreshConfig()
    """On-policy refresh of the distilled RM when audits say it drifts, or on a schedule (off by default)."""

    @model_validator(mode="before")
    @classmethod
    def _old_endpoint_keys(cls, data):
        return refuse_renamed("reward", data, {"teacher_url": "teacher_endpoint.url",
                                               "teacher_model": "teacher_endpoint.model",
                                               "teacher_api_key_env": "teacher_endpoint.api_key_env",
                                               "rm_url": "rm_endpoint.url", "rm_token_env": "rm_endpoint.api_key_env"})

    @model_validator(mode="after")
    def _some_component(self) -> "RewardConfig":
        if not any(w != 0 for w in self.components.values()):
            raise ValueError("reward.components needs at least one non-zero weight (verifier, rm, seqcls, custom)")
        if self.components.get("teacher_kl") and not (self.teacher_model_path or self.teacher_endpoint):
            raise ValueError("reward.components uses teacher_kl: set reward.teacher_model_path to the teacher's "
                             "directory (a causal LM with the student's tokenizer), or reward.teacher_endpoint")
        if self.teacher_endpoint and not self.teacher_endpoint.model:
            raise ValueError("reward.teacher_endpoint needs a model (the model name the server knows)")
        if self.components.get("seqcls") and not self.seqcls_path:
            raise ValueError("reward.components uses seqcls: set reward.seqcls_path to its model directory")
        return self

    @field_validator("custom_fn")
    @classmethod
    def _function_spec(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("must read module.path:function or path/to/file.py:function")
        return value
