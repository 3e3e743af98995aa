"""Stand-ins for the actor groups an RLStep is built from, so the RL step runs in-process on hand-made samples."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from rlhf.core.data.samples import Sample
from rlhf.rl.step import RLStep
from rlhf.rl.update import PolicyUpdate


class StubPolicy:
    """The trainer group: records each batch; the reference's log-probs are -1 (rollout's are -0.5)."""

    def __init__(self):
        self.batches = []

    def train_step(self, batch):
        self.batches.append(batch)
        return {"losses/policy_loss": 0.0}

    def reference_logprobs(self, batch):
        return torch.full(batch.input_ids.shape, -1.0)  # rollout log-probs are -0.5: k1 KL = 0.5 per token

    def policy_logprobs(self, batch):
        return torch.full(batch.input_ids.shape, -0.5)  # the trainer's, here the sampler's own


class StubCritic:
    """The critic group: values 0.25 everywhere; records each batch."""

    def __init__(self):
        self.batches = []

    def values(self, batch):
        return torch.full(batch.input_ids.shape, 0.25)

    def train_step(self, batch):
        self.batches.append(batch)
        return {"losses/value_loss": 0.0}


class StubRollout:
    """The rollout group: the given samples for any prompts; ``sync`` bumps the version and counts."""

    def __init__(self, samples: list[Sample], version: int = 0):
        self.samples, self.version, self.synced, self.restarts = samples, version, 0, 0

    def generate(self, prompts, n, greedy):
        return self.samples

    def collect(self, launched):
        return self.samples

    def sync(self, version=None):
        self.synced += 1
        self.version += 1


class StubReward:
    def __init__(self, rewards: list[float]):
        self.rewards, self.restarts = rewards, 0

    def score(self, rows, samples):
        return [{"reward": r, "correct": r > 0, "answered": True, "parts": {"verifier": r, "brevity": 0.5}}
                for r in self.rewards]


def char_tokenizer(text: str, add_special_tokens: bool = False) -> SimpleNamespace:
    """One token per character: what the loop's length figures need of a tokenizer."""
    return SimpleNamespace(input_ids=list(text))


def samples_of(lengths: list[int], n: int = 2) -> list[Sample]:
    """Prompt one token (7), responses of the given lengths (token 5), sampling log-prob -0.5 per token."""
    return [Sample(i // n, [7], [5] * length, [-0.5] * length, "stop", "x") for i, length in enumerate(lengths)]


def stub_loop(cfg, rewards: list[float], lengths: list[int], critic=None, version: int = 0) -> RLStep:
    """An RLStep over stand-ins: ``loop.update.policy.batches`` holds what the trainer got,
    ``loop.rollout.synced`` the syncs."""
    n = cfg.rollout.samples_per_prompt
    update = PolicyUpdate(cfg, 0, StubPolicy(), critic)
    return RLStep(cfg, char_tokenizer, StubRollout(samples_of(lengths, n), version),
                  StubReward(rewards), update)
