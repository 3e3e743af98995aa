"""Qwen students: built at a size from the config (random weights) or loaded from a local Hugging Face directory."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from rlhf.char_tokenizer import build_char_tokenizer
from rlhf.checkpoint import atomic_dir
from rlhf.config import ModelConfig


class ModelLoadError(ValueError):
    """A model directory that cannot be used, with a one-line message saying why and what to do."""


def build_tokenizer(kind: str):
    if kind == "char":
        return build_char_tokenizer()
    if kind == "qwen2.5":
        from rlhf.qwen_tokenizer import load_qwen2_5_tokenizer

        return load_qwen2_5_tokenizer()
    raise ValueError(f"unknown tokenizer {kind!r}: use char or qwen2.5")


def build_student(cfg: ModelConfig, tokenizer, seed: int) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2ForCausalLM of the configured size, its vocabulary matching the tokenizer."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def load_student(path: str | Path) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from a local directory (safetensors only, no remote code)."""
    path = check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot load the model in {path} ({_one_line(err)}): check its files") from None
    return model, load_tokenizer(path)


def check_model_dir(path: str | Path) -> Path:
    """A one-line ``ModelLoadError`` for a directory that is not a safetensors ``save_pretrained`` directory."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist: set model.model_name_or_path to a local "
                             f"Hugging Face directory, or leave it empty to build a student from model.* sizes")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json: is it a Hugging Face save_pretrained dir?")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"model directory {path} has no .safetensors weights (only safetensors are loaded)")
    return path


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a local model directory, with a pad token (its end-of-sequence token when it has
    none, as Llama tokenizers do: batched sampling and training pad their rows)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"cannot load the tokenizer in {path} ({_one_line(err)}): check its files") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"the tokenizer in {path} has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


def save_student(model: PreTrainedModel, tokenizer, path: str | Path) -> None:
    """Save model and tokenizer in Hugging Face format (safetensors), atomically."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
