"""Running untrusted Python (a model's tool call) in a child process with limits: what a tool may cost a rollout.

The child is a fresh interpreter (``-I -S``: no user site, no environment variables, no site packages) in its own
empty temporary directory, which first confines itself (rollout/environments/confine.py: rlimits on CPU time,
address space, file size (its output goes to files, so a flood stops at the limit) and processes; no network; no
writes outside the directory) and replaces the socket module by one that refuses, then runs the tool's code. The
wall-clock limit kills its whole process group. Whatever it
does, the caller gets a ``ToolResult``: the output, or an error line. It never raises for the code's behaviour.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rollout.environments.confine import landlock_abi, prelude

# Run in the child after the confinement: sockets refuse even where no network namespace could be made.
_NO_SOCKETS = (
    "import socket as _s\n"
    "def _refuse(*a, **k):\n"
    "    raise OSError('no network in the tool sandbox')\n"
    "_s.socket = _s.create_connection = _s.getaddrinfo = _refuse\n"
    "del _s, _refuse\n"
)
_LANDLOCK_ABI = landlock_abi()


@dataclass(frozen=True)
class SandboxLimits:
    seconds: float = 2.0          # wall clock (CPU time is limited to the same, rounded up)
    memory_mb: int = 256          # address space
    output_bytes: int = 2000      # stdout (and stderr) beyond this is an error, not a truncation


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    output: str                   # stdout when ok; one line saying what went wrong otherwise
    seconds: float


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> ToolResult:
    """Run ``code`` in a limited child interpreter; its stdout is the result. A hang, a crash, a memory blow-up or
    an output flood each come back as ``ok=False`` with one line saying which, within the limits."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distilrl-tool-") as tmp:
        out_path, err_path = Path(tmp) / ".stdout", Path(tmp) / ".stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                first = prelude(tmp, limits.seconds, limits.memory_mb, limits.output_bytes + 1, _LANDLOCK_ABI)
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", first + _NO_SOCKETS + code], cwd=tmp,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, env={},
                                        start_new_session=True)
            except OSError as e:
                return ToolResult(False, f"error: the sandbox could not start ({e.strerror})", 0.0)
            timed_out = False
            try:
                proc.wait(timeout=limits.seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)
        seconds = time.perf_counter() - start
        output, errors = _read(out_path, limits.output_bytes), _read(err_path, limits.output_bytes)
    return _classify(proc.returncode, timed_out, output, errors, limits, seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill what is left of the child's session (a hung child, or children it forked), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit + 1)


def _classify(code: int, timed_out: bool, output: bytes, errors: bytes, limits: SandboxLimits,
              seconds: float) -> ToolResult:
    """The child's end as a result: its output, or the first reason it failed."""
    if timed_out or code in (-signal.SIGXCPU, -signal.SIGKILL):
        return ToolResult(False, f"error: the tool ran past its {limits.seconds:g} s limit", seconds)
    if code == -signal.SIGXFSZ or len(output) > limits.output_bytes or len(errors) > limits.output_bytes:
        return ToolResult(False, f"error: the tool wrote more than {limits.output_bytes} bytes", seconds)
    if code < 0:
        return ToolResult(False, f"error: the tool crashed ({signal.Signals(-code).name})", seconds)
    if code != 0:
        lines = errors.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1] if lines else f"exit status {code}"
        if "MemoryError" in last:
            last = f"MemoryError (over {limits.memory_mb} MB)"
        return ToolResult(False, f"error: {last}", seconds)
    return ToolResult(True, output.decode("utf-8", "replace").strip(), seconds)
