# Stage 2 of the week on one RTX 5090: 512 px, starting from stage 1's weights (init_from: a new run, fresh
# optimizer, step 0; the architecture, text_len and position grid come from the checkpoint).
#   python train.py configs/rtx5090_week.py --data /data/shards            # stage 1: 256 px, 132 h
#   python train.py configs/rtx5090_week_512.py --data /data/shards        # stage 2: 512 px, 36 h
# The split (docs/week.md "Two stages"): a 512 px image costs 4.2x a 256 px one at XL/2 (1024 tokens; model.py),
# so the last 36 h (21% of the week's FLOPs) see ~2M images at 512 px while the first 132 h see ~34M at 256 px
# (at the 30% MFU measured on an H100). Rerunning either line after a crash resumes that stage.
# Only what differs from stage 1 (which holds only what differs from train.py's defaults).
import os as _os

exec(open(_os.path.join(_os.path.dirname(__file__), "rtx5090_week.py")).read())  # stage 1's keys, then:

init_from = "out/week/ckpt.pt"       # stage 1's last checkpoint (its EMA weights start EMA and model)
out_dir = "out/week-512"
resolution = 512                     # sd-vae-ft-mse latents 4x64x64 -> 1024 tokens at patch 2; its own cache
max_hours = 36.0
batch = 8                            # 8 x 1024 tokens per micro-batch: stage 1's 32 x 256
accum = 32                           # global batch 256, as in stage 1
grad_ckpt = True                     # attention's activations grow with the square of the tokens: memory first
warmup = 500                         # a fresh optimizer: a short warmup to the stage's LR
ckpt_every = 500
flow_shift = 2.0                     # 4x the pixels of stage 1: SD3's resolution shift sqrt(4) (argued, not measured)
