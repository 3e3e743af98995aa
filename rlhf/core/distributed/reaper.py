"""The processes of a local Ray instance end with the driver, however the driver ends.

A local Ray instance (``cluster.address=local``) is started by the driver, and its GCS and raylet die with it even
when it is killed with SIGKILL. The raylet's dashboard and runtime-env agents notice within a second, but each
first reports the raylet's unexpected end to the GCS, which is gone, and waits on that call for a minute (Ray
2.60), holding memory and ports. ``watch_ray_processes`` starts a small process (this file, run as a script:
standard library only) that holds the reading end of a pipe from the driver; when the driver is gone the pipe
closes and the watcher kills whatever is left of the Ray processes the driver had started, each recognised by its
start time so that a reused pid is spared. It ends on its own once they have all ended (a driver that shut Ray
down and goes on). Linux only (/proc); elsewhere nothing is watched.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

POLL_S = 2.0


def watch_ray_processes() -> subprocess.Popen | None:
    """Start the watcher over this process's descendants that belong to Ray (its binaries, its Python entry points,
    its ``ray::`` workers and agents); returns it (keep a reference: its pipe is the link to this process)."""
    import psutil
    import ray

    ray_dir = os.path.dirname(ray.__file__)
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if command.startswith("ray::") or ray_dir in command:
            found.append(process.pid)
    return watch(found)


def watch(pids: list[int]) -> subprocess.Popen | None:
    """Start the watcher over ``pids`` (those alive now); None where there is nothing to watch or no /proc."""
    ids = [f"{pid}:{start}" for pid in pids if (start := start_time(pid)) is not None]
    if not ids:
        return None
    # -I: only the standard library on the path (not this file's folder, whose modules import Ray).
    watcher = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               text=True)
    watcher.stdin.write(" ".join(ids) + "\n")
    watcher.stdin.flush()
    return watcher


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (field 22 of /proc/PID/stat); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _alive(ids: list[tuple[int, str]]) -> list[int]:
    return [pid for pid, start in ids if start_time(pid) == start]


def _watch() -> None:
    """The watcher: read the ids, then wait until the pipe closes (kill the survivors) or they have all ended."""
    ids = [(int(pid), start) for pid, start in (item.split(":") for item in sys.stdin.readline().split())]
    while _alive(ids):
        readable, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):  # end of file: the driver is gone
            for pid in _alive(ids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:  # ended meanwhile
                    pass
            return


if __name__ == "__main__":
    _watch()
