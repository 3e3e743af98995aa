"""An append-only JSON-lines cache of judge replies, so an interrupted labelling job resumes without paying for
the same request twice.

One line per reply: ``{"key": <sha256>, "reply": <text>}``. Each entry is appended and flushed (and fsynced) on
its own, so a crash loses at most the entry being written; a truncated or garbled line is skipped when loading,
and a missing final newline is repaired before the next append so the new entry does not fuse with the debris.
Only the key (a hash) and the reply are stored: never a request header, so never an API key.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

CACHE_FILE = "judge_cache.jsonl"


def request_key(payload: dict[str, Any], endpoint: str) -> str:
    """A stable hash of what determines the reply: the endpoint (two servers may report the same model name and
    still judge differently) and the request (model, messages, sampling settings)."""
    canonical = json.dumps({"endpoint": endpoint, "request": payload}, sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ReplyCache:
    """Thread-safe: judge requests run in a pool and each stores its reply as soon as it arrives."""

    def __init__(self, directory: str | Path, file_name: str = CACHE_FILE):
        self.path = Path(directory) / file_name
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create the judge cache directory {self.path.parent}: {err.strerror}") from None
        self._lock = threading.Lock()
        self._replies: dict[str, str] = {}
        self.skipped_lines = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._replies[entry["key"]] = entry["reply"]
            except (ValueError, KeyError, TypeError):
                self.skipped_lines += 1  # the line a crash cut short; its request is simply made again
        if data and not data.endswith(b"\n"):
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._replies.get(key)

    def put(self, key: str, reply: str) -> None:
        line = json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n"
        with self._lock:
            self._replies[key] = reply
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def __len__(self) -> int:
        return len(self._replies)
