#!/usr/bin/env bash
# GPU smoke check, the one check to run when a GPU machine is at hand (sized for 15 minutes after the install: README
# "Multi-node and GPU"). On one GPU: the vllm engine's tests (the real vLLM against the engine contract, the
# stand-in's checks, vLLM's signatures), then one colocated GRPO step of a Qwen2.5-0.5B-shaped random student with
# the vllm engine (benchmarks/gpu_smoke.py): rollout tokens/s, MFU, sync seconds, peak memory, and the checks
# (finite loss, log-prob mismatch bound, rollout log-probs after the sync equal the trainer's within it), then one
# step of configs/recipes/qwen2.5-0.5b_grpo_1gpu.yaml through Ray with that student (vLLM's CUDA IPC transfer,
# sleep/wake beside the trainer). The last line is one JSON object. Fails when vLLM is missing on a GPU machine
# (install first, README "Multi-node and GPU": a machine without network access needs it pre-installed); says so
# and exits 0 without a CUDA GPU.
#
#   benchmarks/gpu_smoke.sh [gpu_smoke.py options]      (PYTHON=... to choose the interpreter; ENGINE=hf_compact
#                                                        to time our own engine instead, without vLLM)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

gpus="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')" || {
    echo "gpu_smoke: $PY cannot import torch: install the project first (see README.md)" >&2
    exit 1
}
if [ "$gpus" = "0" ]; then
    echo "gpu_smoke: no CUDA GPU visible to torch here; nothing to run"
    echo '{"gpu": false, "skipped": true}'
    exit 0
fi
engine="${ENGINE:-vllm}"
if [ "$engine" = "vllm" ] && ! "$PY" -c 'import vllm' 2>/dev/null; then
    echo "gpu_smoke: a GPU is here but vllm is not installed: pip install -e '.[vllm]' (README: the torch it pins)" >&2
    exit 1
fi
# One GPU, the first, whatever else the machine has.
visible="${CUDA_VISIBLE_DEVICES:-0}"
export CUDA_VISIBLE_DEVICES="${visible%%,*}"
tests_rc=0
if [ "$engine" = "vllm" ]; then
    echo "== vllm engine tests"
    timeout 300 "$PY" -m pytest -q -x -rs tests/rollout/test_vllm_engine.py tests/rollout/test_vllm_fake.py \
        tests/rollout/test_vllm_signatures.py || tests_rc=$?
fi
echo "== one colocated step, engine $engine (then, with vllm, one step of the 1-GPU recipe through Ray)"
ray_step=""
[ "$engine" = "vllm" ] && ray_step="--ray-step"
timeout 540 "$PY" benchmarks/gpu_smoke.py --engine "$engine" --tests-rc "$tests_rc" $ray_step "$@"
