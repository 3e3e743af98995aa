"""A stand-in for the parts of vLLM 0.34 the vllm engine uses, on CPU: ``LLM`` (generate, collective_rpc,
reset_prefix_cache, sleep, wake_up and the weight-transfer calls of its RL mixin) and ``SamplingParams``, with the
wheel's parameter names (tests/rollout/test_vllm_signatures.py checks them against the real vLLM where it is importable)
and the behaviour the engine depends on, as read in the wheel's source:

- ``SamplingParams`` refuses a temperature outside [0, 2] and greedy sampling (temperature 0) with n > 1;
- with a seed, sample k of a request is drawn with seed + k (v1/engine/parallel_sampling.py);
- a completion that ends on one of ``stop_token_ids`` has finish reason ``stop`` (the stop id kept in its tokens),
  one cut at ``max_tokens`` ``length``; log-probs are the processed ones (after temperature);
- ``reload_weights`` and the transfer engine load HF names through the model's loader, which refuses a name the
  model does not have; a sleeping engine cannot generate, nor load weights before its weights are awake.

The model is the checkpoint loaded with transformers (float32). The ``fake`` transfer backend stands in for CUDA
IPC: ``update_weights`` carries names and keys into ``SHARED``, a table the sending side fills in this process.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SHARED: dict[int, torch.Tensor] = {}  # the "IPC handles": key -> tensor


class SamplingParams:
    def __init__(self, n: int = 1, *, temperature: float | None = 1.0, top_p: float | None = 1.0,
                 top_k: int | None = 0, seed: int | None = None, stop_token_ids: list[int] | None = None,
                 max_tokens: int | None = 16, logprobs: int | None = None, detokenize: bool = True):
        if temperature is not None and not 0.0 <= temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {temperature}.")
        if temperature == 0.0 and n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {n}.")
        if top_p != 1.0 or top_k not in (0, -1):  # this stand-in samples from the whole distribution only
            raise NotImplementedError("the stand-in vLLM does not apply top_p/top_k")
        self.n, self.temperature, self.seed = n, temperature, seed
        self.top_p, self.top_k, self.max_tokens, self.logprobs = top_p, top_k, max_tokens, logprobs
        self.stop_token_ids, self.detokenize = list(stop_token_ids or []), detokenize


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]]
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    instances: list["LLM"] = []  # every one built, for tests to look at

    def __init__(self, model: str, *, skip_tokenizer_init: bool = False, tensor_parallel_size: int = 1,
                 dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float | None = None, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = {"model": model, "skip_tokenizer_init": skip_tokenizer_init, "dtype": dtype, "seed": seed,
                       "tensor_parallel_size": tensor_parallel_size,
                       "gpu_memory_utilization": gpu_memory_utilization, **kwargs}
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, use_safetensors=True).eval()
        self.asleep: set[str] = set()
        self.calls: list[str] = []  # the engine-level calls, in order
        self.sampling: list[SamplingParams] = []  # every SamplingParams generate was given
        self.transfer_backend = (kwargs.get("weight_transfer_config") or {}).get("backend")
        self.weight_version: str | None = None
        self._updating = False
        LLM.instances.append(self)

    # ---------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None, mm_processor_kwargs=None) -> list[RequestOutput]:
        self.calls.append("generate")
        if self.asleep:
            raise RuntimeError(f"generate while {sorted(self.asleep)} asleep")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.sampling += params
        return [RequestOutput(p["prompt_token_ids"], [self._complete(p["prompt_token_ids"], sp, k)
                                                      for k in range(sp.n)]) for p, sp in zip(prompts, params)]

    def _complete(self, prompt: list[int], sp: SamplingParams, k: int) -> CompletionOutput:
        gen = torch.Generator().manual_seed(sp.seed + k) if sp.seed is not None else None
        rows, tokens, logprobs, reason = torch.tensor([prompt]), [], [], "length"
        for _ in range(sp.max_tokens):
            logits = self.model(rows).logits[0, -1].float()
            logp = torch.log_softmax(logits / (sp.temperature or 1.0), dim=-1)
            token = int(logp.argmax()) if sp.temperature == 0 else int(torch.multinomial(logp.exp(), 1,
                                                                                         generator=gen))
            tokens.append(token)
            logprobs.append({token: Logprob(float(logp[token]))})
            rows = torch.cat([rows, torch.tensor([[token]])], dim=1)
            if token in sp.stop_token_ids:
                reason = "stop"
                break
        return CompletionOutput(k, "", tokens, None, logprobs, reason, tokens[-1] if reason == "stop" else None)

    # ---------------------------------------------------------------------------------------------- weights

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None) -> list:
        self.calls.append(f"collective_rpc:{method}")
        if method != "reload_weights":
            raise NotImplementedError(method)
        self._load(kwargs["weights_iterator"])
        return [None]

    def _load(self, weights) -> None:
        if "weights" in self.asleep:
            raise RuntimeError("weights loaded while asleep")
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name not in params:  # vLLM's loader: a name the model does not have is a KeyError
                raise KeyError(name)
            params[name].data.copy_(tensor)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append("reset_prefix_cache")
        return True

    def sleep(self, level: int = 1, mode: str = "abort", reset_connector: bool = True):
        self.calls.append(f"sleep:{level}")
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(f"wake_up:{','.join(tags) if tags else 'all'}")
        self.asleep -= set(tags or ("weights", "kv_cache"))
        return True

    # The RL mixin (vllm/entrypoints/rl/offline.py): requests are dicts with init_info / update_info.

    def init_weight_transfer_engine(self, request) -> None:
        self.calls.append("init_weight_transfer_engine")
        if self.transfer_backend is None:
            raise RuntimeError("no weight_transfer_config: the engine has no transfer backend")
        self.init_info = request["init_info"]

    def start_weight_update(self) -> None:
        self.calls.append("start_weight_update")
        self._updating = True

    def update_weights(self, request) -> None:
        self.calls.append("update_weights")
        if not self._updating:
            raise RuntimeError("update_weights outside start/finish_weight_update")
        info = request["update_info"]
        self._load([(name, SHARED[key]) for name, key in zip(info["names"], info["handles"])])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append("finish_weight_update")
        self._updating = False
        if weight_version is not None:
            self.weight_version = weight_version


class FakeVLLM:
    """What ``rollout.vllm_engine._vllm()`` returns: the module's two names."""

    LLM = LLM
    SamplingParams = SamplingParams
