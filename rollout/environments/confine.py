"""Kernel confinement of a tool's child process (Linux): rlimits, no network, no file writes outside its own
directory. Applied by the child itself, first thing, before the tool's code runs (``prelude``): a Python
``preexec_fn`` between fork and exec is unsafe while other threads run, and the multi-turn rollout steps its
environments from a thread pool.

Landlock (Linux 5.13+, unprivileged) refuses every write-like file access outside ``writable`` and, from its ABI 4,
every TCP bind and connect; a new user and network namespace leaves the child no interface at all. Each is best
effort: a kernel or container without it skips it (``landlock_abi()`` says what this one has), and the rlimits and
the interpreter-level socket block (rollout/environments/sandbox.py) still hold.
"""
from __future__ import annotations

import ctypes
import inspect

_SYS_CREATE_RULESET = 444  # the same number on every architecture (a syscall added after the numbering unified)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none."""
    return max(0, ctypes.CDLL(None, use_errno=True).syscall(_SYS_CREATE_RULESET, None, 0, 1))


def _confine(writable: str, cpu_seconds: int, memory_bytes: int, file_bytes: int, abi: int) -> None:
    """Runs in the child (its source is sent there, so it imports what it needs itself)."""
    import ctypes
    import os
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))  # outputs are files: floods stop here
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no forks (not enforced for root: the group is killed)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET: no interfaces at all
    if not abi:
        return
    # LANDLOCK_ACCESS_FS_*: write file, remove dir/file, make char/dir/reg/sock/fifo/block/sym (ABI 1), refer (2),
    # truncate (3); reading and executing stay allowed. Net (ABI 4): bind and connect TCP.
    writes = {1: 0b1_1111_1111_0010, 2: 0b11_1111_1111_0010}.get(abi, 0b111_1111_1111_0010)

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(writes, 0b11 if abi >= 4 else 0)
    ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr) if abi >= 4 else 8, 0)
    if ruleset < 0:
        return
    directory = os.open(writable, os.O_PATH | os.O_CLOEXEC)
    libc.syscall(445, ruleset, 1, ctypes.byref(PathBeneath(writes, directory)), 0)  # a PATH_BENEATH rule
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, which restricting oneself needs
    libc.syscall(446, ruleset, 0)  # landlock_restrict_self
    os.close(directory)
    os.close(ruleset)


def prelude(writable: str, seconds: float, memory_mb: int, file_bytes: int, abi: int) -> str:
    """Python source the child runs before the tool's code: the limits and confinement above. ``abi``:
    ``landlock_abi()``, read once in the parent."""
    call = f"_confine({writable!r}, {max(1, int(seconds + 0.999))}, {memory_mb * 2**20}, {file_bytes}, {abi})"
    return f"{inspect.getsource(_confine)}{call}\ndel _confine\n"
