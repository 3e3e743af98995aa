"""The ``vllm`` rollout engine: vLLM inside the rollout actor, on its GPU(s). Optional (``pip install
'distilrl[vllm]'``): vLLM is imported only when an engine is built, so the package works without it.

Written against vLLM 0.34 (``vllm.LLM``): the student in ``rollout.dtype`` with prefix caching on,
``rollout.gpu_memory_utilization`` of the GPU and ``rollout.tensor_parallel_size`` GPUs; prompts go in as token
ids and responses are decoded here, with the student's own tokenizer (vLLM never loads one). The sampler's log-prob
of each token comes from vLLM with ``logprobs_mode="processed_logprobs"``: after temperature, the distribution the
token was drawn from, as the trainer scores it. New weights load in place through the workers' ``reload_weights``
(the model's own ``load_weights``: HF names in, vLLM's fused layout inside), after the same all-or-nothing shape
check as the hf engine, and the prefix cache is reset (its KV entries came from the old weights). With
``rollout.sleep_between_rollouts`` (a trainer on the same GPU) the engine sleeps after each generate (level 1:
weights to CPU, KV cache freed) and wakes the weights to load a sync, the KV cache to generate.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rlhf.core.config.run_config import RolloutConfig
from rlhf.core.models.build import load_tokenizer
from rlhf.core.data.samples import Sample
from rollout.engines import ENGINES, check_fits


def checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the model directory's safetensors files (read from their headers)."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def vllm_missing() -> str | None:
    """Why the vllm engine cannot run here (None when it can)."""
    if not torch.cuda.is_available():
        return "the vllm engine needs a CUDA GPU and torch sees none"
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        return f"vllm is not installed ({err}): pip install 'distilrl[vllm]'"
    return None


@ENGINES.register("vllm")
class VLLMEngine:
    def __init__(self, model_dir: str, rollout: RolloutConfig | None = None):
        rollout = rollout or RolloutConfig()
        reason = vllm_missing()
        if reason:
            raise RuntimeError(f"rollout.engine vllm: {reason}; or use rollout.engine=hf")
        if rollout.tensor_parallel_size == 1:
            # The engine core in this process: load_weights hands it tensors without a copy between processes.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.tokenizer = load_tokenizer(model_dir)
        self.top_p, self.top_k = rollout.top_p, rollout.top_k
        self.expected = checkpoint_shapes(model_dir)
        self.sleeps = rollout.sleep_between_rollouts
        self.llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype=rollout.dtype,
                       enable_prefix_caching=True, gpu_memory_utilization=rollout.gpu_memory_utilization,
                       tensor_parallel_size=rollout.tensor_parallel_size, logprobs_mode="processed_logprobs",
                       enable_sleep_mode=self.sleeps, seed=int(torch.initial_seed() % 2**31),
                       max_model_len=_max_positions(model_dir))
        self.asleep = False
        self._sleep()

    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                 greedy: bool, top_p: float | None = None, top_k: int | None = None) -> list[Sample]:
        from vllm import SamplingParams

        self._wake(None)
        encoded = [p if isinstance(p, list) else self.tokenizer(p, add_special_tokens=False).input_ids
                   for p in prompts]  # token ids as is (multi-turn rollouts)
        eos = self.tokenizer.eos_token_id
        # processed_logprobs (see __init__): the log-probs after temperature and top-k/top-p, what was sampled from.
        params = SamplingParams(n=n, temperature=0.0 if greedy else temperature,
                                top_p=self.top_p if top_p is None else top_p,
                                top_k=self.top_k if top_k is None else top_k,
                                max_tokens=max_new_tokens, logprobs=0, stop_token_ids=[eos], detokenize=False,
                                seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        samples = []
        for index, (ids, output) in enumerate(zip(encoded, outputs)):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                # logprobs=0 returns the sampled token's own entry at each position.
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
                reason = "stop" if tokens and tokens[-1] == eos else "length"
                samples.append(Sample(index, ids, tokens, logprobs, reason,
                                      self.tokenizer.decode(tokens, skip_special_tokens=True)))
        self._sleep()
        return samples

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        check_fits(state_dict, self.expected)
        self._wake(["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items()),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV entries were computed by the old weights
        self._sleep()

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError("the vllm engine keeps its weights in vLLM's fused layout")

    def _sleep(self) -> None:
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self, tags: list[str] | None) -> None:
        """Wake what the next call needs: the weights to load a sync (the KV cache stays freed), everything to
        generate. Remembers what is still asleep."""
        if not self.asleep:
            return
        if tags == ["weights"]:
            self.llm.wake_up(tags=["weights"])
            self.asleep = "kv_cache"
            return
        self.llm.wake_up(tags=["kv_cache"] if self.asleep == "kv_cache" else None)
        self.asleep = False


def _max_positions(model_dir: str) -> int:
    with open(Path(model_dir) / "config.json") as f:
        return int(json.load(f).get("max_position_embeddings", 2048))
