"""Prompt datasets named by their Hugging Face Hub id (``task.train_file: openai/gsm8k``): downloaded with
``datasets.load_dataset`` into a ``save_to_disk`` directory beside the run directory (``hub_datasets/``, reused by
later runs) when the config allows it (``hub.offline: false``); offline, the default, such a name that was not
downloaded before is one line saying how to allow it."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from rlhf.core.data.datasets import DatasetError
from rlhf.core.models.hub import is_hub_name

HUB_DATASETS = "hub_datasets"  # beside output_dir, as the GGUF imports are: shared by the runs in that folder
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # a missing local file, not a Hub id


def local_datasets(cfg, log: Callable[[str], None] = print):
    """``cfg``, or a copy whose task.train_file / task.eval_file Hub ids point at their downloaded directories."""
    local = {}
    for key in ("train_file", "eval_file"):
        name = getattr(cfg.task, key)
        if not is_hub_name(name) or name.endswith(FILE_SUFFIXES):
            continue
        target = Path(cfg.output_dir).expanduser().resolve().parent / HUB_DATASETS / name.replace("/", "--")
        if not target.is_dir():
            if cfg.hub.offline:
                raise DatasetError(f"task.{key} {name} is not a local file or directory: to download it from the "
                                   f"Hugging Face Hub, set hub.offline=false")
            log(f"task.{key}: downloading dataset {name} from the Hugging Face Hub (hub.offline is false)")
            _download(name, target)
        local[key] = str(target)
    if not local:
        return cfg
    cfg = cfg.model_copy(deep=True)
    for key, path in local.items():
        setattr(cfg.task, key, path)
    return cfg


def _download(name: str, target: Path) -> None:
    """All splits of ``name`` written to ``target`` (through a temporary directory: no half-written one is reused)."""
    import datasets

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    datasets.load_dataset(name).save_to_disk(str(partial))
    partial.rename(target)
