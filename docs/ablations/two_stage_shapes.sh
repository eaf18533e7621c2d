#!/usr/bin/env bash
# Progressive resolution on the shapes demo at equal training FLOPs (docs/log.md 2026-12-02, "Two stages"):
# 1.73e13 FLOPs in all (the demo's 900 steps of 32 at 16 px), split as the week splits it (~75% / 25%):
#   two stages: 677 steps at 16 px (0.599 GFLOP/img), then 49 steps at 32 px (2.783 GFLOP/img) --init_from it
#   one stage:  194 steps at 32 px from scratch
# FLOPs per image from `python scripts/ablate.py --row "s16:" --row "s32: --resolution 32" --base configs/shapes.py
# --steps 100 --dry_run`. Warmup is ~11% of each run (the demo's 100 of 900); stage 2 has a fresh optimizer.
#   bash docs/ablations/two_stage_shapes.sh [SEEDS] [OUT]     # defaults: "0 1", out/two-stage
set -euo pipefail
SEEDS=${1:-0 1}
OUT=${2:-out/two-stage}
EVAL="--probe shapes --cfg 3 --probe_n 4 --steps 25"
for s in $SEEDS; do
  python train.py configs/shapes.py --max_hours 0 --max_steps 677 --warmup 75 --seed "$s" --out_dir "$OUT/stage1-s$s"
  python train.py configs/shapes.py --max_hours 0 --max_steps 49 --warmup 5 --resolution 32 --seed "$s" \
      --init_from "$OUT/stage1-s$s/ckpt.pt" --out_dir "$OUT/stage2-s$s"
  python train.py configs/shapes.py --max_hours 0 --max_steps 194 --warmup 22 --resolution 32 --seed "$s" \
      --out_dir "$OUT/one32-s$s"
  for run in stage1 stage2 one32; do
    [ -f "$OUT/$run-s$s/eval.json" ] || python evaluate.py --ckpt "$OUT/$run-s$s/ckpt.pt" $EVAL --out "$OUT/$run-s$s/eval.json"
  done
done
