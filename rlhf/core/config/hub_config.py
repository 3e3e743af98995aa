"""The Hugging Face Hub section of the run config: whether a model named by its Hub id may be downloaded."""
from __future__ import annotations

from rlhf.core.config.training_config import _Section


class HubConfig(_Section):
    """The Hugging Face Hub. Offline by default: a model given by Hub name (``Qwen/Qwen2.5-0.5B-Instruct``) is taken
    from the local Hugging Face cache only, and a run never reaches the network unless the user allows it."""

    offline: bool = True
    """false: a model.model_name_or_path or reward_model.path given by Hub name and not in the local cache is
    downloaded (safetensors, config and tokenizer files only) before the run starts."""
