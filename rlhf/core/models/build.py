"""Qwen students: built at a size from the config (random weights) or loaded from a local Hugging Face directory."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from rlhf.core.models.char_tokenizer import build_char_tokenizer
from rlhf.core.checkpoints.atomic import atomic_dir
from rlhf.core.config.run_config import ModelConfig
from rlhf.core.models.safetensors_dir import ModelLoadError, check_weights, load_pretrained


def build_tokenizer(kind: str):
    if kind == "char":
        return build_char_tokenizer()
    if kind == "qwen2.5":
        from rlhf.core.models.qwen_tokenizer import load_qwen2_5_tokenizer

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


def resolve_model_path(name: str | Path, key: str = "model.model_name_or_path") -> Path:
    """A local directory as it is; a hub name (``Qwen/Qwen2.5-0.5B-Instruct``) that is not one resolves to its
    snapshot in the local Hugging Face cache, as transformers finds it (HF_HOME / HF_HUB_CACHE honoured), never
    downloading. A hub name not in the cache is a one-line ModelLoadError."""
    path = Path(name)
    text = str(name)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise ModelLoadError(f"{key}: {text} is neither a local directory nor in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}): set hub.offline=false to let the run download it, "
                             f"download it there first (huggingface-cli download {text}) or give a local "
                             f"directory") from None


def check_model_dir(path: str | Path, key: str = "model.model_name_or_path", kind: str = "ForCausalLM") -> Path:
    """Cheap checks of a Hugging Face directory before anything loads it (or starts actors that would): it
    exists, its config.json is JSON naming an architecture ending in ``kind`` (when it names one), and its weights
    are safetensors only (``safetensors_dir.check_weights``). Raises a one-line ModelLoadError naming ``key``."""
    path = resolve_model_path(path, key)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist: set {key} to a local Hugging Face directory"
                             + (", or leave it empty to build a student from model.* sizes"
                                if key == "model.model_name_or_path" else ""))
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json: is it a Hugging Face save_pretrained dir?")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON ({_one_line(err)})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} holds a JSON {type(config).__name__}, not the object "
                             f"save_pretrained writes: re-save or re-copy the model")
    architectures = config.get("architectures")
    if architectures and not any(str(a).endswith(kind) for a in architectures):
        raise ModelLoadError(f"model directory {path} holds a {', '.join(map(str, architectures))}, not a *{kind} "
                             f"model: set {key} to the right directory")
    check_weights(path, key)
    return path


def load_student(path: str | Path, key: str = "model.model_name_or_path") -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from a local directory (safetensors only, no remote code); ``key``
    names the directory's source in errors."""
    path = check_model_dir(path, key)
    tokenizer = load_tokenizer(path)
    model = load_pretrained(AutoModelForCausalLM, path, key, dtype=torch.float32)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ModelLoadError(f"the tokenizer in {path} does not fit its model ({len(tokenizer)} tokens for "
                             f"{vocab} embeddings): check its files")
    return model, tokenizer


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a local model directory, with a pad token (its end-of-sequence token when it has
    none, as Llama tokenizers do: batched sampling and training pad their rows)."""
    path = Path(path)
    # Without its files, AutoTokenizer quietly builds an empty tokenizer of the model's type: refuse up front.
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"model directory {path} has no tokenizer (tokenizer.json, tokenizer.model or "
                             f"vocab.json): save the tokenizer beside the model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - as for the model: every failure here means bad tokenizer files
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
