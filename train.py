"""
Train a text-conditioned DiT on cached VAE latents.

    python train.py                                   # the recipe below on --data: SD VAE + CLIP ViT-L/14, 256 px
    python train.py configs/shapes.py                 # the offline CPU demo
    python train.py --batch 64 --accum 12             # micro-batch 64, 12 micro-steps per optimizer step
    torchrun --standalone --nproc_per_node=8 train.py configs/rtx5090_week.py --accum 1   # 32 x 1 x 8 = 256/step

Every global below is a key (`--key value`, `--key=value`, or a config file that assigns some; config.py reads
them). Rerunning the same command after a crash continues from out_dir/ckpt.pt (resume = "auto"). The file reads
top to bottom: the keys, the pieces of a step (bench.py and the tests call these), the setup, main() and its loop.
"""
import contextlib
import os
import signal
import sys
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import config
import data as datalib
import monitor
from checkpoint import (FOR_RESUMING, FOR_SAMPLING, CheckpointError, checkpoint_state, find_resume,
                        inherit_architecture, keep_run_keys, load_checkpoint, restore, save_checkpoint)
from config import ConfigError, fail
from diffusion import Diffusion, Levers
from encoders import LoadError, load_text_encoder
from loader import Loader
from model import DiT, SRAHead, compile_model, config_from_keys, convert_to_fp8
from optim import Horizon, average_grads, configure_optimizer, fit_warmup, lr_at, set_hyperparameters

_PROMPTS = "a red fox in the snow|an astronaut riding a horse|a bowl of fruit on a wooden table|a lighthouse at sunset"
# -----------------------------------------------------------------------------
# the run: data, model size, batch, budget (what a config file sets; configs/rtx5090_week.py is the week on a 5090)
data = "shapes"            # metadata.jsonl imagefolder, images + .txt, webdataset .tar shards, a cache, or "shapes"
cache_dir = ""             # where the latent cache is built ("" = cache/<name from data + encoders>)
out_dir = "out"            # ckpt.pt, log.jsonl, curves.png and samples/ go here
resume = "auto"            # auto (continue from out_dir/ckpt.pt if it exists) | never | a checkpoint path
init_from = ""             # a checkpoint whose weights start this run (fresh optimizer, step 0; architecture from it)
resolution = 256           # image side in pixels (latent side = resolution / 8 with the SD VAE)
vae = "stabilityai/sd-vae-ft-mse"  # diffusers AutoencoderKL name or folder, or "none" (pixel space)
text_encoder = "ViT-L-14/laion2b_s32b_b82k"  # open_clip "arch/pretrained", an open_clip checkpoint, or "tiny"
text_states = False        # cache the encoder's token states (118 KB/caption at CLIP-L), not token ids
text_chunks = 1            # captions in up to 1..3 chunks of 75 tokens, each encoded alone, states concatenated
text_len = 0               # text tokens the DiT cross-attends to: the first N of 77 x text_chunks (0 = all)
aspect_buckets = 5         # N >= 2 aspect-ratio buckets of ~resolution^2 px (docs/log.md 2026-12-05); 0: square crops
max_aspect = 2.0           # the buckets' aspect ratios run from 1:max_aspect to max_aspect:1
model = "DiT-B/2"          # preset name from model.PRESETS
depth = 0                  # 0 = the preset's value
width = 0                  # 0 = the preset's value
heads = 0                  # 0 = the preset's value
patch = 0                  # 0 = the preset's value
batch = 64                 # micro-batch per GPU
accum = 1                  # micro-steps per optimizer step (global batch = batch * accum * GPUs)
max_steps = 400_000        # optimizer steps
max_hours = 0.0            # wall-clock budget; > 0 plans the LR decay to end on time (0 = off)
log_every = 50             # optimizer steps between log lines (the only host syncs of the loop)
ckpt_every = 1000          # optimizer steps between checkpoints (also at the end and on SIGTERM/SIGINT)
sample_every = 5000        # optimizer steps between sample grids with the EMA weights (0 = never)
sample_prompts = _PROMPTS  # '|'-separated prompts of the sample grids (and of the CLIP-score eval)
sample_cfg = 5.0           # classifier-free guidance scale of the sample grids and evals
sample_cfg_interval = ""   # guide the grids and evals only where sigma (t / T) is in "LO,HI" ("" = at every step)
sample_apg = -1.0          # APG's eta for the grids and evals (arXiv 2410.02416); < 0 = plain CFG
sample_cfg_zero_star = False  # CFG-Zero* for the grids and evals (flow only; arXiv 2503.18886)
eval_every = 0             # optimizer steps between evals of the EMA weights (0 = never): the shapes / scenes probe
                           # on built-in data, else CLIP score (the text encoder's own CLIP) of sample_prompts
tensorboard = False        # also log to TensorBoard (out_dir/tb; needs the tensorboard package)
wandb_project = ""         # also log to this Weights & Biases project ("" = off; needs the wandb package)
# -----------------------------------------------------------------------------
# the recipe: each line chosen by measurement at equal training FLOPs (docs/log.md); a config leaves these alone
prediction = "flow"        # rectified flow, SD3: (1 - sigma) x0 + sigma eps -> eps - x0 (+0.08 shape acc over v with
                           # Muon; docs/log.md 2026-11-29 "Muon and rectified flow") | v | eps | x0
t_logit_mean = 0.0         # training sigma = sigmoid(N(mean, std)): SD3's logit-normal (0, 1); over uniform t it lifted
t_logit_std = 1.0          # shape acc 0.59 -> 0.83 (mean 0.5, docs/log.md 2026-11-26 11:44); std 0 = uniform t
optimizer = "muon"         # torch.optim.Muon on the blocks' weight matrices, AdamW on the rest (shape acc 0.42 ->
                           # 0.67, scenes 0.06 -> 0.18; docs/log.md 2026-11-29) | adamw
muon_lr = 0.02             # Muon's peak LR (lr's schedule, scaled): best of 0.01 / 0.02 / 0.04 (docs/log.md 2026-11-29)
lr = 1e-4                  # AdamW's peak LR (embedders, final layer, norms, modulation): DiT's and PixArt's
lr_schedule = "wsd"        # warmup-stable-decay: annealed whenever a time budget ends the run | cosine | constant
warmup = 2000              # optimizer steps of linear LR warmup (a step budget too short for it: a tenth of it)
decay_frac = 0.2           # wsd: share of the run spent decaying the LR linearly to 0
weight_decay = 0.0         # decoupled weight decay, on parameters of >= 2 dims (linear and conv weights)
adam_beta1 = 0.9           # AdamW beta1
adam_beta2 = 0.999         # AdamW beta2
grad_clip = 1.0            # gradient-norm clipping (0 = off)
ema_decay = 0.9999         # EMA decay (warmed up as min(ema_decay, (1 + n) / (10 + n)))
cond_drop = 0.1            # caption dropout probability, for classifier-free guidance
min_snr_gamma = 0.0        # min-SNR-gamma loss weighting (arXiv 2303.09556), 0 = off: it bought nothing on shapes and
                           # slowed prompt learning (docs/log.md 2026-11-29); it does not apply to flow
flip = False               # random horizontal flips, "left" <-> "right" swapped in the caption; off: mirrored text and
                           # asymmetric things no longer match their captions (docs/log.md 2026-11-29)
# -----------------------------------------------------------------------------
# system
device = "auto"            # auto (CUDA when there is a GPU, else the CPU) | cpu | cuda | cuda:N
dtype = "bfloat16"         # autocast dtype on CUDA: bfloat16 | float32 (the CPU always runs float32)
compile = True             # torch.compile the model (CUDA only)
grad_ckpt = False          # activation checkpointing per block (memory for compute)
ckpt_blocks = 0            # with grad_ckpt: checkpoint only the first N blocks (0 = all): less recompute, more memory
fp8 = False                # the blocks' linears in float8 (torchao, tensorwise; CUDA compute capability 8.9+)
seed = 0                   # seeds the data order, the noise and the init
max_bad_steps = 20         # consecutive non-finite steps that stop the run
# -----------------------------------------------------------------------------
# ablation switches: what docs/log.md's tables compared the recipe against (the defaults are the winners)
adaln = "single"           # "single" (PixArt adaLN-single) | "zero" (DiT adaLN-Zero per block)
qk_norm = True             # RMSNorm on queries and keys (bf16 stability; cost: docs/log.md 2026-11-26 11:19)
rope = True                # 2-D RoPE in self-attention, on top of the fixed sin-cos position embedding
cross_norm = True          # affine LayerNorm before the cross-attention (PixArt-alpha has none)
cross_gate = False         # an adaLN gate on the cross-attention branch too (DiT-style gates on all three branches)
text_proj = "mlp"          # text states -> width: mlp (PixArt's caption projection) | linear (one Linear)
weight_init = "dit"        # dit (xavier-uniform linears, normal(0.02) embedders) | torch (nn.Linear's default init)
route_frac = 0.0           # token routing in training (TREAD, arXiv 2501.04765): this share of tokens skips blocks
route_from = 2             # blocks[route_from:route_to] (a negative route_to counts from the end; 0 = off); sampling
route_to = -2              # never routes, and a run may resume with other route_* (e.g. an unrouted finish)
route_until = 1.0          # routing stops after this share of the run's steps: TREAD's unrouted finish (1 = never)
flow_shift = 1.0           # flow: sigma -> s sigma / (1 + (s - 1) sigma), training and sampling (SD3); > 1: noisier
schedule = "scaled_linear"  # eps / v / x0: linear | scaled_linear | cosine
beta_start = 0.00085       # first beta (linear schedules)
beta_end = 0.012           # last beta (linear schedules)
zero_terminal_snr = False  # rescale betas to SNR 0 at t = T-1 (arXiv 2305.08891); needs v or x0
noise_offset = 0.0         # offset noise strength (per-channel constant added to the noise)
input_perturbation = 0.0   # input perturbation strength (arXiv 2301.11706)
# The three 2025 levers below are off: none beat the recipe by more than its error at equal FLOPs, 2 seeds, on the
# shapes probe (two weights each; docs/log.md 2026-12-05) or the scenes probe (SRA collapses there; 2026-12-06).
cfm_weight = 0.0           # contrastive flow matching's lambda in [0, 1) (arXiv 2506.05350): off another's flow target
disp_weight = 0.0          # dispersive loss's weight (arXiv 2506.09027): InfoNCE-L2 over the micro-batch, one block
disp_block = -1            # the dispersive loss's block (0-based; negative: from the end)
sra_weight = 0.0           # self-representation alignment's weight (arXiv 2505.02831): a block -> a later EMA block
sra_block = 0              # SRA's student block: a head on its output, smooth-L1 to the EMA's sra_target_block output
sra_target_block = -1      # SRA's EMA block (the paper: ~1/3 and ~2/3 of the depth); the EMA's forward stops there
sra_gap = 0.2              # SRA's teacher sees t - sra_gap U(0, 1) T (clamped at 0): a fraction of the time range
DEFAULTS = config.keys_of(globals())  # -----------------------------------------------------------------------

#################################################################################
#            The pieces of a step (bench.py and the tests call these)           #
#################################################################################

def step_noise(step, n, shape, device, C, diffusion, tokens=0):
    """All randomness of one optimizer step, a function of (seed, step) alone: the same samples get the same
    t and noise whatever the micro-batch, accumulation or number of ranks (exact resume, accum and DDP). shape: the
    latents' (C, h, w), or with buckets (C, the largest h * w), which fit_noise cuts to each micro-batch's bucket.
    -> (t, noise, offset noise, input perturbation, routing scores (n, tokens), CFM's, SRA's U(0, 1)); None: unused."""
    g = torch.Generator(device=device).manual_seed(C.seed * 1_000_003 + step)
    t = diffusion.draw_t(n, g, device, C.t_logit_mean, C.t_logit_std)  # the logit-normal, or uniform
    noise = torch.randn((n, *shape), generator=g, device=device)
    offset = torch.randn((n, shape[0], 1, 1), generator=g, device=device) if C.noise_offset > 0 else None
    perturb = torch.randn((n, *shape), generator=g, device=device) if C.input_perturbation > 0 else None
    route = torch.rand((n, tokens), generator=g, device=device) if C.route_frac > 0 and tokens > 0 else None
    cfm = torch.rand((n,), generator=g, device=device) if C.cfm_weight > 0 else None  # diffusion.derangement's
    sra = torch.rand((n,), generator=g, device=device) if C.sra_weight > 0 else None  # diffusion.earlier_t's
    return t, noise, offset, perturb, route, cfm, sra  # (route, then the levers': a step draws today's t and noise)


def routed_tokens(step, horizon, tokens, C):
    """Tokens that step_noise scores for routing at this step: all of them until route_until of the horizon, then
    none (the unrouted finish; TREAD, arXiv 2501.04765, finishes its runs unrouted)."""
    return tokens if C.route_frac > 0 and step < round(horizon * C.route_until) else 0


def fit_noise(a, x):
    """Noise drawn for the step's largest bucket (B, C, L) -> x's shape (B, C, h, w): its first h * w values of each
    channel (all of them, the same tensor, without buckets)."""
    return None if a is None else a.flatten(2)[..., :x[0, 0].numel()].reshape(x.shape)


def train_step(model, optimizer, diffusion, loader, encode_text, rand, lr, C, ctx, rank=0, world=1, levers=None):
    """One optimizer step: C.accum micro-steps of forward + backward, then clip and the optimizer. No host sync:
    a non-finite gradient makes fused AdamW skip the update on the device (the found_inf hook GradScaler uses).
    levers: diffusion.Levers (None: off). -> (per-sample losses, t, grad norm, found_inf, {lever term: mean})"""
    t_all, noise_all, offset_all, perturb_all, route_all, cfm_all, sra_all = rand
    ddp = isinstance(model, DDP)
    losses, ts, terms = [], [], {}
    for micro in range(C.accum):
        batch = next(loader)
        first = (micro * world + rank) * C.batch  # this micro-batch's share of the step's noise
        rows = slice(first, first + C.batch)
        pick = lambda a: None if a is None else a[rows]
        route = {} if route_all is None else {"route_scores": route_all[rows]}  # (bench's peer model has no routing)
        # DDP all-reduces the gradients on the last micro-step only
        sync = contextlib.nullcontext() if (not ddp or micro == C.accum - 1) else model.no_sync()
        with sync:
            with ctx:
                cond = (batch["states"], batch["pooled"]) if "states" in batch else encode_text(batch["tokens"])
                loss, per_sample, t, term = diffusion.loss(
                    lambda x, tt, c, **k: model(x, tt, *c, **route, **k), batch["latents"], cond,
                    min_snr_gamma=C.min_snr_gamma, noise_offset=C.noise_offset, input_perturbation=C.input_perturbation,
                    t=pick(t_all), noise=fit_noise(pick(noise_all), batch["latents"]), offset_noise=pick(offset_all),
                    perturb_noise=fit_noise(pick(perturb_all), batch["latents"]), levers=levers or Levers(),
                    cfm_u=pick(cfm_all), sra_u=pick(sra_all))
            (loss / C.accum).backward()
        losses.append(per_sample)
        ts.append(t)
        terms = {k: terms.get(k, 0.0) + v / C.accum for k, v in term.items()}
    average_grads(levers.head if ddp and levers else None, world)  # SRA's head is outside DDP's module
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, C.grad_clip if C.grad_clip > 0 else float("inf"))
    found_inf = (~torch.isfinite(grad_norm)).float()
    optimizer.found_inf = found_inf  # fused AdamW skips the whole update (and its step count) where this is 1
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: muon_lr / lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.cat(losses), torch.cat(ts), grad_norm, found_inf, terms


@torch.no_grad()
def ema_update(ema_params, params, step, decay):
    """ema <- d * ema + (1 - d) * p, d warmed up as min(decay, (1 + step) / (10 + step)) (an EMA of a young model
    is mostly its init otherwise)."""
    torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1 + step) / (10 + step)))

#################################################################################
#                  Setup: what main() runs once, in its order                   #
#################################################################################

def read_command_line(argv):
    """The checked config and what to resume from; bad input (a bad checkpoint included) exits 2 before any work.
    -> (C, this run's checkpoint path, the checkpoint to resume from or None, its contents or None)"""
    try:
        C = SimpleNamespace(**config.parse_args(argv, DEFAULTS))
        ckpt_path, resume_from = find_resume(C)
        ck = load_checkpoint(resume_from, need=FOR_RESUMING) if resume_from else None  # a bad file fails fast
        kept = keep_run_keys(C, ck, config.given_keys(argv, DEFAULTS)) if ck is not None else []
        if kept and int(os.environ.get("RANK", 0)) == 0:  # a run begun under other defaults goes on as it began
            print(f"resuming {resume_from} with its own keys where the command line sets none: {', '.join(kept)}")
        config.check(C, architecture=not C.init_from)  # init_from's depth etc. are checked once inherited
    except (ConfigError, ValueError) as e:
        fail(e)
    except CheckpointError as e:
        fail(f"{e}: move it away, use another --out_dir, or --resume never")
    return C, ckpt_path, resume_from, ck


def stage_start(C, ck, resume_from):
    """init_from: the stage's architecture (into C) and position grid, from its own checkpoint ck when it resumes.
    -> (the checkpoint whose EMA weights start a new stage, or None; its grid, or None). Errors exit 2."""
    if not C.init_from:
        return None, None
    try:
        source = ck if ck is not None else load_checkpoint(C.init_from, need=FOR_SAMPLING)
        inherit_architecture(C, source, C.init_from if ck is None else resume_from, DEFAULTS)
        config.check(C)  # the inherited depth against route_from / route_to and the levers' blocks
    except (CheckpointError, ConfigError, ValueError) as e:
        fail(f"--init_from: {e}")
    return (source if ck is None else None), source["model_config"]["input_size"]


def setup_distributed(C):
    """torchrun sets RANK: one process per GPU (NCCL; gloo on the CPU). Sets C.device. -> a namespace of the run's
    rank, world size, the host-side control group and the autocast context."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    C.device = config.resolve_device(C.device)
    rank, world, ctrl = 0, 1, None
    if ddp:
        dist.init_process_group(backend="nccl" if C.device.startswith("cuda") else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
        # host-side control messages (the cache path, stop and horizon decisions) over gloo on CPU tensors: they
        # never wait for the GPU. The long timeout covers rank 0 building the cache while the others wait.
        ctrl = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        if C.device.startswith("cuda"):
            C.device = f"cuda:{local_rank}"
            torch.cuda.set_device(C.device)
    cuda = C.device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and C.dtype == "bfloat16"
           else contextlib.nullcontext())
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0, ctrl=ctrl, cuda=cuda, ctx=ctx)


def open_data(C, D):
    """Rank 0 builds the latent cache once (or finds it); every rank opens it. -> (cache, text encoder: with its
    image tower when the in-run eval scores CLIP with it, so that a run loads its CLIP once)"""
    try:
        cache_path = error = None
        if D.master:
            try:  # small buckets merge until each holds an optimizer step; sides divide into the model's patches
                layout = dict(aspect_buckets=C.aspect_buckets, max_aspect=C.max_aspect, text_chunks=C.text_chunks,
                              patch=config_from_keys(C).patch, min_bucket=C.batch * C.accum * D.world)
                cache_path = datalib.ensure_cache(C.data, C.resolution, C.vae, C.text_encoder, cache_dir=C.cache_dir,
                                                  device=C.device, text_states=C.text_states, **layout)
            except LoadError as e:  # data.DataError is one
                error = str(e)
        if D.ddp:  # the others learn the path, or rank 0's error, and exit with the same message
            holder = [(cache_path, error)]
            dist.broadcast_object_list(holder, src=0, group=D.ctrl)
            cache_path, error = holder[0]
        if error:
            raise LoadError(error)
        cache = datalib.LatentCache(cache_path)
        clip_eval = (C.eval_every > 0 and C.text_encoder != "tiny"
                     and monitor.eval_kind(cache.manifest.get("source_kind")) == "clip")
        return cache, load_text_encoder(C.text_encoder, device=C.device, image_tower=clip_eval, chunks=C.text_chunks)
    except LoadError as e:
        fail(e)


def build_model(C, latent_shape, text_encoder, init=None, base_grid=None):
    """-> (model, EMA copy in eval mode, optimizer, Diffusion, Levers), seeded by C.seed. init (init_from's
    checkpoint): its EMA weights start both. base_grid (init_from's training grid): the model's position grid, so
    that a new resolution interpolates the positions the weights learnt, as sampling at another resolution does."""
    torch.manual_seed(C.seed)
    mcfg = config_from_keys(C, in_channels=latent_shape[0], input_size=base_grid or latent_shape[1],
                            text_dim=text_encoder.dim, pooled_dim=text_encoder.pooled_dim)
    if latent_shape[1] % mcfg.patch:
        fail(f"{latent_shape[1]} x {latent_shape[2]} latents are not divisible by patch {mcfg.patch}: "
             "change --resolution or --patch")
    model = DiT(mcfg).to(C.device)
    ema = DiT(mcfg).to(C.device).eval().requires_grad_(False)
    if C.fp8:  # before the optimizer and torch.compile; the same parameters and state dict keys, so the EMA stays plain
        convert_to_fp8(model)
    if init is not None:
        try:
            model.load_state_dict(init["ema"])
        except RuntimeError as e:  # e.g. another latent channel count or text width
            fail(f"--init_from {C.init_from}: its weights do not fit this model: {str(e).splitlines()[0]}")
    ema.load_state_dict(model.state_dict())
    head = SRAHead(mcfg.width).to(C.device) if C.sra_weight > 0 else None  # drawn after the model's init
    optimizer = configure_optimizer(model, C.lr, C.weight_decay, (C.adam_beta1, C.adam_beta2), C.optimizer, C.muon_lr,
                                    head)
    levers = Levers.from_config(vars(C), mcfg.depth, lambda x, tt, c, **k: ema(x, tt, *c, **k), head)
    return model, ema, optimizer, Diffusion.from_config(vars(C)), levers


def setup(C, D, ckpt_path, resume_from, ck, init, base_grid, argv):
    """Data, model, EMA, optimizer, loader, the resumed state, compile and DDP, the stop signals, and rank 0's logs.
    -> the run: a namespace of what the loop uses (the step and the horizon included)."""
    print0 = print if D.master else (lambda *a, **k: None)
    cache, text_encoder = open_data(C, D)
    latent_shape, shapes = tuple(cache.manifest["latent_shape"]), cache.latent_shapes  # the square's; each bucket's
    noise_shape = shapes[0] if len(shapes) == 1 else (latent_shape[0], max(h * w for _, h, w in shapes))  # largest
    raw_model, ema_model, optimizer, diffusion, levers = build_model(C, latent_shape, text_encoder, init, base_grid)
    if init is not None:
        init.clear()  # its tensors freed now (the caller holds this same dict)
    try:
        loader = Loader(cache, C.batch, seed=C.seed, rank=D.rank, world_size=D.world, cond_drop=C.cond_drop,
                        flip=C.flip, device=C.device, accum=C.accum)
    except ValueError as e:  # fewer samples than one global batch
        fail(f"{e}: lower --batch")
    step, elapsed, horizon = 0, 0.0, Horizon(C, C.max_steps)
    if ck is not None:
        try:
            step, elapsed, planned = restore(ck, resume_from, C, raw_model, ema_model, optimizer, loader, levers.head)
        except ValueError as e:
            loader.close()
            fail(e)
        set_hyperparameters(optimizer, C)  # this run's settings, not the checkpoint's
        if C.max_hours > 0 and planned is not None:  # keep a planned horizon; a step budget's is max_steps
            horizon.steps = min(planned, C.max_steps)
        print0(f"resumed from {resume_from} at step {step}")  # resume wins over init_from: a stage continues
        ck.clear()  # its tensors freed now (the caller holds this same dict)
    elif C.init_from:
        print0(f"EMA weights of {C.init_from} start a new run: step 0, fresh optimizer")
    note = fit_warmup(C, DEFAULTS["warmup"])
    if note:
        print0(note)
    model = compile_model(raw_model, len(shapes)) if C.compile and D.cuda else raw_model
    if D.ddp:
        model = DDP(model, device_ids=[torch.device(C.device).index] if D.cuda else None)
    params, ema_params = list(raw_model.parameters()), list(ema_model.parameters())
    tuned = params + (list(levers.head.parameters()) if levers.head is not None else [])  # + SRA's head
    assert all(p.requires_grad for p in tuned) and sum(len(g["params"]) for g in optimizer.param_groups) == len(tuned)

    G = C.batch * C.accum * D.world  # images per optimizer step
    p = raw_model.config.patch
    tokens = max((h // p) * (w // p) for _, h, w in shapes)  # routing scores: for the largest bucket
    square = (latent_shape[1] // p) * (latent_shape[2] // p)  # the start-up line's (buckets: about as many)
    print0(monitor.describe(C, raw_model, latent_shape, square, len(cache), G, D.world, loader))
    # stop on SIGTERM/SIGINT after the current step, with a checkpoint
    stop = {"signal": None}
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                         for s in (signal.SIGTERM, signal.SIGINT)}
    run_log = bar = None
    if D.master:
        from tqdm import tqdm
        os.makedirs(os.path.join(C.out_dir, "samples"), exist_ok=True)
        run_log = monitor.RunLog(C, monitor.environment(C, argv, step))
        bar = tqdm(total=horizon.steps, initial=step, dynamic_ncols=True, disable=None)
    return SimpleNamespace(
        model=model, raw_model=raw_model, ema_model=ema_model, params=params, ema_params=ema_params,
        optimizer=optimizer, diffusion=diffusion, text_encoder=text_encoder, loader=loader, noise_shape=noise_shape,
        G=G, tokens=tokens, step=step, horizon=horizon, ckpt_path=ckpt_path, run_log=run_log, bar=bar,
        progress=monitor.Progress(C, D, raw_model, G, latent_shape[1], diffusion.T, step, elapsed),
        watcher=monitor.Watcher(C, cache.manifest.get("source_kind"), ema_model, diffusion, text_encoder, ckpt_path),
        stop=stop, previous_handlers=previous_handlers, levers=levers)


def log_step(C, D, R, lr):
    """A log step: one record to log.jsonl and the console, the horizon re-planned; too many non-finite steps in a
    row stop the run (exit 1). -> whether the time budget is spent."""
    rec, worst, time_up = R.progress.record(R.step, lr, R.horizon)
    if D.master:
        R.run_log.write(rec)
        R.bar.total = R.horizon.steps
        R.bar.write(monitor.console_line(rec))
    R.progress.next_interval(R.step)
    if worst >= C.max_bad_steps:
        fail(f"{worst} non-finite steps in a row by step {R.step}; stopping. The last good checkpoint "
             f"({R.ckpt_path}) is untouched.", code=1)
    return time_up


def save_and_watch(C, R, last, signalled):
    """Rank 0 after a step: the checkpoint and curves.png (before sampling: a failed preview never costs training),
    then the preview grid and the eval record when they are due (not on a signal: the run is stopping)."""
    step, W = R.step, R.watcher
    if step % C.ckpt_every == 0 or last or signalled:
        save_checkpoint(R.ckpt_path, checkpoint_state(C, R.raw_model, R.ema_model, R.optimizer, R.loader, step,
                                                      R.progress.elapsed(), R.horizon.steps, R.levers.head))
        R.run_log.curves()
    if signalled:
        return
    if W.sampling and (step % C.sample_every == 0 or last):
        W.preview(step)
    if W.evaluating and (step % C.eval_every == 0 or last):
        rec = W.evaluate(step)
        if rec is not None:
            R.run_log.write(rec)
            R.bar.write(f"eval step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in rec.items()
                                                             if k not in ("event", "step")))


def agree(D, signalled, horizon, time_up):
    """Every step under DDP: all ranks take rank 0's horizon and time-up and stop together on any rank's signal
    (torchrun gives SIGTERM'd workers 30 s): a few bytes over the host-side gloo group, no GPU sync."""
    msg = torch.tensor([float(signalled), horizon if D.master else 0, float(time_up) if D.master else 0],
                       dtype=torch.float64)
    dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=D.ctrl)
    return bool(msg[0] > 0), int(msg[1]), bool(msg[2] > 0)

#################################################################################
#                                   The loop                                    #
#################################################################################

def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(config.usage(__doc__, __file__, DEFAULTS))
        sys.exit(0)
    C, ckpt_path, resume_from, ck = read_command_line(argv)
    init, base_grid = stage_start(C, ck, resume_from)  # init_from's errors exit 2 before the process group starts
    D = setup_distributed(C)
    R = setup(C, D, ckpt_path, resume_from, ck, init, base_grid, argv)
    del ck, init

    while R.step < R.horizon.steps:
        rand = step_noise(R.step, R.G, R.noise_shape, C.device, C, R.diffusion,
                          routed_tokens(R.step, R.horizon.steps, R.tokens, C))
        lr = lr_at(R.step, R.horizon.steps, C)
        out = train_step(R.model, R.optimizer, R.diffusion, R.loader, R.text_encoder.encode, rand, lr, C, D.ctx,
                         D.rank, D.world, R.levers)  # per-sample loss, t, grad norm, found_inf, the levers' terms
        ema_update(R.ema_params, R.params, R.step, C.ema_decay)
        R.step += 1
        R.progress.meter.add(*out)
        if R.bar is not None:
            R.bar.update(1)
        time_up = log_step(C, D, R, lr) if R.step % C.log_every == 0 or R.step >= R.horizon.steps else False
        signalled = R.stop["signal"] is not None
        if D.ddp:
            signalled, R.horizon.steps, time_up = agree(D, signalled, R.horizon.steps, time_up)
        if time_up:
            R.horizon.steps = R.step
        last = R.step >= R.horizon.steps  # after the re-planning: a horizon moved to this very step ends the run here
        if D.master:
            save_and_watch(C, R, last, signalled)
        if signalled:
            if D.master:
                print(f"signal {R.stop['signal'] or 'on another rank'}: checkpoint saved at step {R.step}, exiting")
            break

    for s, handler in R.previous_handlers.items():
        signal.signal(s, handler)
    R.loader.close()
    if R.bar is not None:
        R.bar.close()
        R.run_log.close()
    if D.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return {"step": R.step, "model": R.raw_model, "ema": R.ema_model, "optimizer": R.optimizer,
            "skipped": R.progress.skipped}


if __name__ == "__main__":
    main(sys.argv[1:])
