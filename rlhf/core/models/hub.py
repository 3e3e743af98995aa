"""Models named by their Hugging Face Hub id, downloaded into the local Hugging Face cache when the config allows
it (``hub.offline: false``); offline (the default) they must be in the cache already (``resolve_model_path``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

# What a run loads of a model repository: no pickled weights, no remote code, no other formats.
PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def is_hub_name(name: str | None) -> bool:
    """``org/name`` that is not a path on this machine."""
    text = str(name or "")
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def in_cache(name: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return False
    return True


def download_models(names: dict[str, str | None], offline: bool, log: Callable[[str], None] = print) -> None:
    """Each ``{config key: value}`` that is a Hub name missing from the cache, downloaded there when not
    ``offline`` (otherwise the loading that follows says how to get it, one line)."""
    if offline:
        return
    from huggingface_hub import snapshot_download

    for key, name in names.items():
        if is_hub_name(name) and not in_cache(name):
            log(f"{key}: downloading {name} from the Hugging Face Hub (hub.offline is false)")
            snapshot_download(name, allow_patterns=PATTERNS)
