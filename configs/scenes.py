# The compositional demo: python train.py configs/scenes.py  (CPU, no network)
# then: python evaluate.py --ckpt out/scenes/ckpt.pt --probe scenes --cfg 3 --probe_n 2 --steps 25
# 1 to 4 coloured shapes on a 3x3 grid at 32 px, captions in GenEval's six categories (toys.py); pixel space, the
# tiny random CLIP-style text tower. The shapes demo's model and recipe (configs/shapes.py) at 32 px and patch 4
# (64 tokens: the shapes demo's cost per image); its numbers and ablations: docs/log.md 2026-11-29 and 2026-12-03.
# Only what differs from train.py's defaults, each with its reason.
data = "scenes:20000"
out_dir = "out/scenes"
resolution = 32                      # the smallest at which toys.py reads generated-looking renders without error
vae = "none"                         # pixel space: no pretrained weights offline
text_encoder = "tiny"
model = "DiT-S/2"
depth, width, heads, patch = 6, 64, 2, 4  # the shapes demo's model at patch 4: 64 tokens of 4x4 pixels; width 64
                                          # beats 128 at equal FLOPs (0.240 vs 0.181 in-distribution, 2 seeds;
                                          # docs/log.md 2026-12-03, width at equal FLOPs)
qk_norm = False                      # as the shapes demo (docs/log.md 2026-11-26 11:44)
text_len = 16                        # the longest caption ("a red circle to the left of a blue square") is 12 tokens
batch = 32                           # small batches win at equal FLOPs on scenes (docs/log.md 2026-12-02)
lr = 1e-3                            # AdamW's share at the toy scale, as the shapes demo
warmup = 370                         # as measured (1/10 of the 3,680 steps of the width table)
max_steps = 11_000                   # a step budget: every machine trains the same model (the time varies); the FLOPs
                                     # of the 3,000 width-128 steps this config had until 2026-12-03
decay_frac = 0.3
ema_decay = 0.995                    # a short run: an EMA over ~200 steps
t_logit_mean = 0.5                   # as the shapes demo (docs/log.md 2026-11-26 11:44)
flip = True                          # flips swap "left" and "right" in the cached caption tokens (data.py); the scenes
                                     # have no text or asymmetric things that a mirror would contradict
ckpt_every = 250
sample_every = 0                     # no preview grids: evaluate.py --probe scenes reads the checkpoint
sample_prompts = ("a red circle to the left of a blue square|three squares|a green triangle"
                  "|a purple circle above an orange square")
sample_cfg = 3.0
device = "cpu"                       # a CPU demo on any machine: its numbers (docs/log.md) are CPU numbers
