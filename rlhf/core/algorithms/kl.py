"""The KL to the reference (in the loss or in the reward) and on-policy distillation's per-token term."""
from __future__ import annotations

import torch

from rlhf.core.algorithms.tokens import masked_mean


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1, k2, k3).

    k1 is unbiased but can be negative; k3 is unbiased and non-negative, which is why GRPO uses it in the loss.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # Clamp before exp: a token the reference finds vastly likelier would otherwise overflow to inf.
        neg = (-log_ratio).clamp(max=20.0)
        return neg.exp() - neg - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2 or k3")


def kl_reward(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
              kl_coef: float) -> torch.Tensor:
    """The KL to the reference as a per-token reward, ``-kl_coef * (log pi - log ref)`` on response tokens (k1).

    Always k1 here, whatever ``kl_estimator`` the loss uses: a reward enters the gradient through the score
    function, E[r * grad log pi], and only k1 makes that the gradient of KL(pi || ref). With k3 in the reward the
    expected gradient is that of KL(pi || ref) - KL(ref || pi), about 0 near the reference: it barely regularises
    (tests/rlhf/core/algorithms/test_algorithms.py measures both on a small categorical)."""
    return -kl_coef * (logprobs - ref_logprobs) * response_mask.float()


def distillation_advantages(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                            response_mask: torch.Tensor, weight: float) -> torch.Tensor:
    """On-policy distillation's per-token advantage, added to whatever the estimator gives:

        A_t = weight * (r_t - mean_batch(r)),   r_t = log p_teacher(x_t) - log p_student(x_t)

    at each sampled token x_t (minus the reverse KL), the mean over every response token of the batch.

    Discount 0: a token is credited with its own log-ratio only. Summed into a return-to-go (as a per-token reward
    in REINFORCE++ or GAE), the log-ratios of the tokens after it, negative on average, make every extra token a
    penalty: responses shrank from 14 to 6 tokens in benchmarks/onpolicy_distillation.py. The batch mean is a
    baseline, which leaves the expected gradient as it is (E[grad log p_student(x_t)] = 0) and removes the push
    down on every sampled token that the mean log-ratio (about -0.6) gave: uncentred, the gradient norm was 10x
    GRPO's, all of it noise. Returns (B, L), 0 off the response."""
    mask = response_mask.float()
    log_ratio = (teacher_logprobs - student_logprobs) * mask
    return weight * (log_ratio - masked_mean(log_ratio, mask)) * mask
