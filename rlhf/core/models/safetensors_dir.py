"""Model directories that load from safetensors only: the one check every model load goes through.

Hugging Face's ``from_pretrained`` reads ``pytorch_model.bin`` (a pickle: loading it can run code) whenever the
directory has no ``model.safetensors``, and a directory can hold both, a decoy ``.safetensors`` beside the pickle,
or links to files elsewhere. So before anything loads a model (policy, reference, critic, reward model, teacher,
judge, import, the servers), ``check_weights`` looks at the directory itself: no pickled weights at all, the
safetensors files that ``from_pretrained(use_safetensors=True)`` will read are there and readable, and no file
is a link out of the directory. ``load_pretrained`` then loads with ``use_safetensors=True`` and refuses a model
whose safetensors lacked some of its weights (which Hugging Face would fill with random values, with a warning).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Formats that unpickle when loaded (torch.save files under any of their usual names).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Pickles that Hugging Face's Trainer writes beside a model and no loader reads as weights.
NOT_WEIGHTS = ("training_args.bin",)


class ModelLoadError(ValueError):
    """A model directory that cannot be used, with a one-line message saying why and what to do."""


def check_weights(path: str | Path, key: str = "model") -> list[Path]:
    """Refuse, in one line naming ``key``, a directory whose weights are not safetensors only (see the module
    doc); returns the safetensors files a load will read."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{key}: model directory {path} does not exist")
    _refuse_links_out(path, key)
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name not in NOT_WEIGHTS)
    if pickled:
        raise ModelLoadError(f"{key}: {path} holds {', '.join(pickled[:3])}: pickled weights (loading them can run "
                             f"code); only safetensors are loaded: remove them, or re-save the model with "
                             f"save_pretrained (safetensors) where you trust its source")
    files = _files_to_read(path, key)
    for file in files:
        _check_readable(file, key)
    return files


def refuse_missing(info: dict, path: str | Path, key: str = "model", allowed: tuple[str, ...] = ()) -> None:
    """Raise if ``from_pretrained``'s loading ``info`` shows weights that the files lacked (Hugging Face fills them
    with random values), except those whose names start with one of ``allowed`` (heads that are new on purpose)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(allowed))
    if missing:
        raise ModelLoadError(f"{key}: the safetensors in {path} lack {len(missing)} of the model's weights (e.g. "
                             f"{missing[0]}): not loaded; is it a decoy, or another model's file?")


def load_pretrained(model_class, path: str | Path, key: str = "model", allow_missing: tuple[str, ...] = (),
                    **kwargs):
    """``model_class.from_pretrained(path, **kwargs)`` from checked safetensors only, with every weight from the
    files except those named by ``allow_missing`` prefixes."""
    check_weights(path, key)
    try:
        with quiet_loading_report():
            model, info = model_class.from_pretrained(path, use_safetensors=True, output_loading_info=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - loading fails in many library-specific ways; all mean "bad files"
        raise ModelLoadError(f"{key}: cannot load the model in {path} ({' '.join(str(err).split())[:200]})") \
            from None
    refuse_missing(info, path, key, allow_missing)
    return model


@contextlib.contextmanager
def quiet_loading_report():
    """Without Hugging Face's table of missing and unexpected weights (dozens of lines on stderr): the caller
    reads the same facts from the loading info and says in one line what is wrong."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _files_to_read(path: Path, key: str) -> list[Path]:
    """What ``from_pretrained(use_safetensors=True)`` reads: ``model.safetensors``, or the shards its index names."""
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if not (path / WEIGHTS_INDEX).is_file():
        others = sorted(p.name for p in path.glob("*.safetensors"))
        found = f" (only {', '.join(others[:3])}, which Hugging Face does not load)" if others else ""
        raise ModelLoadError(f"{key}: {path} has no {WEIGHTS} or {WEIGHTS_INDEX}{found}: only safetensors saved "
                             f"with save_pretrained are loaded")
    try:
        shards = sorted(set(json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(f"{key}: {path / WEIGHTS_INDEX} is not a safetensors index ({type(err).__name__})") \
            from None
    files = []
    for shard in shards:
        file = path / str(shard)
        if Path(str(shard)).name != str(shard) or not file.name.endswith(".safetensors") or not file.is_file():
            raise ModelLoadError(f"{key}: {path / WEIGHTS_INDEX} names {shard!r}, not a .safetensors file beside it")
        files.append(file)
    return files


def _check_readable(file: Path, key: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise ModelLoadError(f"{key}: {file} is not a readable safetensors file ({' '.join(str(err).split())[:200]})"
                             f": re-save or re-copy the model") from None


def _refuse_links_out(path: Path, key: str) -> None:
    """No entry of the directory may be a link to a place outside it. A Hugging Face cache snapshot
    (``models--org--name/snapshots/REV``) links each file into the same repository's ``blobs/``: its root is the
    repository folder."""
    root = path.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    for entry in path.iterdir():
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            raise ModelLoadError(f"{key}: {entry} is a link to {entry.resolve()}, outside the model directory: copy "
                                 f"the file in instead")
