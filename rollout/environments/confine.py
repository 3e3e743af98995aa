"""Kernel confinement of a tool's child process (Linux), applied between fork and exec: rlimits, no network, no
file writes outside its own directory.

Landlock (Linux 5.13+, unprivileged) refuses every write-like file access outside ``writable`` and, from its ABI 4,
every TCP bind and connect; a new user and network namespace leaves the child no interface at all. Each is best
effort: a kernel or container without it skips it (``landlock_abi()`` says what this one has), and the rlimits and
the interpreter-level socket block (rollout/environments/sandbox.py) still hold.
"""
from __future__ import annotations

import ctypes
import os
import resource

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # x86_64 and aarch64 alike
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
# LANDLOCK_ACCESS_FS_*: write file, remove dir/file, make char/dir/reg/sock/fifo/block/sym (ABI 1), refer (2),
# truncate (3). Reading and executing stay allowed everywhere (the interpreter and its library are read).
_WRITES = {1: 0b1_1111_1111_0010, 2: 0b11_1111_1111_0010, 3: 0b111_1111_1111_0010}
_NET_TCP = 0b11  # LANDLOCK_ACCESS_NET_BIND_TCP | CONNECT_TCP (ABI 4)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none."""
    return max(0, _libc().syscall(_SYS_CREATE_RULESET, None, 0, 1))


def _landlock(writable: str, abi: int) -> None:
    libc = _libc()
    writes = _WRITES[min(abi, 3)]
    attr = _RulesetAttr(writes, _NET_TCP if abi >= 4 else 0)
    size = ctypes.sizeof(attr) if abi >= 4 else 8  # before ABI 4 the struct has one field
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return
    directory = os.open(writable, os.O_PATH | os.O_CLOEXEC)
    rule = _PathBeneath(writes, directory)
    libc.syscall(_SYS_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0)  # 1: LANDLOCK_RULE_PATH_BENEATH
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0)
    os.close(directory)
    os.close(ruleset)


def confiner(writable: str, seconds: float, memory_mb: int, file_bytes: int, abi: int):
    """The function Popen runs in the child before exec (``preexec_fn``). ``abi``: ``landlock_abi()``, read once
    in the parent (the child should not probe)."""
    def apply() -> None:
        cpu = max(1, int(seconds + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))  # outputs are files: floods stop here
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no forks (not enforced for root: the group is killed)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _libc().unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        if abi:
            _landlock(writable, abi)
    return apply
