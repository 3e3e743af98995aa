"""benchmarks/gpu_smoke.sh and gpu_smoke.py on CPU: a GPU machine without vLLM fails the check (a stand-in
interpreter claims a GPU and has no vllm), the checks fail a non-finite loss and log-prob gaps above the bound, and
the toy step passes them, printing one JSON line."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_a_gpu_machine_without_vllm_fails_the_smoke_check(tmp_path):
    shim = tmp_path / "python"
    shim.write_text('#!/bin/sh\ncase "$2" in\n  *device_count*) echo 1 ;;\n  "import vllm") exit 1 ;;\n'
                    '  *) exit 3 ;;\nesac\n')
    shim.chmod(0o755)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_smoke.sh")], capture_output=True, text=True,
                          timeout=60, env={"PYTHON": str(shim), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert "a GPU is here but vllm is not installed" in done.stderr


def test_the_checks_fail_what_they_should():
    import gpu_smoke

    good = {"loss": 0.1, "logprob_mismatch": 0.02, "post_sync_logprob_gap": 0.03}
    assert gpu_smoke.check_results(good, 0.05) == []
    assert gpu_smoke.check_results({**good, "loss": float("nan")}, 0.05) == ["loss is nan"]
    assert "mismatch 0.2 above 0.05" in gpu_smoke.check_results({**good, "logprob_mismatch": 0.2}, 0.05)[0]
    assert "after the sync" in gpu_smoke.check_results({**good, "post_sync_logprob_gap": 0.5}, 0.05)[0]


def test_the_toy_step_passes_its_checks_and_ends_with_one_json_line():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--tiny", "--engine", "hf"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["passed"] and result["failures"] == []
    # float32 engine and trainer on the CPU: the same weights. What is left is the hf engine's end-of-sequence
    # suppression (min_new_tokens: its log-probs renormalised without that token, ~1/vocab of 1024 off).
    assert result["post_sync_logprob_gap"] < 5e-3
    assert result["versions"]["torch"] and "vllm" in result["versions"]
