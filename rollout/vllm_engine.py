"""The ``vllm`` rollout engine: vLLM inside the rollout actor, on its GPU(s). Optional (``pip install
'distilrl[vllm]'``): vLLM is imported only when an engine is built, so the package works without it.

Written against the vLLM 0.34.0 wheel's source (``vllm.LLM``; the arguments and sampling parameters are built in
rollout/vllm_params.py, tested against a stand-in with the same signatures, tests/fake_vllm.py). The student in
``rollout.dtype`` with prefix caching on, ``rollout.gpu_memory_utilization`` of the GPU and
``rollout.tensor_parallel_size`` GPUs (vLLM's own worker processes on the GPUs Ray gave this actor); prompts go in
as token ids and responses are decoded here, with the student's own tokenizer. The sampler's log-prob of each token
comes from vLLM with ``logprobs_mode="processed_logprobs"``: after temperature, as the trainer scores it.

New weights arrive two ways. Through the object store (``load_weights``): a state dict, checked all-or-nothing
against the checkpoint's names and shapes (a tied checkpoint has no ``lm_head.weight``: the trainer's copy of the
embedding is dropped, vLLM ties the two itself) and loaded by every worker's ``reload_weights``. Or through vLLM's
own weight transfer engine (``rollout.weight_sync: broadcast``): CUDA IPC handles from the trainer rank on the same
GPU (``ipc``) or an NCCL broadcast that every tensor-parallel worker joins (``nccl``), bucket by bucket; the trainer
side drives ``init_weight_transfer_engine`` once, then ``start_weight_update``, ``update_weights`` and
``finish_weight_update`` per sync (rlhf/core/distributed/weight_sync.py). Either way the prefix cache is reset
after (its KV entries came from the old weights).

With ``rollout.sleep_between_rollouts`` (a trainer on the same GPU) the engine sleeps after each generate (level 1:
weights to host memory, KV cache freed), wakes only its weights to take a sync and everything to generate, and logs
the GPU's free memory at each transition (rlhf/core/distributed/colocate.py).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from rlhf.core.config.run_config import RolloutConfig
from rlhf.core.data.samples import Sample
from rlhf.core.distributed.colocate import log_transition
from rlhf.core.models.build import load_tokenizer
from rlhf.core.models.safetensors_dir import check_weights
from rollout import vllm_params
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


def _vllm():
    """The vllm module (``LLM``, ``SamplingParams``); tests put their stand-in here."""
    import vllm

    return vllm


@ENGINES.register("vllm")
class VLLMEngine:
    def __init__(self, model_dir: str, rollout: RolloutConfig | None = None):
        rollout = rollout or RolloutConfig()
        reason = vllm_missing()
        if reason:
            raise RuntimeError(f"rollout.engine vllm: {reason}; or use rollout.engine=hf")
        self._start(model_dir, rollout, _vllm())

    def _start(self, model_dir: str, rollout: RolloutConfig, vllm) -> None:
        if rollout.tensor_parallel_size == 1:
            # The engine core in this process: load_weights hands it tensors without a copy between processes.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        check_weights(model_dir, "rollout model")
        self.vllm = vllm
        self.tokenizer = load_tokenizer(model_dir)
        self.top_p, self.top_k = rollout.top_p, rollout.top_k
        self.expected = checkpoint_shapes(model_dir)
        self.stop_ids = vllm_params.stop_token_ids(model_dir, self.tokenizer.eos_token_id)
        self.sleeps = rollout.sleep_between_rollouts
        self.memory_log: list[str] = []  # the GPU's free memory at each sleep/wake transition
        self.llm = vllm.LLM(**vllm_params.llm_kwargs(model_dir, rollout, int(torch.initial_seed() % 2**31),
                                                     rollout.weight_transfer))
        self.asleep: bool | str = False
        self._sleep()

    @classmethod
    def with_vllm(cls, model_dir: str, rollout: RolloutConfig, vllm) -> "VLLMEngine":
        """An engine over the given vllm module (a stand-in in tests), without the CUDA check."""
        engine = cls.__new__(cls)
        engine._start(model_dir, rollout, vllm)
        return engine

    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                 greedy: bool, top_p: float | None = None, top_k: int | None = None) -> list[Sample]:
        encoded = [p if isinstance(p, list) else self.tokenizer(p, add_special_tokens=False).input_ids
                   for p in prompts]  # token ids as is (multi-turn rollouts)
        base = int(torch.randint(0, vllm_params.base_seed_bound(len(prompts), n), ()).item())
        kwargs, copies = vllm_params.sampling_kwargs(
            len(prompts), n, max_new_tokens, temperature, greedy, self.stop_ids, base,
            self.top_p if top_p is None else top_p, self.top_k if top_k is None else top_k)
        params = [self.vllm.SamplingParams(**k) for k in kwargs]
        self._wake(None)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        self._sleep()
        samples = []
        for index, (ids, output) in enumerate(zip(encoded, outputs)):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                # logprobs=0 returns the sampled token's own entry at each position.
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
                sample = Sample(index, ids, tokens, logprobs, vllm_params.finish_reason(completion.finish_reason),
                                self.tokenizer.decode(tokens, skip_special_tokens=True))
                samples += [sample] + [copy.copy(sample) for _ in range(copies - 1)]
        return samples

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        state_dict = vllm_params.without_tied_head(state_dict, self.expected)
        check_fits(state_dict, self.expected)
        self._wake(["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items()),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV entries were computed by the old weights

    # vLLM's weight transfer engine, driven from the trainer side (the VLLMWeightSyncClient protocol).

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self._wake(["weights"])
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)
        self.llm.reset_prefix_cache()

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError("the vllm engine keeps its weights in vLLM's fused layout")

    def _sleep(self) -> None:
        if self.sleeps and self.asleep is not True:
            self.llm.sleep(level=1)
            self.asleep = True
            log_transition("vllm asleep", self.memory_log)

    def _wake(self, tags: list[str] | None) -> None:
        """Wake what the next call needs: the weights to take a sync (the KV cache stays freed), everything to
        generate. Remembers what is still asleep."""
        if not self.asleep:
            return
        if tags == ["weights"]:
            if self.asleep is True:
                self.llm.wake_up(tags=["weights"])
                self.asleep = "kv_cache"
                log_transition("vllm weights awake", self.memory_log)
            return
        self.llm.wake_up(tags=["kv_cache"] if self.asleep == "kv_cache" else None)
        self.asleep = False
        log_transition("vllm awake", self.memory_log)
