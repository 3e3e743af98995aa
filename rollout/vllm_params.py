"""What the vllm engine asks vLLM 0.34 for, as plain data: the ``LLM`` constructor's arguments, one set of
sampling parameters per prompt, and how its outputs read back. Pure functions, so they are tested on every CI run
against a stand-in ``LLM`` (tests/fake_vllm.py) whose signatures a test checks against the real vLLM where it is
installed; rollout/vllm_engine.py turns them into vLLM objects.

Checked against the vLLM 0.34.0 wheel's source: ``SamplingParams`` refuses a temperature above 2 and greedy
sampling (temperature 0) with ``n`` > 1; with a seed, the ``n`` samples of one request are drawn with seeds
``seed, seed + 1, ..., seed + n - 1`` (v1/engine/parallel_sampling.py), so the seeds of a call's prompts are spaced
``n`` apart: two prompts never share a sample's noise. ``max_model_len`` bounds the KV cache vLLM must be able to
hold for one sequence at start; the model's whole context (128k for some) fails there at a low memory share.
"""
from __future__ import annotations

import json
from pathlib import Path

from rlhf.core.config.run_config import RolloutConfig
from rlhf.core.distributed.cluster import VLLM_MAX_TEMPERATURE  # SamplingParams: "temperature must be in [0, 2]"
SEED_RANGE = 2**31 - 1  # vLLM seeds are int32-sized


def model_config(model_dir: str) -> dict:
    with open(Path(model_dir) / "config.json") as f:
        return json.load(f)


def is_tied(model_dir: str) -> bool:
    """Whether the checkpoint's output layer is its embedding matrix (Qwen2.5-0.5B/1.5B/3B): such a checkpoint has
    no ``lm_head.weight``, and vLLM's model ties the two itself."""
    return bool(model_config(model_dir).get("tie_word_embeddings", False))


def without_tied_head(state_dict: dict, expected: dict) -> dict:
    """``state_dict`` less ``lm_head.weight`` where the checkpoint (``expected``: its names) has none because the
    model is tied: the trainer's full state dict carries both names for the one tensor, vLLM loads the embedding."""
    if "lm_head.weight" in state_dict and "lm_head.weight" not in expected:
        return {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    return state_dict


def stop_token_ids(model_dir: str, tokenizer_eos: int | None) -> list[int]:
    """Every id that ends a response: the tokenizer's end-of-sequence and the generation config's ``eos_token_id``
    (an int or a list: Qwen2.5's instruct models end turns with <|im_end|> and <|endoftext|>)."""
    ids = [] if tokenizer_eos is None else [tokenizer_eos]
    path = Path(model_dir) / "generation_config.json"
    if path.exists():
        extra = json.loads(path.read_text()).get("eos_token_id")
        ids += extra if isinstance(extra, list) else [] if extra is None else [extra]
    return list(dict.fromkeys(int(i) for i in ids))


def max_model_len(model_dir: str, rollout: RolloutConfig) -> int:
    """The longest sequence vLLM must hold: ``rollout.max_model_len`` (the run fills it with the prompt bound plus
    the longest response it asks for), within the model's context."""
    context = int(model_config(model_dir).get("max_position_embeddings", 2048))
    wanted = rollout.max_model_len
    if wanted is None:
        return min(context, DEFAULT_MODEL_LEN)
    if wanted > context:
        raise ValueError(f"rollout.max_model_len {wanted} exceeds the model's context of {context} tokens")
    return wanted


# Without a prompt bound (task.max_prompt_tokens unset): enough for GSM8K-sized prompts and responses, and a KV
# cache vLLM can hold at a small memory share; set rollout.max_model_len for longer rows.
DEFAULT_MODEL_LEN = 4096


def llm_kwargs(model_dir: str, rollout: RolloutConfig, seed: int, transfer_backend: str | None) -> dict:
    """Keyword arguments of ``vllm.LLM`` (named parameters, or ``EngineArgs`` fields it passes on)."""
    kwargs = {
        "model": model_dir, "skip_tokenizer_init": True, "load_format": "safetensors", "dtype": rollout.dtype,
        "seed": seed,
        "enable_prefix_caching": True, "gpu_memory_utilization": rollout.gpu_memory_utilization,
        "tensor_parallel_size": rollout.tensor_parallel_size, "logprobs_mode": "processed_logprobs",
        "enable_sleep_mode": rollout.sleep_between_rollouts, "max_model_len": max_model_len(model_dir, rollout),
    }
    if rollout.tensor_parallel_size > 1:
        # vLLM's own worker processes on the GPUs Ray gave this actor (CUDA_VISIBLE_DEVICES): its ray executor would
        # ask Ray for a second placement of GPUs this actor already holds.
        kwargs["distributed_executor_backend"] = "mp"
    if transfer_backend is not None:
        kwargs["weight_transfer_config"] = {"backend": transfer_backend}
    return kwargs


def prompt_seeds(base: int, prompts: int, n: int) -> list[int]:
    """One seed per prompt, ``n`` apart from ``base``: vLLM draws a prompt's samples with seeds seed .. seed + n - 1,
    so every sample of the call has its own. ``base`` comes from the worker's generator (seeded from the run's seed
    and checkpointed), so a resumed run draws the same samples."""
    if base < 0 or base + prompts * n > SEED_RANGE:
        raise ValueError(f"base seed {base} leaves no room for {prompts} x {n} seeds")
    return [base + i * n for i in range(prompts)]


def base_seed_bound(prompts: int, n: int) -> int:
    """The exclusive upper bound to draw ``prompt_seeds``' base from."""
    return SEED_RANGE - prompts * n


def sampling_kwargs(prompts: int, n: int, max_new_tokens: int, temperature: float, greedy: bool,
                    stop_ids: list[int], base: int, top_p: float = 1.0, top_k: int = 0) -> tuple[list[dict], int]:
    """(``SamplingParams`` keyword arguments for each prompt, copies of each result to return). Greedy decoding
    asks vLLM for one sample (it refuses n > 1 at temperature 0) and repeats it ``n`` times: they would be equal."""
    if not greedy and temperature > VLLM_MAX_TEMPERATURE:
        raise ValueError(f"the vllm engine samples at temperatures up to {VLLM_MAX_TEMPERATURE:g} (vLLM's limit), "
                         f"not {temperature:g}: lower rollout.temperature or use rollout.engine=hf")
    # processed_logprobs (llm_kwargs): the log-probs after temperature and top-k/top-p, what was sampled from.
    common = {"top_p": top_p, "top_k": top_k, "max_tokens": max_new_tokens, "logprobs": 0,
              "stop_token_ids": list(stop_ids), "detokenize": False}
    if greedy:
        return [{**common, "n": 1, "temperature": 0.0} for _ in range(prompts)], n
    return [{**common, "n": n, "temperature": temperature, "seed": seed}
            for seed in prompt_seeds(base, prompts, n)], 1


def finish_reason(vllm_reason: str | None) -> str:
    """vLLM's finish reason as a Sample's: ``stop`` on any stop id (the generation config's extra end-of-sequence
    ids included), ``length`` at the token cap or the model length."""
    return "stop" if vllm_reason == "stop" else "length"
