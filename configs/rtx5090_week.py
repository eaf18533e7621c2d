# The one-week run on one RTX 5090 (32 GB): python train.py configs/rtx5090_week.py --data /path/to/shards
#
# Budget (docs/week.md): ~210 TFLOP/s dense bf16 (fp32 accumulate) x ~50% MFU x 604,800 s
# = ~6e19 training FLOPs. model.py counts DiT-XL/2 at 256 px (256 tokens + 77 text tokens) at ~0.9 TFLOP per
# training image, so the week is ~70M images: 270K optimizer steps of 256 images, about the 400K x 256 images
# of the DiT paper's XL/2 ImageNet run (FID 19.5) in FLOPs. DiT's Figure 9 shows the larger models reach a
# given FID with fewer training FLOPs, so the week goes to the largest preset, not to more steps of a small one.
# The width question at equal FLOPs on the CPU probes (docs/log.md 2026-12-03) picks the smallest of three widths at
# ~1e13 FLOPs, six orders below the week on toy data: it cannot place the week's optimum and is no case against XL/2.
# On an H100 (bench.py; docs/log.md 2026-11-26 11:19) our XL/2 trains at 336 img/s, 29.5% MFU, and needs
# 41.2 GB at micro-batch 64, so 64 does not fit the 5090's 32 GB; at 32 the activations halve (~12 GB of weights,
# grads, AdamW state and EMA + ~15 GB: an estimate for the 5090, to confirm with
# `python bench.py --models XL/2 --batch 32` on the card). If 32 runs out of memory, set grad_ckpt = True.
# At the H100's 29.5% MFU the week is ~44M images; ~73M if the 5090 reaches 50%.

data = "data/shards"                 # img2dataset webdataset shards (or an imagefolder with metadata.jsonl)
out_dir = "out/week"
resolution = 256                     # sd-vae-ft-mse latents 4x32x32 -> 256 tokens at patch 2
vae = "stabilityai/sd-vae-ft-mse"
text_encoder = "ViT-L-14/laion2b_s32b_b82k"
text_states = False                  # encoding 77 cached token ids costs ~1.5% of an XL/2 step;
                                     # caching the states instead costs 118 KB/image
model = "DiT-XL/2"
adaln = "single"                     # PixArt adaLN-single: ~26% fewer parameters than adaLN-Zero at XL/2
                                     # (python model.py)
batch = 32                           # micro-batch per GPU: 64 needs 41.2 GB (H100, bench.py), over the 32 GB
qk_norm = True                       # +12% img/s without it at B/2 (H100; docs/log.md 2026-11-26 11:19),
                                     # but a week unattended in bf16 wants the stability
accum = 8                            # global batch 256 (DiT, PixArt); at equal FLOPs the probes favour small
                                     # batches, nothing measured argues for >= 512 (docs/week.md, the global batch)
optimizer = "muon"                   # Muon on the blocks' matrices: shape acc 0.42 -> 0.67 at equal FLOPs on the
muon_lr = 0.02                       # shapes probe, scenes 0.08 -> 0.19 (docs/log.md 2026-11-29, Muon and flow)
lr = 1e-4                            # AdamW on the rest (embedders, final layer, norms, modulation): DiT / PixArt's LR
lr_schedule = "wsd"                  # constant LR, then linear decay over the last 20%: ends annealed on time
warmup = 2000
decay_frac = 0.2
max_steps = 10_000_000               # effectively unbounded: max_hours decides the horizon
max_hours = 132.0                    # stage 1 of the week (stage 2: configs/rtx5090_week_512.py, 36 h); the LR
                                     # decay is planned from the measured step time
ema_decay = 0.9999
route_frac = 0.0                     # token routing off: at 64 tokens it ties (scenes) or loses (shapes) at equal FLOPs,
                                     # with TREAD's unrouted finish too (docs/log.md 2026-12-03); 256 tokens: unmeasured
prediction = "flow"                  # rectified flow: +0.08 +- 0.04 over v with Muon on the shapes probe (same entry)
t_logit_mean = 0.0                   # SD3's logit-normal (0, 1) for sigma; flow_shift 1 at 256 px (SD3 shifts for
t_logit_std = 1.0                    # more pixels: stage 2 at 512 px uses 2, the square root of the pixel ratio)
min_snr_gamma = 0.0                  # does not apply to flow
cond_drop = 0.1
noise_offset = 0.0
weight_decay = 0.0
grad_clip = 1.0
compile = True
dtype = "bfloat16"
log_every = 100
ckpt_every = 2000                    # ~20 min of work at the planned rate; SIGTERM also writes one
sample_every = 5000
