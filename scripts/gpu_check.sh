#!/usr/bin/env bash
# The GPU check in one call, <= ~8 minutes on an H100/H200 (each line has its own time limit, so one slow line
# cannot eat the rest): the CUDA tests, then bench.py's rows, all appended to one JSON-lines file and printed as
# bench.py's tables.
#   bash scripts/gpu_check.sh [OUT_DIR]          # default out/gpu; writes OUT_DIR/bench.jsonl and OUT_DIR/*.log
# Rows: ours (train.py's defaults) vs the PixArt peer at B/2 and XL/2, micro-batch 64; ours with the extras off
# (qk_norm, rope, cross_norm: the peer's computation); XL/2 at 64 with activation checkpointing (the 32 GB
# question); the sampling row rides along with every bench call. Not here yet: an fp8 row (no fp8 key yet).
# On a machine without diffusers / open_clip, install them first (the device tool's README: wheels in .whl/).
set -u
OUT=${1:-out/gpu}
mkdir -p "$OUT"
J="$OUT/bench.jsonl"
run() {  # run LIMIT_S NAME CMD...: one line of the check, its output to OUT/NAME.log and the console
    local limit=$1 name=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^\s*$" | tail -n 25
    echo "== $name: exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
run 90 tests python -m pytest -q tests/test_bench.py tests/test_model.py -k "cuda or compile"
run 150 default python bench.py --models B/2,XL/2 --batch 64 --out "$J"
run 120 extras_off python bench.py --models B/2,XL/2 --batch 64 --qk_norm false --rope false --cross_norm false --out "$J"
run 90 xl_ckpt python bench.py --models XL/2 --batch 64 --grad_ckpt true --out "$J"
echo "== wrote $J"
