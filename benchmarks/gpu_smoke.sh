#!/usr/bin/env bash
# GPU smoke check: one RL step of a Qwen2.5-0.5B-shaped random student in bf16 on one GPU (64 prompts x 8 samples x
# 256 new tokens, DeepSpeed ZeRO-2) with each rollout engine (hf, hf_compact, then vllm where it is installed),
# printing rollout tokens/s, training MFU against the GPU's bf16 peak and weight-sync seconds
# (benchmarks/gpu_smoke.py does the work).
# Each engine's step is stopped after 5 minutes. Without a CUDA GPU it says so and exits 0.
#
#   benchmarks/gpu_smoke.sh [gpu_smoke.py options]      (PYTHON=... to choose the interpreter)
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
# One GPU, the first, whatever else the machine has.
visible="${CUDA_VISIBLE_DEVICES:-0}"
export CUDA_VISIBLE_DEVICES="${visible%%,*}"
engines="hf hf_compact"
if "$PY" -c 'import vllm' 2>/dev/null; then
    engines="hf hf_compact vllm"
else
    echo "gpu_smoke: vllm is not installed: the vllm engine's step is skipped (pip install '.[vllm]')"
fi
status=0
for engine in $engines; do
    echo "== engine $engine"
    timeout 300 "$PY" benchmarks/gpu_smoke.py --engine "$engine" "$@" || status=$?
done
exit $status
