#!/usr/bin/env bash
# The GPU check in one call, <= ~9 minutes on an H100/H200 (each line has its own time limit, so one slow line
# cannot eat the rest; the limits add up to 535 s, and each line's time is printed, to rebalance them): the CUDA
# tests, then bench.py's rows, all appended to one JSON-lines file, then every row in one table and one JSON list.
#   bash scripts/gpu_check.sh [OUT_DIR]          # default out/gpu: OUT_DIR/bench.jsonl, gpu_check.json, *.log
# Rows, micro-batch 64 at 256 px, AdamW for ours and the peer alike (the peer cannot run our Muon split: the
# network against the network; the recipe's Muon has its own row):
#   default      ours (train.py's model defaults) vs the PixArt peer, B/2 and XL/2; the loader and text encoder
#   extras_off   the same with qk_norm, rope, cross_norm off (the peer's computation)
#   xl_ckpt      XL/2 with every block checkpointed, ours and the peer (the 32 GB question)
#   xl_ckpt14    XL/2, ours alone, the first 14 of 28 blocks checkpointed (ckpt_blocks: memory vs recompute)
#   xl_fp8       XL/2, ours alone, the blocks' linears in float8 (torchao; compare with default's XL/2 rows)
#   muon         B/2, ours alone with the recipe's optimizer (Muon on the blocks' matrices): its cost over AdamW
#   sampling     B/2, 50 steps of the default sampler (euler for flow) with CFG at batch 16, compiled, ours vs the peer
# The card needs diffusers, open_clip_torch and (for xl_fp8) a torchao that matches its torch; where they are not
# installed, carry them as wheels (the device tool's README: .whl/). A line that fails says why in OUT/NAME.log;
# the others still run.
set -u
OUT=${1:-out/gpu}
mkdir -p "$OUT"
J="$OUT/bench.jsonl"
export PYTHONUNBUFFERED=1
STATUS=()
run() {  # run LIMIT_S NAME CMD...: one line of the check, its output to OUT/NAME.log and the console
    local limit=$1 name=$2 t0=$SECONDS; shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^\s*$" | tail -n 25
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    STATUS+=("$name: exit $rc, $((SECONDS - t0)) s of ${limit}")
}
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, importlib.util as u; print('torch', torch.__version__, '| missing:', [m for m in
  ('diffusers', 'open_clip', 'torchao') if u.find_spec(m) is None] or 'none')" | tee -a "$OUT/gpu.txt"
B=(python bench.py --batch 64 --optimizer adamw --out "$J")
run 60 tests python -m pytest -q tests/test_bench.py tests/test_model.py -k "cuda or compile"
run 110 default "${B[@]}" --models B/2,XL/2 --parts train,loader,text_encoder
run 80 extras_off "${B[@]}" --models B/2,XL/2 --parts train --qk_norm false --rope false --cross_norm false
run 75 xl_ckpt "${B[@]}" --models XL/2 --parts train --rounds 2 --steps 5 --grad_ckpt true
run 50 xl_ckpt14 "${B[@]}" --models XL/2 --parts train --rounds 2 --steps 5 --grad_ckpt true --ckpt_blocks 14 --no_peer
run 55 xl_fp8 "${B[@]}" --models XL/2 --parts train --rounds 2 --steps 5 --fp8 true --no_peer
run 45 muon python bench.py --batch 64 --out "$J" --models B/2 --parts train --no_peer
run 60 sampling python bench.py --models B/2 --parts sampling --out "$J"
echo "== lines:"
printf '   %s\n' "${STATUS[@]}"
python bench.py --report "$J" --out "$OUT/gpu_check.json"
echo "== wrote $J and $OUT/gpu_check.json"
