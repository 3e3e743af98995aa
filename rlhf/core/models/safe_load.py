"""Loading checkpoint files without running code from them.

``torch.load(weights_only=False)`` unpickles whatever a file holds, and a pickled object's ``__reduce__`` runs
arbitrary code while loading. DeepSpeed reads its engine state that way, and checkpoints travel between people and
machines, so every ``.pt`` file of a checkpoint is read through torch's restricted unpickler
(``weights_only=True``): tensors, containers and numbers, plus exactly the few DeepSpeed classes its own state
holds (found by saving real ZeRO-2 and ZeRO-3 checkpoints and listing the globals torch refuses). Anything else in
a file is refused before it is built.

Two kinds of failure are told apart: a file that names a global outside that list (``UnsafeCheckpointError``:
refuse, never fall back; someone put it there) and a file that cannot be read (``DamagedCheckpointError``: a run
killed mid-write, a full disk; the run can go on from an older checkpoint).
"""
from __future__ import annotations

import contextlib
import importlib
import pickle
import threading
import zipfile
from pathlib import Path

import torch

# module.Class of every non-torch object found in DeepSpeed 0.19.8's checkpoint files of our ranks (listed with
# torch.serialization.get_unsafe_globals_in_checkpoint; ZeRO-2 and ZeRO-3, fp32 and bf16, optimizer and parameter
# offload, with and without the lr warm-up schedule): the loss scaler, the ZeRO stage enum and ZeRO-2's fragment
# addresses. DynamicLossScaler is what fp16 training stores in the same place as LossScaler.
DEEPSPEED_STATE_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would build objects outside the allow-list (possibly code): refused, in one line."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, missing), in one line."""


def allowed_globals() -> list[type]:
    """The classes of ``DEEPSPEED_STATE_TYPES`` (those whose module imports here)."""
    found = []
    for name in DEEPSPEED_STATE_TYPES:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # no DeepSpeed here: nothing can need its classes
            continue
    return found


def load_weights_only(path: str | Path, map_location=None):
    """``torch.load`` of ``path`` that builds tensors, containers, numbers and the allow-listed DeepSpeed classes
    only; raises ``UnsafeCheckpointError`` or ``DamagedCheckpointError`` (one line each)."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # bytes that are no pickle ("Unsupported operand"): damage, not a plot
            raise DamagedCheckpointError(f"{path} cannot be read ({_first_line(e)})") from None
        raise UnsafeCheckpointError(f"{path} holds objects a checkpoint never holds ({_first_line(e)}); it was not "
                                    f"loaded: use a checkpoint from a source you trust") from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
        raise DamagedCheckpointError(f"{path} cannot be read ({type(e).__name__}: {_first_line(e)})") from None


def check_file(path: str | Path) -> None:
    """Read the pickle of one checkpoint file without building anything (cheap: no tensor data is loaded) and
    raise as ``load_weights_only`` would: a global outside torch's and our allow-list, or an unreadable file."""
    if Path(path).is_file() and not zipfile.is_zipfile(path):  # torch's legacy format: load it, restricted
        load_weights_only(path)
        return
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - any failure to parse the zip or the pickle means: damaged
        raise DamagedCheckpointError(f"{path} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    refused = sorted(set(unsafe) - set(DEEPSPEED_STATE_TYPES))
    if refused:
        raise UnsafeCheckpointError(f"{path} holds objects a checkpoint never holds ({', '.join(refused)}); it was "
                                    f"not loaded: use a checkpoint from a source you trust")


def check_files(directory: str | Path) -> int:
    """``check_file`` for every ``.pt`` file under ``directory``; returns how many there were."""
    files = sorted(Path(directory).rglob("*.pt"))
    for path in files:
        check_file(path)
    return len(files)


_TORCH_LOAD = torch.load
_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def weights_only_torch_load():
    """Within the block, every ``torch.load`` (DeepSpeed's included, which asks for ``weights_only=False``) is
    ``load_weights_only``. For code we do not own that calls ``torch.load`` itself."""
    def forced(path, map_location=None, *args, **kwargs):
        return load_weights_only(path, map_location=map_location)

    with _PATCH_LOCK:
        torch.load = forced
        try:
            yield
        finally:
            torch.load = _TORCH_LOAD


def _first_line(error: BaseException) -> str:
    """The part of torch's long messages that names the problem: the refused global, else the first sentence."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "unsupported" in line.lower() or "GLOBAL" in line:
            return line[:200]
    return lines[0].split(". ")[0][:200] if lines else type(error).__name__
