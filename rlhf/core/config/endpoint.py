"""One way to name an HTTP endpoint in the config, used by every client: the OpenAI-compatible teachers (judge,
trace writer, token log-probs) and the reward-model server. Old spellings of these keys are refused in one line
that names the new key."""
from __future__ import annotations

from pydantic import Field

from rlhf.core.config.training_config import _Section


class Endpoint(_Section):
    """An HTTP endpoint: its URL, the model it serves, where its key is, and how it is called."""

    url: str
    """The base URL, e.g. http://127.0.0.1:8000/v1 (an OpenAI-compatible server) or http://127.0.0.1:5000 (serve-rm)."""
    model: str | None = None
    """The model name the server knows (OpenAI-compatible endpoints; the reward-model server needs none)."""
    api_key_env: str | None = None
    """The environment variable holding the key or bearer token (read at start, never written anywhere)."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds one request may take."""
    max_retries: int = Field(4, ge=0)
    """Retries of a request that failed on the way (connection error, timeout, 429, 5xx)."""
    concurrency: int = Field(4, gt=0)
    """Requests in flight at once."""


def refuse_renamed(section: str, data, renamed: dict[str, str]):
    """A section's raw keys, or a ValueError naming the first old key given and the key that replaced it."""
    if isinstance(data, dict):
        for old, new in renamed.items():
            if old in data:
                raise ValueError(f"{section}.{old} is now {section}.{new}")
    return data
