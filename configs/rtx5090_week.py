# The one-week run on one RTX 5090 (32 GB): python train.py configs/rtx5090_week.py --data /path/to/shards
# train.py's defaults are the recipe (rectified flow, logit-normal t, Muon + AdamW, wsd, EMA, caption dropout, the
# SD VAE and CLIP ViT-L/14 at 256 px); this file holds only the week's data, model size, batch, hours and cadence.
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
# grads, optimizer state and EMA + ~15 GB: an estimate for the 5090, to confirm with
# `python bench.py --models XL/2 --batch 32` on the card). If 32 runs out of memory, set grad_ckpt = True.
# At the H100's 29.5% MFU the week is ~44M images; ~73M if the 5090 reaches 50%.
data = "data/shards"                 # img2dataset webdataset shards (or an imagefolder with metadata.jsonl)
out_dir = "out/week"
model = "DiT-XL/2"                   # the largest preset (above); adaLN-single keeps it ~26% smaller than adaLN-Zero
batch = 32                           # micro-batch per GPU: 64 needs 41.2 GB (H100, bench.py), over the 32 GB
accum = 8                            # global batch 256 (DiT, PixArt); at equal FLOPs the probes favour small
                                     # batches, nothing measured argues for >= 512 (docs/week.md, the global batch)
max_steps = 10_000_000               # effectively unbounded: max_hours decides the horizon
max_hours = 132.0                    # stage 1 of the week (stage 2: configs/rtx5090_week_512.py, 36 h); the LR
                                     # decay is planned from the measured step time
log_every = 100
ckpt_every = 2000                    # ~20 min of work at the planned rate; SIGTERM also writes one
