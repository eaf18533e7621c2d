# The offline demo: python train.py configs/shapes.py  (CPU, no network, ~9.5 minutes: max_hours below)
# Pixel space, the tiny random CLIP-style text tower, the built-in coloured shapes; train.py's recipe otherwise.
# Only what differs from train.py's defaults, each with its reason.
data = "shapes:6000"
out_dir = "out/shapes"
resolution = 16                      # 16 px pixel space: 8x8 tokens at patch 2, 3x the img/s of 32 px at patch 4,
                                     # and it learns faster (docs/log.md 2026-11-26 06:32)
vae = "none"                         # pixel space: no pretrained weights offline
text_encoder = "tiny"
model = "DiT-S/2"
depth = 6
width = 64                           # 0.47M parameters: at equal FLOPs width 64 beats 128 and 256 at every budget
heads = 2                            # measured, 0.25x to 1x the demo's (docs/log.md 2026-12-03, width at equal FLOPs)
qk_norm = False                      # +19% img/s on the CPU, and shape accuracy at equal time no worse
                                     # (docs/log.md 2026-11-26 11:44, the demo config)
text_len = 16                        # the captions are 9 tokens: cross-attend to 16 of the 77 (+15% img/s; same entry)
batch = 32                           # small batches win at equal FLOPs on the probes (docs/log.md 2026-12-02)
lr = 1e-3                            # AdamW's share (embedders, norms) at the toy scale: Muon's configs at their best
                                     # LR of three (docs/log.md 2026-12-02, flow shift and AdamW's LR)
warmup = 100                         # a few % of the ~4,000 steps the budget buys on 2 cores (docs/log.md 2026-12-04)
max_steps = 100_000                  # effectively unbounded: max_hours ends the run
max_hours = 0.155                    # ~9.3 minutes of training; the LR decay is planned to end on time
decay_frac = 0.3
ema_decay = 0.995                    # a short run: an EMA over ~200 steps
t_logit_mean = 0.5                   # sigma leaning to noise, where the shape is decided (shape acc 0.588 -> 0.833 at
                                     # CFG 3 at equal time; docs/log.md 2026-11-26 11:44)
ckpt_every = 250
sample_every = 0                     # no preview grids: evaluate.py --probe shapes reads the checkpoint
sample_prompts = ("a red circle on a white background|a blue square on a black background"
                  "|a yellow triangle on a gray background|a green circle on a black background")
sample_cfg_interval = "0.2,0.85"     # at train.py's CFG 5: the best cell of the guidance table on this config's
                                     # checkpoint (docs/log.md 2026-12-05, "Guidance at sampling")
device = "cpu"                       # a CPU demo on any machine: its numbers (docs/log.md) are CPU numbers
