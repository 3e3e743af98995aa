"""The RolloutWorker Ray actor: holds a copy of the policy and samples responses from it.

After every trainer update the driver sends new weights with a version number; ``generate`` is told which
version the driver expects and refuses to sample from stale weights rather than silently training off-policy.
"""
from __future__ import annotations

import time

import torch

from rlhf.base.samples import Sample
from rollout.engine import generate


class StaleWeightsError(RuntimeError):
    pass


class RolloutWorker:
    def __init__(self, model_dir: str, threads: int, seed: int):
        from rlhf.base.models import load_student

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.model, self.tokenizer = load_student(model_dir)
        if torch.cuda.is_available():  # Ray shows the actor only the GPU it was given (cluster.rollout.num_gpus)
            self.model.to("cuda")
        self.model.eval()
        self.version = 0

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Install new policy weights; returns the seconds it took."""
        start = time.perf_counter()
        # Checked before loading: a refused state dict must leave the current weights whole (load_state_dict with
        # strict=False copies the keys that fit first, and raises a multi-line RuntimeError on a shape mismatch).
        own = self.model.state_dict()
        # Tied embeddings may appear under one name only; anything else missing means a wrong checkpoint.
        missing = [k for k in own if k not in state_dict and k != "lm_head.weight"]
        unexpected = [k for k in state_dict if k not in own]
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"weights do not fit the rollout model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]}")
        self.model.load_state_dict(state_dict, strict=False)
        self.version = version
        return time.perf_counter() - start

    def rng_state(self) -> dict:
        """The torch generators this worker samples with (a checkpoint stores them, so a resumed run draws the
        same samples as an uninterrupted one)."""
        from rlhf.base.resume import torch_rng_state

        return torch_rng_state()

    def set_rng_state(self, state: dict) -> None:
        from rlhf.base.resume import set_torch_rng_state

        set_torch_rng_state(state)

    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float, greedy: bool,
                 expected_version: int) -> list[Sample]:
        if self.version != expected_version:
            raise StaleWeightsError(f"rollout worker holds weights v{self.version}, driver expects v{expected_version}")
        return generate(self.model, self.tokenizer, prompts, n, max_new_tokens, temperature, greedy)
