"""A rollout sample as every layer sees it: what the rollout engines return and the trainer batches are built from."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sample:
    prompt_index: int          # index into the prompts of the call (the whole call, across workers)
    prompt_ids: list[int]
    response_ids: list[int]    # includes the end-of-sequence token when the model produced one
    logprobs: list[float]      # sampler's log-prob of each response token (at the sampling temperature)
    finish_reason: str         # "stop" (end-of-sequence) or "length" (hit max_new_tokens); multi-turn adds
                               # "max_turns" and "tool_error"
    text: str                  # the response decoded, special tokens dropped
    # Multi-turn trajectories (rollout/multi_turn.py): the response is model turns and environment observations.
    loss_mask: list[int] | None = None  # per response token: 1 sampled by the policy, 0 an observation's
    final_text: str | None = None       # the last model turn, what the verifier reads (None: the whole text)
    episode: dict | None = None         # turns, tool_calls, tool_errors, tool_s
    # Partial rollouts (rollout/partial.py): the weights version each response token was sampled from.
    token_versions: list[int] | None = None

    @property
    def verified_text(self) -> str:
        """What a verifier reads: a multi-turn trajectory's final model turn, else the whole response."""
        return self.text if self.final_text is None else self.final_text
