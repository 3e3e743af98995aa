"""Which model a run used, said so that it can be found again: a model directory's path and version.

The version is a fingerprint of the weights: sha256 over each safetensors file's name, size and its first and
last MiB (the header, which lists every tensor, and weight bytes at both ends). Retraining moves those bytes, so it
changes the version, while reading a multi-GB directory whole is not needed; ``config.json`` is hashed with them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

SPAN = 1 << 20  # bytes read at each end of a weights file


def model_version(model_dir: str | Path) -> str | None:
    """``sha256:<12 hex digits>`` of the directory's weights and config; None when it has no safetensors file."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in [*files, model_dir / "config.json"]:
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}:".encode())
        with open(path, "rb") as f:
            digest.update(f.read(SPAN))
            if size > 2 * SPAN:
                f.seek(size - SPAN)
                digest.update(f.read(SPAN))
            elif size > SPAN:
                digest.update(f.read())
    return f"sha256:{digest.hexdigest()[:12]}"


def reward_model_record(cfg, rm_dir: str | Path | None) -> dict:
    """What scores RL's ``rm`` component, for summary.json: ``{"reward_model_used": ...}`` with the local RM's path
    and version, or the reward server's URL; empty when the component is off."""
    server = cfg.reward.rm_endpoint
    if not cfg.reward.components.get("rm") or (rm_dir is None and server is None):
        return {}
    if server is not None:
        return {"reward_model_used": {"url": server.url}}
    return {"reward_model_used": {"path": str(Path(rm_dir).resolve()), "version": model_version(rm_dir)}}
