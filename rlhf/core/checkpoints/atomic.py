"""Writing run artefacts so that a crash never leaves a half-written one where a finished one is expected."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces ``path`` in one rename.

    On an exception the temporary directory is removed and ``path`` (if it existed) is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        # os.replace cannot overwrite a non-empty directory: move the old one aside, swap, then delete it.
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: object) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def output_dir_problem(path: str | Path) -> str | None:
    """Why a run could not write into ``path`` (a file is in the way, or no write permission on the directory or
    on its nearest existing parent), as one line; None when it can. Checked before anything is written."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        return f"output_dir {path} {where}, not a directory: choose another output_dir"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (nor its parent {existing})"
        return f"output_dir {path}{where} is not writable: choose an output_dir you can write to"
    return None
