"""Rollout engines behind one registry (``rollout.engine``): what a RolloutWorker samples with.

An engine is built as ``Engine(model_dir, rollout)`` (the run's rollout section: dtype, vLLM's memory share...),
holds the policy, samples ``n`` responses per prompt with the sampler's token log-probs and finish reasons
(``Sample``), and loads new weights (all or none: a refused state dict leaves the current weights whole). The
RolloutWorker keeps the version and times each call. ``hf_compact`` (the default) and ``hf`` hold the policy as a
transformers model (CPU and GPU): our decode loop that drops finished rows, and Hugging Face ``generate``;
``vllm`` (rollout/vllm_engine.py, optional) is vLLM on a GPU. A new engine is one class with this interface in
its own module plus one ``ENGINES.register`` line; tests/rollout/test_engine_contract.py is the check every engine
passes.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from rlhf.core.config.run_config import RolloutConfig
from rlhf.core.models.build import load_student
from rlhf.core.config.registry import Registry
from rlhf.core.data.samples import Sample
from rollout.engine import generate, generate_compacting


class RolloutEngine(Protocol):
    tokenizer: object

    # top_p / top_k: None takes the run's rollout.top_p / rollout.top_k; an engine without them samples untruncated
    # (the policy server then refuses requests that set them).
    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                 greedy: bool, top_p: float | None = None, top_k: int | None = None) -> list[Sample]: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...


# rollout.dtype -> the dtype the engine holds its weights in (log-probs are float32 whatever it is).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

ENGINES: Registry = Registry("rollout engine")


def check_fits(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise a one-line ValueError unless ``state_dict`` has exactly the ``expected`` names and shapes (the HF
    checkpoint layout; tied embeddings may come under one name only, so lm_head.weight may be missing)."""
    missing = [k for k in expected if k not in state_dict and k != "lm_head.weight"]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(v.shape)} vs {expected[k]}" for k, v in state_dict.items()
              if k in expected and tuple(v.shape) != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"weights do not fit the rollout model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]}")


@ENGINES.register("hf")
class HFEngine:
    """The policy as a transformers model in this process, sampled with ``generate`` (rollout/engine.py)."""

    top_p, top_k = 1.0, 0  # rollout.top_p / rollout.top_k: what generate truncates to unless told otherwise
    interruptible = False  # whether generate takes stop_early (a decode loop of our own: partial rollouts)

    def __init__(self, model_dir: str, rollout: RolloutConfig | None = None):
        rollout = rollout or RolloutConfig()
        self.top_p, self.top_k = rollout.top_p, rollout.top_k
        self.model, self.tokenizer = load_student(model_dir)
        self.model.to(DTYPES[rollout.dtype])
        if torch.cuda.is_available():  # Ray shows the actor only the GPU it was given (cluster.rollout.num_gpus)
            self.model.to("cuda")
        self.model.eval()

    @classmethod
    def from_model(cls, model, tokenizer) -> "HFEngine":
        """An hf engine around a model already loaded in this process, as it is (dtype, device): for serving a
        model a script holds (rlhf/serve/policy_server.py's ``make_server((model, tokenizer))``)."""
        engine = cls.__new__(cls)
        engine.model, engine.tokenizer = model.eval(), tokenizer
        return engine

    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                 greedy: bool, top_p: float | None = None, top_k: int | None = None) -> list[Sample]:
        return generate(self.model, self.tokenizer, prompts, n, max_new_tokens, temperature, greedy,
                        self.top_p if top_p is None else top_p, self.top_k if top_k is None else top_k)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        # Checked before loading: a refused state dict must leave the current weights whole (load_state_dict with
        # strict=False copies the keys that fit first, and raises a multi-line RuntimeError on a shape mismatch).
        check_fits(state_dict, {k: tuple(v.shape) for k, v in self.model.state_dict().items()})
        self.model.load_state_dict(state_dict, strict=False)  # copies into the model's own dtype and device

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the engine samples with, as CPU tensors (for checks that a sync arrived bit for bit)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


@ENGINES.register("hf_compact")
class CompactingHFEngine(HFEngine):
    """The hf engine's model, sampled by our own decode loop (rollout/engine.py ``generate_compacting``): one prefill
    per prompt for its n samples, and finished rows out of the batch and the KV cache. The default engine: faster
    where responses differ in length, as fast where they do not."""

    interruptible = True  # takes stop_early: partial rollouts (rollout/partial.py)

    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                 greedy: bool, top_p: float | None = None, top_k: int | None = None,
                 stop_early: Callable[[], bool] | None = None) -> list[Sample]:
        return generate_compacting(self.model, self.tokenizer, prompts, n, max_new_tokens, temperature, greedy,
                                   self.top_p if top_p is None else top_p, self.top_k if top_k is None else top_k,
                                   stop_early)
