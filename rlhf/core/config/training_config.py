"""The training sections of the run config: the DeepSpeed engine settings every trainer shares (policy, critic,
reward model), the RL algorithm, and where the actors run (cluster). Part of the one config tree in rlhf/core/config/run_config.py, which re-exports them.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhf.core.algorithms.advantages import ADVANTAGE_ESTIMATORS
from rlhf.core.algorithms.policy_losses import POLICY_LOSSES


class _Section(BaseModel):
    # Every float must be finite: lr=inf or a NaN weight is accepted by YAML and would fail steps later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)  # a field's docstring is its description


class LoraSettings(_Section):
    """LoRA adapters (rlhf/core/models/lora.py, through peft): only the adapters train. On the policy (``model.lora``) the
    reference is the same model with them off, and rollout workers and exports get merged weights; on the critic
    (``critic.lora``) and the reward model (``reward_model.lora``) their heads train whole beside the adapters and
    a saved RM is merged. Setting any key turns LoRA on."""

    r: int = Field(8, gt=0)
    """Rank of the adapters' low-rank update."""
    alpha: float = Field(16.0, gt=0)
    """the adapters' output is scaled by alpha / r"""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input in training (0: none; the reference pass never uses it)."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], min_length=1)
    """Linear layers to adapt, by name (Qwen2/Llama: the attention and MLP projections)."""


class EngineConfig(_Section):
    """The DeepSpeed engine settings every trainer shares (the policy's, the critic's, the reward model's): the
    ``trainer``, ``critic`` and ``reward_model`` sections each hold these, with their own defaults."""

    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 also the parameters."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate (AdamW)."""
    lr_warmup_steps: int = Field(0, ge=0)
    """The learning rate rises linearly from 0 to lr over this many optimizer steps. A fresh Adam's first steps move
    every weight by about lr whatever its gradient's size; measured on configs/adaptive.yaml's warmed-up student,
    one such step at lr 1.5e-4 took training accuracy from 0.66 to 0.08. 0: the full lr from the first step."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm before each optimizer step."""
    micro_batch_size: int = Field(64, gt=0)
    """rows per forward/backward on one rank (memory only)"""
    threads: int = Field(1, gt=0)
    """Torch threads of each rank (they share the machine's cores with the other actors)."""
    bf16: bool = False
    """The GPU path (ignored on CPU): bf16 weights and activations (fp32 master weights in the optimizer), activation
    recomputation to fit long responses, and ZeRO offload to host memory: "optimizer" (ZeRO-2/3) or
    "optimizer+params" (ZeRO-3 only). Attention is PyTorch SDPA, transformers' default."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    """ZeRO offload to host memory: none, optimizer (ZeRO-2/3) or optimizer+params (ZeRO-3 only)."""
    zero_options: dict[str, Any] = {}
    """Further keys for DeepSpeed's zero_optimization section (bucket sizes, persistence thresholds, ...)."""

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> "EngineConfig":
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise ValueError("offload optimizer+params needs zero_stage 3 (ZeRO-2 keeps parameters on every rank)")
        return self

    def zero_section(self) -> dict:
        """DeepSpeed's zero_optimization section: the stage, the offload chosen, then ``zero_options``."""
        host = {"device": "cpu", "pin_memory": True}
        offload = {"optimizer": {"offload_optimizer": host},
                   "optimizer+params": {"offload_optimizer": host, "offload_param": host}}.get(self.offload, {})
        return {"stage": self.zero_stage, **offload, **self.zero_options}

    def optimizer_section(self) -> dict:
        """DeepSpeed's optimizer section: AdamW; torch's on the device, DeepSpeedCPUAdam (vectorised C++) where the
        optimizer state is offloaded to host memory (torch's AdamW on the CPU is several times slower there)."""
        return {"type": "AdamW", "params": {"lr": self.lr, "weight_decay": self.weight_decay, "betas": [0.9, 0.999],
                                            "eps": self.adam_eps, "torch_adam": self.offload == "none"}}


class RewardModelConfig(EngineConfig):
    """The distilled reward model: trained from the warm-up student's backbone on the labels, on DeepSpeed ranks."""

    path: str | None = None
    """use this trained RM instead of training one (stage train_rm then only evaluates)"""
    train_file: str | None = None
    """Your own preference data (TRL's pair layouts or scored responses, reward/model/preference_data.py), alone or
    mixed with the teacher's labels; held out: eval_file, else eval_fraction of train_file's prompts."""
    eval_file: str | None = None
    """Your own held-out preference data for the RM's evaluation."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of train_file's prompts held out when eval_file is not given."""
    use_reference: bool = True
    """Give the RM the dataset's reference answer beside the response (a reference-guided judge, as the teacher is).
    Off, a small RM must recompute the answer itself: on the quickstart task it then ranks pairs far worse."""
    scoring_precision: Literal["auto", "fp32", "bf16"] = "fp32"
    """What the reward workers score RL's rollouts in on a CPU, as trainer.precision is for the update: bf16
    autocast, or auto (bf16 where the CPU has bf16 units). On SmolLM2's RM 1.7x faster than fp32, scores within 0.09
    of fp32's (spread 1.5) and no order within a group changed (benchmarks/rm_scoring_precision.py); fp32 by default,
    where scores match the RM's own evaluation exactly. Ignored on a GPU."""
    num_ranks: int = Field(2, gt=0)
    """DeepSpeed data-parallel ranks (Ray actors) that train the RM."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate of the RM (AdamW)."""
    epochs: int = Field(3, gt=0)
    """Passes over the training pairs."""
    batch_size: int = Field(32, gt=0)
    """pairs per optimizer step"""
    max_length: int = Field(128, gt=0)
    """Tokens per (prompt, response) the RM reads; longer ones keep their end."""
    bt_weight: float = Field(1.0, ge=0)
    """Loss weights: Bradley-Terry on pairs (with the teacher's margin), regression of quality (0-1) and RV/CD (0-9) on
    the teacher's scores, and KL to the teacher's soft labels (or one-hot scores). Small weights on the 0-9 terms
    keep their larger squared errors from drowning the ranking signal."""
    quality_weight: float = Field(0.1, ge=0)
    """Weight of the quality regression term."""
    rv_weight: float = Field(0.01, ge=0)
    """Weight of the reasoning-verbosity (RV) regression term."""
    cd_weight: float = Field(0.01, ge=0)
    """Weight of the cognitive-difficulty (CD) regression term."""
    kl_weight: float = Field(0.02, ge=0)
    """Weight of the KL term to the teacher's soft RV/CD labels."""
    lora: LoraSettings | None = None
    """LoRA on the RM's backbone (its quality/RV/CD heads train whole); the saved RM is merged, a plain HF directory. A
    section of its own, not model.lora: the RM is a separate model whose size and budget are its own (a LoRA policy
    beside a small fully trained RM is common), and not in EngineConfig, which would give the policy's trainer
    section a second switch beside model.lora."""


class TrainerConfig(EngineConfig):
    """The policy trainer group: one DeepSpeed data-parallel rank per Ray actor."""

    num_ranks: int = Field(2, gt=0)
    """DeepSpeed data-parallel ranks (Ray actors) of the policy; rollout rows split evenly across them."""
    mini_batches_per_step: int = Field(1, gt=0)
    """Optimizer steps per pass over a rollout batch: the rows split into this many equal mini-batches, in order."""
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    """What the update computes in on a CPU (rlhf/core/models/precision.py): fp32; bf16, mixed precision (float32
    master weights, gradients and Adam state; forward and backward under bf16 autocast); auto, bf16 where
    /proc/cpuinfo lists bf16 units (avx512_bf16, amx_bf16: about 2x the fp32 GEMM rate), else fp32 (without them
    bf16 is emulated, far slower). fp32 by default: on the small models of the quickstart bf16 gains nothing and the
    update matches float32 references exactly. Ignored on a GPU (trainer.bf16 is its switch). perf/train_mfu is
    measured against the GEMM rate of the precision chosen."""


class CriticConfig(EngineConfig):
    """PPO's critic (algorithm.advantage gae): a value model on its own DeepSpeed data-parallel ranks, started from
    the warm-up student's backbone with a fresh scalar head (rlhf/rl/ranks/critic.py). Unused by the other estimators."""

    num_ranks: int = Field(2, gt=0)
    """DeepSpeed data-parallel ranks (Ray actors) of the critic."""
    lora: LoraSettings | None = None
    """LoRA on the value model's backbone (its head trains whole). Its own switch, not model.lora (see
    RewardModelConfig); set it beside model.lora for a large PPO run, where a fully trained critic's optimizer state
    would dwarf the LoRA policy's."""


class AlgorithmConfig(_Section):
    """The RL algorithm: advantage estimator, clipped policy loss and its regularisers, reward shaping.

    The defaults are GRPO: group-normalised advantages, clipped token-mean policy loss, no entropy bonus, no
    dynamic sampling, no overlong penalty. Formulas are in rlhf/core/algorithms/, one pure function per option.
    """

    steps: int = Field(60, ge=0)
    """RL steps (one rollout batch each)"""
    ppo_epochs: int = Field(1, gt=0)
    """Passes over each rollout batch; optimizer steps per RL step = ppo_epochs x trainer.mini_batches_per_step. With
    more than one, the PPO ratio's denominator is the trainer's log-probs before the batch's first update."""
    tis_cap: float | None = Field(None, gt=0)
    """Truncated importance sampling: the policy-gradient term of each token is weighted by min(exp(trainer log-prob
    before the update - rollout log-prob), tis_cap), correcting for tokens sampled by a different policy (inference-
    engine numerics; older weights with rollout.asynchronous). None: off. 2 is usual."""
    is_level: Literal["token", "sequence", "geometric"] = "token"
    """With tis_cap: where the sampling correction's ratio pi_trainer / pi_sampler is taken: per token, per sequence
    (the product of its tokens' ratios, on all of them) or per sequence as their geometric mean (length-normalised)
    (rlhf/core/algorithms/policy_losses.py off_policy_weights)."""
    is_mode: Literal["truncate", "mask"] = "truncate"
    """With tis_cap: truncate a weight above tis_cap to it (TIS), or mask: weight 0 where the ratio leaves
    [is_floor, tis_cap] and the ratio itself inside, dropping what the sampler got too wrong rather than capping it."""
    is_floor: float = Field(0.0, ge=0)
    """is_mode mask: the lowest ratio kept (0: no lower bound)."""
    advantage: str = "grpo"
    """How rewards become advantages (algorithms/advantages.py): grpo: (r - group mean) / group std;
    dr_grpo: r - group mean (pair with loss_aggregation dr-grpo); rloo: r - mean of the group's other samples;
    reinforce_plus_plus: no group baseline, returns whitened over all response tokens of the batch;
    reinforce_plus_plus_baseline: r - group mean, then whitened so; gae: PPO with a critic (section critic): GAE
    over token rewards (the reward on the last response token), with the gamma, lam, value_clip, whiten_advantages,
    kl_in_reward and critic_warmup_steps below. on_policy_distillation: no sequence advantage, only
    reward.components.teacher_kl's per-token term (which any estimator also takes beside its own:
    kl.distillation_advantages). The REINFORCE++ pair take the KL to the reference in their token rewards
    (kl_coef below; k1, as in the paper), computed from the reference log-probs before the update."""
    loss_aggregation: Literal["token-mean", "seq-mean", "dr-grpo"] = "token-mean"
    """How per-token losses are averaged: token-mean (every token in the batch equal; DAPO), seq-mean (every response
    equal, tokens averaged within it; original GRPO), dr-grpo (sum / (rows * max_new_tokens))."""
    clip_low: float = Field(0.2, ge=0)
    """PPO ratio clip range [1 - clip_low, 1 + clip_high]. clip_high > clip_low is DAPO's clip-higher (e.g. 0.28 over
    0.2): room for unlikely tokens to grow, against entropy collapse."""
    clip_high: float = Field(0.2, ge=0)
    """Upper clip of the PPO ratio (1 + clip_high); see clip_low."""
    policy_loss: str = "vanilla"
    """The per-token policy-gradient loss (rlhf/core/algorithms/policy_losses.py POLICY_LOSSES): vanilla = PPO's
    clipped surrogate (GRPO's); dual_clip = vanilla plus a cap of -A * dual_clip on tokens of negative advantage
    (veRL's default); gspo = one length-normalised importance ratio per sequence (needs loss_aggregation seq-mean;
    the paper clips at clip_low 3e-4, clip_high 4e-4); cispo = REINFORCE weighted by the ratio clipped to
    [1 - clip_low, 1 + clip_high] and held constant, so clipped tokens keep their gradient (clip_low 1: no lower
    bound, as MiniMax-M1)."""
    dual_clip: float = Field(3.0, gt=1)
    """policy_loss dual_clip: a token of negative advantage A loses at most -A * dual_clip, however far its ratio
    has grown, so stale or unlikely samples cannot dominate the batch."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the per-token KL(policy || reference) (0: no reference model is loaded), and its estimator in the
    loss: k1 = log ratio (unbiased, can be < 0), k2 = log ratio^2 / 2, k3 = exp(-lr) + lr - 1 (>= 0). A KL in the
    reward (kl_in_reward, REINFORCE++) is always k1: only k1's score-function gradient is KL's gradient."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """How the KL to the reference is estimated per token: k1 (log-ratio), k2 (half its square), k3 (unbiased, non-
    negative)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus, in loss units per nat of per-token entropy: loss_t = pg_t - entropy_coef * H_t + KL term. Small
    values (1e-4 to 1e-3) when entropy collapses early; 0 adds nothing (and costs nothing)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop the groups whose rewards are all equal (zero advantage, no gradient) from the
    update, and log their count as reward/dropped_groups. If the remaining rows do not divide by trainer.num_ranks,
    the last informative groups are dropped too; a step with nothing left skips its update. Useful once many prompts
    are always solved (or never): their groups would only dilute the loss."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO soft overlong punishment, added to the reward: 0 up to rollout.max_new_tokens - overlong_buffer tokens,
    then falling linearly to -overlong_penalty at rollout.max_new_tokens. overlong_buffer in tokens, 0 = off;
    overlong_penalty in reward units (1.0 = a verifier reward). reward/mean then includes it, and
    reward/overlong_penalty logs its batch mean. Use when truncated answers are common (charts/truncated_rate)."""
    overlong_penalty: float = Field(1.0, ge=0)
    """The penalty at rollout.max_new_tokens, in reward units (see overlong_buffer)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """PPO (advantage gae) only. GAE's discount and trace decay over response tokens: gamma = lam = 1 (the default, as
    in veRL and OpenRLHF) makes the advantage the return minus the value, unbiased however rough the critic; lam < 1
    trusts the critic more (less variance, more bias)."""
    lam: float = Field(1.0, ge=0, le=1)
    """GAE's trace decay lambda (see gamma)."""
    value_clip: float = Field(0.2, ge=0)
    """Clip range of the value loss, in reward units, around the values the advantages were computed with (0: off)."""
    whiten_advantages: bool = True
    """Whiten the GAE advantages over the batch's response tokens (mean 0, std 1) before the policy loss."""
    kl_in_reward: bool = False
    """gae: put the KL to the reference in the token rewards (-kl_coef * KL_t on every response token, k1, before GAE;
    the critic learns it too) instead of in the loss. Needs kl_coef > 0."""
    critic_warmup_steps: int = Field(0, ge=0)
    """The first N RL steps train the critic alone (the policy is frozen, no weight sync), so the first policy updates
    see values that already fit the warm-up student's returns rather than a random head."""

    @model_validator(mode="after")
    def _known_estimator(self) -> "AlgorithmConfig":
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(ADVANTAGE_ESTIMATORS.unknown(self.advantage))
        return self

    @model_validator(mode="after")
    def _importance_weights_fit(self) -> "AlgorithmConfig":
        if not self.tis_cap and (self.is_level != "token" or self.is_mode != "truncate" or self.is_floor):
            raise ValueError("is_level, is_mode and is_floor shape the sampling correction: set tis_cap (its upper "
                             "bound, e.g. 2) to turn it on")
        if self.tis_cap and self.is_floor >= self.tis_cap:
            raise ValueError(f"is_floor={self.is_floor} must be below tis_cap={self.tis_cap}")
        return self

    @model_validator(mode="after")
    def _known_policy_loss(self) -> "AlgorithmConfig":
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(POLICY_LOSSES.unknown(self.policy_loss))
        if POLICY_LOSSES[self.policy_loss].sequence_level and self.loss_aggregation != "seq-mean":
            raise ValueError(f"policy_loss {self.policy_loss} has one ratio per sequence and averages each "
                             f"sequence's tokens: set loss_aggregation: seq-mean, not {self.loss_aggregation}")
        return self

    @model_validator(mode="after")
    def _options_fit_the_estimator(self) -> "AlgorithmConfig":
        estimator = ADVANTAGE_ESTIMATORS[self.advantage]
        if self.kl_in_reward and not estimator.token_rewards:
            raise ValueError(f"kl_in_reward puts the KL in per-token rewards, which {self.advantage} does not take: "
                             f"use gae or reinforce_plus_plus(_baseline), or keep the KL in the loss")
        if self.critic_warmup_steps and not self.uses_critic:
            raise ValueError(f"critic_warmup_steps needs an estimator with a critic (gae), not {self.advantage}")
        if self.dynamic_sampling and not estimator.group_baseline:
            # Only a group baseline gives such groups advantage 0; a critic's values or returns whitened over the
            # batch give their rows advantages like any other's, so dropping them would change the update.
            raise ValueError(f"dynamic_sampling drops groups of equal rewards, whose rows {self.advantage} gives "
                             f"non-zero advantages: turn it off, or use grpo, dr_grpo or rloo")
        if self.kl_in_reward and not self.kl_coef:
            raise ValueError("kl_in_reward needs kl_coef > 0 (the weight of the KL penalty in the reward)")
        if self.uses_critic and self.steps and self.critic_warmup_steps >= self.steps:
            raise ValueError(f"critic_warmup_steps={self.critic_warmup_steps} leaves no policy update in "
                             f"steps={self.steps}: make it smaller than steps")
        return self

    @property
    def uses_critic(self) -> bool:
        return "critic" in ADVANTAGE_ESTIMATORS[self.advantage].needs

    @property
    def reward_kl(self) -> bool:
        """Whether the KL to the reference goes into the token rewards (always k1, kl.kl_reward) rather
        than into the loss: for estimators that need the reference (REINFORCE++), or where kl_in_reward asks."""
        needs = ADVANTAGE_ESTIMATORS[self.advantage].needs
        return self.kl_coef > 0 and ("reference" in needs or self.kl_in_reward)


class RoleResources(_Section):
    """What one actor of a role asks Ray for: CPUs, GPUs (fractions share a GPU) and custom node resources (e.g.
    ``{trainer_node: 1}`` to keep the role on the nodes started with ``ray start --resources='{"trainer_node": 8}'``)."""

    num_cpus: float = Field(1.0, ge=0)
    """CPUs one actor of the role reserves."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs one actor of the role reserves (a fraction shares a GPU)."""
    resources: dict[str, float] = {}
    """Custom Ray node resources one actor asks for, e.g. {trainer_node: 1}."""


class ClusterConfig(_Section):
    """Where the run's Ray actors go (rlhf/core/distributed/cluster.py).

    ``address``: ``local`` starts a private Ray in this process; ``auto`` joins the cluster ``ray start`` made on
    this node (or the one RAY_ADDRESS names, as under ``ray job submit``); ``host:port`` / ``ray://host:port`` join
    that one. Per role, what each actor asks for; unset roles keep the defaults that suit one machine: a trainer
    rank takes ``trainer.threads`` CPUs and one GPU when the cluster has a GPU per rank, a rollout worker one CPU
    (and one GPU when the trainer ranks take GPUs), a reward worker no reservation (it scores while the others
    wait). The reference model lives on the trainer ranks, beside the batch it scores, so it has no role here.
    """

    address: str = "local"
    """local (a private Ray in this process), auto (the cluster `ray start` made), or host:port / ray://host:port."""
    connect_timeout_s: float = Field(30.0, gt=0)
    """how long an unreachable address may take to fail"""
    placement_timeout_s: float = Field(120.0, gt=0)
    """how long the trainer ranks may wait for their resources"""
    trainer_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """PACK: trainer ranks on as few nodes as possible (fast collectives); SPREAD: spread if possible; STRICT_PACK: all
    on one node; STRICT_SPREAD: each rank on its own node."""
    trainer: RoleResources | None = None
    """What each policy trainer rank asks Ray for (unset: one machine's defaults)."""
    critic: RoleResources | None = None
    """What each critic rank asks Ray for."""
    rollout: RoleResources | None = None
    """What each rollout worker asks Ray for."""
    reward: RoleResources | None = None
    """What each reward worker asks Ray for."""

    @model_validator(mode="after")
    def _address_form(self) -> "ClusterConfig":
        a = self.address
        if a not in ("local", "auto") and not (":" in a and a.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"cluster.address must be local, auto, host:port or ray://host:port, not {a!r}")
        return self
