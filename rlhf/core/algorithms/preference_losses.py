"""Offline preference optimisation on (chosen, rejected) pairs: DPO, IPO and SimPO as small pure functions, and
``PREFERENCE_LOSSES``, the registry ``dpo.loss`` names.

Inputs are per pair, (P,): a response's log-probability under the policy (and the reference), summed over its
tokens, or averaged for a length-normalised loss. The implicit reward of a response is beta * (log pi - log ref):
how much likelier the policy makes it than the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from rlhf.core.config.registry import Registry


def sequence_logprobs(token_logprobs: torch.Tensor, response_mask: torch.Tensor, rows: torch.Tensor | None = None,
                      count: int | None = None, average: bool = False) -> torch.Tensor:
    """Each sequence's log-probability: the sum (``average``: the mean) of its response tokens' log-probs.
    ``token_logprobs``, ``response_mask`` (B, L); ``rows`` (B, L) long numbers the sequence of each token where a
    row packs several (``count`` sequences in all); None: each row is one. Returns (sequences,); differentiable."""
    mask = response_mask.float()
    if rows is None:
        total, tokens = (token_logprobs * mask).sum(dim=1), mask.sum(dim=1)
    else:
        ids = rows.reshape(-1).long()
        total = token_logprobs.new_zeros(count).index_add(0, ids, (token_logprobs * mask).reshape(-1))
        tokens = mask.new_zeros(count).index_add(0, ids, mask.reshape(-1))
    return total / tokens.clamp(min=1.0) if average else total


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, offset: torch.Tensor | None = None) -> torch.Tensor:
    """DPO (Rafailov et al., 2023): -log sigmoid(beta * h - offset) per pair, with the log-ratio margin

        h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).

    The Bradley-Terry likelihood of the preference under the implicit reward. ``offset`` (P,): how far the chosen
    implicit reward must lead before the loss lets go (DPO with an offset, Amini et al., 2024): the teacher's
    margin times ``dpo.margin_weight``, so a clear preference pushes harder than a near tie. None: plain DPO.
    TRL's DPOTrainer ``sigmoid`` loss is the same formula (trl/trainer/dpo_trainer.py)."""
    logits = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    if offset is not None:
        logits = logits - offset
    return -F.logsigmoid(logits)


def ipo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float) -> torch.Tensor:
    """IPO (Azar et al., 2023): (h - 1 / (2 beta))^2 per pair, h the log-ratio margin of ``dpo_losses``.

    DPO's loss keeps falling as h grows, so on pairs it already separates it drives the rejected response's
    probability to 0 (over-fitting to deterministic preferences); IPO regresses h onto a finite target instead.
    Here on summed log-probs as in the paper (TRL averages them per token for its ``ipo`` loss)."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    return (h - 1.0 / (2.0 * beta)).square()


def simpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al., 2024): -log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma) per pair, on
    per-token *mean* log-probs and with no reference model.

    The mean makes the reward the one generation ranks by (likelihood per token), so a long response is not
    favoured for its length; gamma is a target margin between the two. No reference: half DPO's forwards."""
    return -F.logsigmoid(beta * (chosen - rejected) - gamma)


def with_sft_term(losses: torch.Tensor, chosen_per_token: torch.Tensor, weight: float) -> torch.Tensor:
    """RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization"): each pair's preference loss plus
    ``weight`` x the chosen response's negative log-likelihood, -``chosen_per_token``.

    On offline pairs DPO may lower the likelihood of the chosen response together with the rejected one as long as
    the gap between them grows ("likelihood displacement"); a small model then decodes neither. The NLL term keeps
    the chosen answers likely. ``chosen_per_token`` (P,): the chosen response's summed log-prob divided by the
    batch's mean chosen length, so that the mean over the batch's pairs is the mean log-prob over all its chosen
    tokens, as TRL's DPOTrainer takes it (``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, weight]``;
    ``rpo_alpha`` in older TRL; trl/trainer/dpo_trainer.py). Each pair's own mean instead weighs the tokens of a
    short answer most: on the quickstart it taught the student to answer "#N" and nothing else."""
    return losses - weight * chosen_per_token


@dataclass
class PreferenceInputs:
    """Per pair (P,): the policy's log-probs of the chosen and rejected responses, the reference's (None for a
    reference-free loss), summed or averaged as the loss declares; ``offset`` (P,) the required margin (or None);
    ``beta``, ``gamma`` from the config section ``dpo``."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    beta: float = 0.1
    gamma: float = 0.5
    offset: torch.Tensor | None = None

    def rewards(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The implicit rewards (chosen, rejected), detached: beta * (log pi - log ref), or beta * log pi without
        a reference; a pair is ranked right when the chosen one's is the larger."""
        if self.ref_chosen is None:
            return self.beta * self.chosen.detach(), self.beta * self.rejected.detach()
        return (self.beta * (self.chosen - self.ref_chosen).detach(),
                self.beta * (self.rejected - self.ref_rejected).detach())


@dataclass(frozen=True)
class PreferenceLoss:
    """``compute(inputs)`` -> loss per pair (P,). ``reference``: needs the reference model's log-probs;
    ``length_normalised``: its log-probs are per-token means, not sums."""

    compute: Callable[[PreferenceInputs], torch.Tensor]
    reference: bool = True
    length_normalised: bool = False


# ``dpo.loss`` names one of these.
PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")
PREFERENCE_LOSSES.register("dpo", PreferenceLoss(lambda i: dpo_losses(
    i.chosen, i.rejected, i.ref_chosen, i.ref_rejected, i.beta, i.offset)))
PREFERENCE_LOSSES.register("ipo", PreferenceLoss(lambda i: ipo_losses(
    i.chosen, i.rejected, i.ref_chosen, i.ref_rejected, i.beta)))
PREFERENCE_LOSSES.register("simpo", PreferenceLoss(lambda i: simpo_losses(i.chosen, i.rejected, i.beta, i.gamma),
                                                   reference=False, length_normalised=True))
