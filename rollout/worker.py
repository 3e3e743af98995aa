"""The RolloutWorker Ray actor: holds the policy in a rollout engine (rollout/engines.py) and samples from it.

After every trainer update the driver sends new weights with a version number; ``generate`` is told which
version the driver expects and refuses to sample from stale weights rather than silently training off-policy.
"""
from __future__ import annotations

import time

import torch

from rlhf.base.config import RolloutConfig
from rlhf.base.resume import set_torch_rng_state, torch_rng_state
from rlhf.base.samples import Sample
from rollout.engines import ENGINES


class StaleWeightsError(RuntimeError):
    pass


class RolloutWorker:
    def __init__(self, model_dir: str, rollout: RolloutConfig, seed: int, engine: type | None = None):
        """``rollout``: the run's rollout section (engine, threads); ``seed``: this worker's own sampling seed;
        ``engine``: the engine class ``rollout.engine`` names, as the driver resolved it (by default looked up
        here)."""
        torch.set_num_threads(rollout.threads)
        torch.manual_seed(seed)
        self.engine = (engine or ENGINES[rollout.engine])(model_dir)
        self.tokenizer = self.engine.tokenizer
        self.version = 0

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Install new policy weights; returns the seconds it took."""
        start = time.perf_counter()
        self.engine.load_weights(state_dict)
        self.version = version
        return time.perf_counter() - start

    def rng_state(self) -> dict:
        """The torch generators this worker samples with (a checkpoint stores them, so a resumed run draws the
        same samples as an uninterrupted one)."""
        return torch_rng_state()

    def set_rng_state(self, state: dict) -> None:
        set_torch_rng_state(state)

    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float, greedy: bool,
                 expected_version: int) -> list[Sample]:
        if self.version != expected_version:
            raise StaleWeightsError(f"rollout worker holds weights v{self.version}, driver expects v{expected_version}")
        return self.engine.generate(prompts, n, max_new_tokens, temperature, greedy)
