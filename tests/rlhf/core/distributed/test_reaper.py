"""A local Ray instance ends with its driver, even one killed with SIGKILL: the GCS, the raylet and also Ray's
dashboard and runtime-env agents (which otherwise wait a minute on the dead GCS), through the watcher of
rlhf/core/distributed/reaper.py."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from rlhf.core.distributed import reaper
from tests.paths import REPO

psutil = pytest.importorskip("psutil")

DRIVER = textwrap.dedent("""
    import time
    from rlhf.core.distributed.cluster import connect

    connect("local", 1, 60, {})
    print("up", flush=True)
    time.sleep(600)
""")


def _sleepers(n: int, seconds: float) -> list[subprocess.Popen]:
    return [subprocess.Popen(["sleep", str(seconds)]) for _ in range(n)]


def test_the_watcher_kills_what_it_watches_when_the_pipe_closes():
    sleepers = _sleepers(2, 60)
    watcher = reaper.watch([p.pid for p in sleepers])
    try:
        time.sleep(0.3)
        assert all(p.poll() is None for p in sleepers) and watcher.poll() is None
        watcher.stdin.close()  # what the driver's end does when it dies
        assert [p.wait(timeout=10) for p in sleepers] == [-9, -9]
        assert watcher.wait(timeout=10) == 0
    finally:
        for p in sleepers:
            p.kill()


def test_the_watcher_ends_on_its_own_once_what_it_watches_has_ended():
    sleepers = _sleepers(1, 0.2)
    watcher = reaper.watch([p.pid for p in sleepers])
    sleepers[0].wait()
    assert watcher.wait(timeout=10) == 0  # pipe still open: it left because nothing was left to watch
    assert reaper.watch([sleepers[0].pid]) is None  # an ended process: nothing to watch, no watcher


def test_a_killed_drivers_ray_processes_agents_included_end_within_seconds():
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    started: list = []
    try:
        assert proc.stdout.readline().strip() == "up"
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "raylet" in names and "DashboardAgent" in names and "RuntimeEnvAgent" in names
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(started, timeout=15)  # Ray's own agents alone would take about 60 s
        assert not alive, [p.cmdline() for p in alive]
    finally:
        proc.kill()
        for p in started:
            if p.is_running():
                p.kill()
