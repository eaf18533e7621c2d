# The compositional demo: python train.py configs/scenes.py  (CPU, no network)
# then: python evaluate.py --ckpt out/scenes/ckpt.pt --probe scenes --cfg 3 --probe_n 2 --steps 25
# 1 to 4 coloured shapes on a 3x3 grid at 32 px, captions in GenEval's six categories (scenes.py); pixel space
# (vae none), the tiny random CLIP-style text tower. The recipe is the shapes demo's (configs/shapes.py: flow + Muon)
# at 32 px, patch 4 (64 tokens: the shapes demo's cost per image); its numbers and ablations: docs/log.md 2026-11-29.
data = "scenes:20000"
out_dir = "out/scenes"
resolution = 32                      # the smallest at which scenes.py reads generated-looking renders without error
vae = "none"
text_encoder = "tiny"
model = "DiT-S/2"
depth, width, heads, patch = 6, 64, 2, 4  # the shapes demo's model at patch 4: 64 tokens of 4x4 pixels; width 64
                                          # beats 128 at equal FLOPs (0.240 vs 0.181 in-distribution, 2 seeds;
                                          # docs/log.md 2026-12-03, width at equal FLOPs)
qk_norm = False
text_len = 16                        # the longest caption ("a red circle to the left of a blue square") is 12 tokens
batch = 32
accum = 1
optimizer = "muon"                   # flow + Muon: in-distribution 0.056 -> 0.181, held-out 0.026 -> 0.078 at equal
muon_lr = 0.02                       # FLOPs, 2 seeds (docs/log.md 2026-11-29, Muon and rectified flow)
lr = 1e-3
warmup = 370                         # as measured (1/10 of the 3,680 steps of the width table)
max_steps = 11_000                   # a step budget: every machine trains the same model (the time varies); the FLOPs
                                     # of the 3,000 width-128 steps this config had until 2026-12-03
max_hours = 0.0
lr_schedule = "wsd"
decay_frac = 0.3
ema_decay = 0.995
cond_drop = 0.1
prediction = "flow"
min_snr_gamma = 0.0
t_logit_mean = 0.5
t_logit_std = 1.0
flip = True                          # flips swap "left" and "right" in the cached caption tokens (data.py)
compile = False
device = "cpu"
log_every = 50
ckpt_every = 250
sample_every = 0
sample_prompts = ("a red circle to the left of a blue square|three squares|a green triangle"
                  "|a purple circle above an orange square")
sample_cfg = 3.0
