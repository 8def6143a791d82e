#!/usr/bin/env bash
# What leancnn does on a machine with a CUDA GPU, in under 8 minutes; prints what it found.
#   bash benchmarks/gpu_check.sh            (from the repository root)
# Uses .venv/bin/python when there is one, else the python with torch on the PATH (a GPU machine
# lent to this project has no network: nothing is installed). Steps, each with its own time limit:
#   1. the machine: GPU, torch, CUDA;
#   2. the test suite with CUDA visible (device "auto" trains on the GPU), at most 4 minutes;
#   3. resnet18 w0.5 with PS4_P4 trained 2 epochs on 20k Fashion-MNIST images, bf16, channels_last:
#      images/s and test accuracy, next to the same on the CPU for one epoch of 2000 images;
#   4. a quick bench on CUDA (2 methods, 1 epoch), its table.
set -u
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/leancnn-gpu-check}
mkdir -p "$OUT"
section() { printf '\n== %s (%s) ==\n' "$1" "$(date +%T)"; }

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "nccl", torch.distributed.is_nccl_available())
PY

section "tests with CUDA visible (4 min limit)"
workers=$($PY -c "import os; print(min(8, os.cpu_count() or 1))")
timeout 240 $PY -m pytest -q -x -n "$workers" -p no:cacheprovider tests 2>&1 | tail -15
echo "pytest exit: ${PIPESTATUS[0]} (124: stopped at the time limit)"

section "resnet18 PS4_P4, bf16, CUDA (2 min limit)"
rm -rf "$OUT/r18-cuda" "$OUT/r18-cpu"
timeout 120 $PY -m leancnn train --model resnet18 --width 0.5 --method PS4_P4 --epochs 2 --train-subset 20000 \
  --device cuda --precision bf16 --no-latency --no-progress --out "$OUT/r18-cuda" 2>&1 | grep -E "^epoch|test accuracy|error"
section "the same on the CPU, 1 epoch of 2000 images, for scale (1 min limit)"
timeout 60 $PY -m leancnn train --model resnet18 --width 0.5 --method PS4_P4 --epochs 1 --train-subset 2000 \
  --device cpu --no-latency --no-progress --out "$OUT/r18-cpu" 2>&1 | grep -E "^epoch|test accuracy|error"

section "quick bench on CUDA (1 min limit)"
rm -rf "$OUT/bench"
timeout 60 $PY -m leancnn bench --quick --methods PS4_P4 dnr:density=0.1 --epochs 1 --train-subset 4000 \
  --out "$OUT/bench" --no-progress 2>&1 | tail -20
section "done"
