"""Pretrained weights into the layout a run expects: a Hugging Face directory (safetensors, tokenizer, chat template).

``distilrl import-model SRC OUT``: SRC is a GGUF file (llama.cpp's format; transformers de-quantizes it to float
with the ``gguf`` package) or a Hugging Face directory (re-saved: safetensors only, the tokenizer with a pad token).
A run whose ``model.model_name_or_path`` is a ``.gguf`` file imports it once (``student_from_gguf``), so that every
actor loads a Hugging Face directory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from rlhf.core.config.run_config import RunConfig
from rlhf.core.models.build import ModelLoadError, check_model_dir, load_student, save_student

# Where a run's .gguf student is imported: a directory beside the run directories (output_dir's parent), shared by
# the runs there, so a file is imported once however many runs start from it, and the run directory itself is not
# touched before the run's inputs are checked.
IMPORTS_DIR = ".imported_models"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def import_model(source: str | Path, out: str | Path, dtype: str = "float32") -> str:
    """Write ``out`` from ``source`` (a ``.gguf`` file or a model directory) and check that it loads back; returns
    a one-line description of what was written. Refuses to overwrite an existing ``out``."""
    source, out = Path(source), Path(out)
    if out.exists():
        raise ModelLoadError(f"{out} already exists: import into a new directory (or delete it first)")
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if source.is_file() and source.suffix == ".gguf":
        model, tokenizer = _load_gguf(source)
    elif source.is_dir():
        model, tokenizer = load_student(source, "SRC")
    else:
        raise ModelLoadError(f"{source} is neither a .gguf file nor a Hugging Face model directory")
    model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    save_student(model, tokenizer, out)
    check_model_dir(out, key="OUT")
    params = sum(p.numel() for p in model.parameters())
    template = "with its chat template" if getattr(tokenizer, "chat_template", None) else "no chat template"
    return (f"{out}: {type(model).__name__}, {params / 1e6:.1f}M parameters ({dtype}), vocabulary {len(tokenizer)}, "
            f"{template}")


def _load_gguf(path: Path):
    """Model and tokenizer from one GGUF file, de-quantized; the GGUF "quantization" note is dropped from the config,
    so that the saved directory loads as the plain float model it now is."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ModelLoadError("reading a GGUF file needs the gguf package: pip install gguf (or distilrl[gguf])") \
            from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - a damaged or unsupported GGUF fails in many ways; all mean "this file"
        raise ModelLoadError(f"cannot read {path} as a GGUF model ({' '.join(str(err).split())[:200]})") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def student_from_gguf(cfg: RunConfig, log: Callable[[str], None] = print) -> RunConfig:
    """``cfg`` as it is, or, when ``model.model_name_or_path`` is a ``.gguf`` file, a copy pointing at the file's
    Hugging Face import under ``IMPORTS_DIR`` (made now if it is not there yet)."""
    source = cfg.model.model_name_or_path
    if not source or not source.endswith(".gguf"):
        return cfg
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"model.model_name_or_path: {source} does not exist (a .gguf file, or a Hugging Face "
                             f"model directory)")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"model.model_name_or_path is a GGUF file ({source}): reading it needs the gguf "
                             f"package: pip install gguf (or distilrl[gguf])")
    stat = path.stat()
    # The file's identity: a file replaced in place (another size or time) is imported afresh.
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cfg.output_dir).expanduser().resolve().parent / IMPORTS_DIR / f"{path.stem}-{key}"
    if not target.is_dir():
        log(f"importing {source} (GGUF) into {target} (once; later runs reuse it)")
        _import_atomically(path, target)
    cfg = cfg.model_copy(deep=True)
    cfg.model.model_name_or_path = str(target)
    return cfg


def _import_atomically(source: Path, target: Path) -> None:
    """``import_model`` into a private directory renamed to ``target`` when complete: a crash leaves no half
    import at ``target``, and of two runs importing at once the second one's copy is dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        import_model(source, partial)
        os.rename(partial, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
