"""
Train a text-conditioned DiT on cached VAE latents.

    python train.py                                   # the defaults below: SD VAE + CLIP ViT-L/14, 256 px
    python train.py configs/shapes.py                 # the offline CPU demo
    python train.py --batch 64 --accum 12             # micro-batch 64, 12 micro-steps per optimizer step
    torchrun --standalone --nproc_per_node=8 train.py configs/rtx5090_week.py --accum 1   # 32 x 1 x 8 = 256/step

Every global below is a command-line key (`--key value` or `--key=value`) and can be set by a config file (a
Python file that assigns some of them). Rerunning the same command after a crash or preemption continues from
out_dir/ckpt.pt (resume = "auto"). The file reads top to bottom: the globals, checking them, the pieces of a
step (bench.py and the tests call these very functions), the setup, then main() with the loop.
"""
import builtins
import contextlib
import dataclasses
import difflib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data as datalib
from diffusion import PREDICTIONS, SCHEDULES, Diffusion
from model import PRESETS, DiT, DiTConfig, convert_to_fp8, fp8_split, make_config
from sample import (FOR_RESUMING, FOR_SAMPLING, CheckpointError, Pipeline, generate, load_checkpoint, make_grid,
                    save_checkpoint, save_png)

_SAMPLE_PROMPTS = ("a red fox in the snow|an astronaut riding a horse|a bowl of fruit on a wooden table|"
                   "a lighthouse at sunset")
# -----------------------------------------------------------------------------
# defaults: DiT-B/2 on SD VAE latents with CLIP ViT-L/14 text at 256 px, on the built-in shapes until --data
# points at real data; the week's run on a 5090 is configs/rtx5090_week.py
# I/O
data = "shapes"            # metadata.jsonl imagefolder, images + .txt, webdataset .tar shards, a cache, or "shapes"
cache_dir = ""             # where the latent cache is built ("" = cache/<name from data + encoders>)
out_dir = "out"            # ckpt.pt, log.jsonl and samples/ go here
resume = "auto"            # auto (continue from out_dir/ckpt.pt if it exists) | never | a checkpoint path
init_from = ""             # a checkpoint whose weights start this run (fresh optimizer, step 0; architecture from it)
log_every = 50             # optimizer steps between log lines (the only host syncs of the loop)
tensorboard = False        # also log to TensorBoard (out_dir/tb; needs the tensorboard package)
wandb_project = ""         # also log to this Weights & Biases project ("" = off; needs the wandb package)
ckpt_every = 1000          # optimizer steps between checkpoints (also at the end and on SIGTERM/SIGINT)
sample_every = 5000        # optimizer steps between sample grids with the EMA weights (0 = never)
sample_prompts = _SAMPLE_PROMPTS  # '|'-separated prompts of the sample grids
sample_cfg = 5.0           # classifier-free guidance scale of the sample grids
eval_every = 0             # optimizer steps between evals of the EMA weights (0 = never): the shapes / scenes probe
                           # on built-in data, else CLIP score (the text encoder's own CLIP) of sample_prompts
# data and the frozen encoders
resolution = 256           # image side in pixels (latent side = resolution / 8 with the SD VAE)
vae = "stabilityai/sd-vae-ft-mse"  # diffusers AutoencoderKL name or folder, or "none" (pixel space)
text_encoder = "ViT-L-14/laion2b_s32b_b82k"  # open_clip "arch/pretrained", an open_clip checkpoint, or "tiny"
text_states = False        # cache the encoder's token states (118 KB/caption at CLIP-L), not token ids
cond_drop = 0.1            # caption dropout probability, for classifier-free guidance
flip = False               # random horizontal flips, "left" <-> "right" swapped in the caption (both are cached); off:
                           # mirrored text and asymmetric things no longer match their captions (docs/log.md 2026-11-29)
# model
model = "DiT-B/2"          # preset name from model.PRESETS
depth = 0                  # 0 = the preset's value
width = 0                  # 0 = the preset's value
heads = 0                  # 0 = the preset's value
patch = 0                  # 0 = the preset's value
adaln = "single"           # "single" (PixArt adaLN-single) | "zero" (DiT adaLN-Zero per block)
qk_norm = True             # RMSNorm on queries and keys (bf16 stability; cost: docs/log.md 2026-11-26 11:19)
rope = True                # 2-D RoPE in self-attention, on top of the fixed sin-cos position embedding
cross_norm = True          # affine LayerNorm before the cross-attention (PixArt-alpha has none)
cross_gate = False         # an adaLN gate on the cross-attention branch too (DiT-style gates on all three branches)
text_proj = "mlp"          # text states -> width: mlp (PixArt's caption projection) | linear (one Linear)
weight_init = "dit"        # dit (xavier-uniform linears, normal(0.02) embedders) | torch (nn.Linear's default init)
text_len = 77              # text tokens the DiT cross-attends to: the first N of the encoder's 77
grad_ckpt = False          # activation checkpointing per block (memory for compute)
ckpt_blocks = 0            # with grad_ckpt: checkpoint only the first N blocks (0 = all): less recompute, more memory
route_frac = 0.0           # token routing in training (TREAD, arXiv 2501.04765): this share of tokens skips blocks
route_from = 2             # blocks[route_from:route_to] (a negative route_to counts from the end; 0 = off); sampling
route_to = -2              # never routes, and a run may resume with other route_* (e.g. an unrouted finish)
route_until = 1.0          # routing stops after this share of the run's steps: TREAD's unrouted finish (1 = never)
# diffusion
schedule = "scaled_linear"  # linear | scaled_linear | cosine
beta_start = 0.00085       # first beta (linear schedules)
beta_end = 0.012           # last beta (linear schedules)
prediction = "v"           # v | eps | x0 | flow (rectified flow, SD3: (1 - sigma) x0 + sigma eps -> eps - x0)
flow_shift = 1.0           # flow: sigma -> s sigma / (1 + (s - 1) sigma), training and sampling (SD3); > 1: noisier
zero_terminal_snr = False  # rescale betas to SNR 0 at t = T-1 (arXiv 2305.08891); needs v or x0
min_snr_gamma = 0.0        # min-SNR-gamma loss weighting (arXiv 2303.09556); 0 = off (flow: must be 0); off by
                           # measurement: it bought nothing on shapes and slowed prompt learning (docs/log.md 2026-11-29)
t_logit_mean = 0.0         # timesteps T * sigmoid(N(mean, std)) (SD3, arXiv 2403.03206); > 0: noisier
t_logit_std = 0.0          # 0 = timesteps uniform on 0..T-1
noise_offset = 0.0         # offset noise strength (per-channel constant added to the noise)
input_perturbation = 0.0   # input perturbation strength (arXiv 2301.11706)
# optimisation
batch = 64                 # micro-batch per GPU
accum = 1                  # micro-steps per optimizer step (global batch = batch * accum * GPUs)
lr = 1e-4                  # peak learning rate (AdamW)
optimizer = "adamw"        # adamw | muon (torch.optim.Muon on the blocks' weight matrices, AdamW with `lr` on the rest)
muon_lr = 0.02             # Muon's peak learning rate (its schedule is lr's, scaled by muon_lr / lr)
lr_schedule = "wsd"        # constant | cosine | wsd (warmup-stable-decay)
warmup = 1000              # optimizer steps of linear LR warmup
decay_frac = 0.2           # wsd: share of the run spent decaying the LR linearly to 0
max_steps = 400_000        # optimizer steps
max_hours = 0.0            # wall-clock budget; > 0 plans the LR decay to end on time (0 = off)
weight_decay = 0.0         # decoupled weight decay, on parameters of >= 2 dims (linear and conv weights)
adam_beta1 = 0.9           # AdamW beta1
adam_beta2 = 0.999         # AdamW beta2
grad_clip = 1.0            # gradient-norm clipping (0 = off)
ema_decay = 0.9999         # EMA decay (warmed up as min(ema_decay, (1 + n) / (10 + n)))
max_bad_steps = 20         # consecutive non-finite steps that stop the run
# system
device = "auto"            # auto | cpu | cuda | cuda:N
dtype = "bfloat16"         # autocast dtype on CUDA: bfloat16 | float32 (the CPU always runs float32)
compile = True             # torch.compile the model (CUDA only)
fp8 = False                # the blocks' linears in float8 (torchao, tensorwise; CUDA compute capability 8.9+)
seed = 0                   # seeds the data order, the noise and the init
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and type(v) in (int, float, bool, str)]
DEFAULTS = {k: globals()[k] for k in CONFIG_KEYS}


class ConfigError(Exception):
    pass


def _convert(key, value, default):
    """Parse a command-line string (or check a config-file value) against the default's type."""
    kind = type(default)
    if not isinstance(value, str):
        if kind is float and type(value) is int:
            return float(value)
        if type(value) is not kind:
            raise ConfigError(f"--{key} expects {kind.__name__}, got {value!r}")
        return value
    if kind is bool:
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise ConfigError(f"--{key} expects a boolean (true/false/1/0), got {value!r}")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"--{key} expects {kind.__name__}, got {value!r}") from None


def _check_key(key):
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, CONFIG_KEYS, n=3)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown key {key!r}{hint}")


def parse_args(argv):
    """[configs/NAME.py] [--key value | --key=value ...] -> a full config dict. Raises ConfigError."""
    config = dict(DEFAULTS)
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} not found")
        scope = {"__file__": os.path.abspath(path)}  # a config may read another beside it (configs/rtx5090_week_512.py)
        try:
            exec(builtins.compile(open(path).read(), path, "exec"), scope)  # `compile` is a key here
        except Exception as e:  # a syntax error, a NameError: one line, not a traceback
            raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from None
        keys = [k for k, v in scope.items() if not k.startswith("_") and type(v).__name__ != "module"]
        if not keys:  # e.g. JSON, or `batch: 8` (a bare annotation binds nothing)
            raise ConfigError(f"config file {path} assigns no keys: it is Python, one `key = value` per line")
        for key in keys:
            _check_key(key)
            config[key] = _convert(key, scope[key], DEFAULTS[key])
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        _check_key(key)
        if not eq:
            if not args:
                raise ConfigError(f"--{key} needs a value")
            value = args.pop(0)
        config[key] = _convert(key, value, DEFAULTS[key])
    return config


CHOICES = dict(lr_schedule=("constant", "cosine", "wsd"), optimizer=("adamw", "muon"), dtype=("bfloat16", "float32"),
               prediction=PREDICTIONS, schedule=SCHEDULES, adaln=("single", "zero"), model=tuple(PRESETS),
               text_proj=("mlp", "linear"), weight_init=("dit", "torch"))
AT_LEAST = dict(batch=1, accum=1, max_steps=1, log_every=1, ckpt_every=1, sample_every=0, eval_every=0, warmup=0,
                max_hours=0, depth=0, width=0, heads=0, patch=0, max_bad_steps=1, grad_clip=0, weight_decay=0,
                min_snr_gamma=0, t_logit_std=0, noise_offset=0, input_perturbation=0, resolution=8, ckpt_blocks=0)
UNIT = ("cond_drop", "decay_frac", "ema_decay", "route_until")  # in [0, 1]


def check_config(C):
    """Values that would fail later (after an hours-long cache build, or after the first step): ConfigError now."""
    for key, options in CHOICES.items():
        if getattr(C, key) not in options:
            close = difflib.get_close_matches(str(getattr(C, key)), options, n=1)
            raise ConfigError(f"--{key} {getattr(C, key)!r}: one of {', '.join(options)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    for key, low in AT_LEAST.items():
        if not getattr(C, key) >= low:
            raise ConfigError(f"--{key} {getattr(C, key)}: must be >= {low}")
    for key in UNIT:
        if not 0 <= getattr(C, key) <= 1:
            raise ConfigError(f"--{key} {getattr(C, key)}: must be in [0, 1]")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(C, key) < 1:
            raise ConfigError(f"--{key} {getattr(C, key)}: must be in [0, 1)")
    try:  # the model's and the schedule's own checks (DiTConfig, Diffusion), before the cache build
        make_config(C.model, depth=C.depth, width=C.width, heads=C.heads, patch=C.patch, adaln=C.adaln,
                    route_frac=C.route_frac, route_from=C.route_from, route_to=C.route_to, ckpt_blocks=C.ckpt_blocks)
        make_diffusion(C).check_min_snr(C.min_snr_gamma)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("lr", "muon_lr"):
        if not (math.isfinite(getattr(C, key)) and getattr(C, key) > 0):
            raise ConfigError(f"--{key} {getattr(C, key)}: must be a positive number")
    if C.route_frac > 0 and C.route_until < 1 and C.max_hours > 0:  # the horizon would be planned from routed
        raise ConfigError("--route_until needs a step budget (--max_hours 0): a time budget plans the run's "  # steps
                          "length from routed steps, and the slower unrouted finish would end before its LR decay")
    if C.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optimizer muon: this torch ({torch.__version__}) has no torch.optim.Muon (2.9 and later)")
    if not 1 <= C.text_len <= datalib.CONTEXT_LENGTH:
        raise ConfigError(f"--text_len {C.text_len}: must be 1..{datalib.CONTEXT_LENGTH} (the encoder's tokens)")
    if C.sample_every > 0 and not sample_prompt_list(C):
        raise ConfigError("--sample_prompts has no prompt ('|'-separated); or --sample_every 0")
    if C.device != "auto":
        try:
            dev = torch.device(C.device)
        except RuntimeError as e:
            raise ConfigError(f"--device {C.device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {C.device}: torch sees no CUDA device here (use --device cpu)")
    check_speed_keys(C)


def check_speed_keys(C):
    """The memory and precision keys (train.py and bench.py): ckpt_blocks only with grad_ckpt; fp8 (torchao's float8
    training) needs a CUDA card with FP8 tensor cores, compute capability 8.9+ (Ada, Hopper, Blackwell), and the
    torchao package. ConfigError otherwise, before any work."""
    if C.ckpt_blocks > 0 and not C.grad_ckpt:
        raise ConfigError(f"--ckpt_blocks {C.ckpt_blocks}: only with --grad_ckpt true")
    if not C.fp8:
        return
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if C.device == "auto" else C.device)
    if device.type != "cuda":
        raise ConfigError(f"--fp8 true: needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+), "
                          f"not the {device.type}")
    try:
        major, minor = torch.cuda.get_device_capability(device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ConfigError(f"--fp8 true: --device {C.device}: {str(e).splitlines()[0]}") from None
    if (major, minor) < (8, 9):
        raise ConfigError(f"--fp8 true: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has "
                          "no FP8 tensor cores (8.9+: Ada, Hopper, Blackwell)")
    try:
        import torchao.float8  # noqa: F401  (imported only when asked: an optional package)
    except ImportError as e:
        raise ConfigError(f"--fp8 true: {e} (pip install torchao)") from None


def make_diffusion(C):
    return Diffusion(schedule=C.schedule, beta_start=C.beta_start, beta_end=C.beta_end, prediction=C.prediction,
                     zero_terminal_snr=C.zero_terminal_snr, flow_shift=C.flow_shift)


def sample_prompt_list(C):
    return [q for q in C.sample_prompts.split("|") if q.strip()]


def usage():
    """The docstring, then every key with its default and the comment it has at the top of this file."""
    notes = dict(re.findall(r"^(\w+) = .*?#\s*(.*)$", open(__file__).read(), flags=re.M))
    width = max(map(len, CONFIG_KEYS))
    lines = [f"  --{k:<{width}}  {DEFAULTS[k]!r:<12}  {notes.get(k, '')}" for k in CONFIG_KEYS]
    return (__doc__.strip() + "\n\nkeys (--key value or --key=value; defaults shown):\n" + "\n".join(lines))

# -----------------------------------------------------------------------------
# the pieces of a step (bench.py and the tests call these very functions)

def muon_params(model):
    """The parameters Muon updates: the 2-D weight matrices of the blocks' attention and MLP linears (Muon is for
    hidden layers; embedders, the final layer, biases, norms and modulation stay with AdamW)."""
    return [p for name, p in model.blocks.named_parameters() if p.ndim == 2 and "adaLN" not in name]


def configure_optimizer(model, lr, weight_decay, betas, optimizer="adamw", muon_lr=0.02):
    """AdamW, decay on parameters of >= 2 dims only; fused (one kernel per step, and it can skip a step on device).
    optimizer "muon": Muon (muon_lr) on muon_params(model), this AdamW (lr) on the rest, as one MuonAdamW."""
    muon = {id(p) for p in muon_params(model)} if optimizer == "muon" else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in muon]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    if optimizer == "adamw":
        return adamw
    # "original" lr adjustment (Keller Jordan's Muon: sqrt(max(1, fan_out / fan_in))); lr_scale: its share of lr
    muon = torch.optim.Muon(muon_params(model), lr=muon_lr, weight_decay=weight_decay, adjust_lr_fn="original")
    muon.param_groups[0]["lr_scale"] = muon_lr / lr
    return MuonAdamW(muon, adamw)


class MuonAdamW:
    """Muon and AdamW as one optimizer to the loop (param_groups, step, zero_grad, state_dict). A non-finite step
    (found_inf = 1, set by train_step) changes nothing, with no host sync: fused AdamW skips on the device, and
    Muon's weights and momentum are put back from a copy taken before its step (torch.where on found_inf)."""
    def __init__(self, muon, adamw):
        self.muon, self.adamw, self.found_inf, self._saved = muon, adamw, None, None
        self._params = [p for g in muon.param_groups for p in g["params"]]
        for p in self._params:  # made now (as Muon would at its first step) so that the copy covers them
            muon.state[p]["momentum_buffer"] = torch.zeros_like(p)

    @property
    def param_groups(self):  # live: load_state_dict replaces the group dicts
        return self.adamw.param_groups + self.muon.param_groups

    def step(self):
        self.adamw.found_inf = self.found_inf
        self.adamw.step()
        live = self._params + [self.muon.state[p]["momentum_buffer"] for p in self._params]
        if self.found_inf is not None:
            if self._saved is None:
                self._saved = [t.detach().clone() for t in live]
            else:
                torch._foreach_copy_(self._saved, live)
        self.muon.step()
        if self.found_inf is not None:
            bad = self.found_inf.bool()
            with torch.no_grad():
                for t, saved in zip(live, self._saved):
                    t.copy_(torch.where(bad, saved, t))

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state):
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


def lr_decay_start(horizon, C):
    """The step the LR starts to fall: the end of warmup for cosine, the last decay_frac of the run for wsd."""
    return C.warmup if C.lr_schedule == "cosine" else int(horizon * (1 - C.decay_frac))


def lr_at(step, horizon, C):
    """Linear warmup, then constant, cosine (to 0 at `horizon`) or warmup-stable-decay (linear to 0 over the last
    decay_frac)."""
    if step < C.warmup:
        return C.lr * (step + 1) / C.warmup
    if C.lr_schedule == "constant":
        return C.lr
    start = lr_decay_start(horizon, C)
    if step < start:
        return C.lr
    progress = min(1.0, (step - start) / max(1, horizon - start))
    if C.lr_schedule == "cosine":
        return C.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return C.lr * (1 - progress)


def step_noise(step, n, shape, device, C, diffusion, tokens=0):
    """All randomness of one optimizer step, a function of (seed, step) alone: the same samples get the same
    t and noise whatever the micro-batch, accumulation or number of ranks (exact resume, accum and DDP).
    -> (t, noise, offset noise, input perturbation, token routing scores (n, tokens)); None where unused."""
    g = torch.Generator(device=device).manual_seed(C.seed * 1_000_003 + step)
    t = diffusion.draw_t(n, g, device, C.t_logit_mean, C.t_logit_std)  # the logit-normal, or uniform
    noise = torch.randn((n, *shape), generator=g, device=device)
    offset = torch.randn((n, shape[0], 1, 1), generator=g, device=device) if C.noise_offset > 0 else None
    perturb = torch.randn((n, *shape), generator=g, device=device) if C.input_perturbation > 0 else None
    route = torch.rand((n, tokens), generator=g, device=device) if C.route_frac > 0 and tokens > 0 else None
    return t, noise, offset, perturb, route  # (route drawn last: an unrouted step draws the same t and noise)


def routed_tokens(step, horizon, tokens, C):
    """Tokens that step_noise scores for routing at this step: all of them until route_until of the horizon, then
    none (the unrouted finish; TREAD, arXiv 2501.04765, finishes its runs unrouted)."""
    return tokens if C.route_frac > 0 and step < round(horizon * C.route_until) else 0


def train_step(model, optimizer, diffusion, loader, encode_text, rand, lr, C, ctx, rank=0, world=1):
    """One optimizer step: C.accum micro-steps of forward + backward, then clip and AdamW. No host sync:
    a non-finite gradient makes fused AdamW skip the update on the device (the found_inf hook GradScaler uses)."""
    t_all, noise_all, offset_all, perturb_all, route_all = rand
    ddp = isinstance(model, DDP)
    losses, ts = [], []
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
                loss, per_sample, t = diffusion.loss(
                    lambda x, tt, c: model(x, tt, *c, **route), batch["latents"], cond,
                    min_snr_gamma=C.min_snr_gamma, noise_offset=C.noise_offset, input_perturbation=C.input_perturbation,
                    t=pick(t_all), noise=pick(noise_all), offset_noise=pick(offset_all),
                    perturb_noise=pick(perturb_all))
            (loss / C.accum).backward()
        losses.append(per_sample)
        ts.append(t)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, C.grad_clip if C.grad_clip > 0 else float("inf"))
    found_inf = (~torch.isfinite(grad_norm)).float()
    optimizer.found_inf = found_inf  # fused AdamW skips the whole update (and its step count) where this is 1
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: muon_lr / lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.cat(losses), torch.cat(ts), grad_norm, found_inf


@torch.no_grad()
def ema_update(ema_params, params, decay):
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema <- decay * ema + (1 - decay) * p


# -----------------------------------------------------------------------------
# setup: each piece of main() that runs once, in the order main() calls them

def fail(message, code=2):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def find_resume(C):
    """-> (out_dir/ckpt.pt, the checkpoint to resume from or None). A run never overwrites a checkpoint that is not
    its own: --resume never or a path with an existing out_dir/ckpt.pt is an error."""
    if C.resume not in ("auto", "never") and not os.path.isfile(C.resume):
        raise ConfigError(f"--resume {C.resume!r}: no such checkpoint")
    ckpt_path = os.path.join(C.out_dir, "ckpt.pt")
    if C.resume != "auto" and os.path.exists(ckpt_path) and os.path.abspath(C.resume) != os.path.abspath(ckpt_path):
        raise ConfigError(f"{ckpt_path} exists and --resume {C.resume} would overwrite it: "
                          "use another --out_dir, or move the checkpoint away")
    if C.resume == "auto":
        return ckpt_path, (ckpt_path if os.path.exists(ckpt_path) else None)
    return ckpt_path, (None if C.resume == "never" else C.resume)


def setup_distributed(C):
    """torchrun sets RANK: one process per GPU (NCCL; gloo on the CPU). Sets C.device. -> a namespace of the run's
    rank, world size, the host-side control group and the autocast context."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if C.device == "auto":
        C.device = "cuda" if torch.cuda.is_available() else "cpu"
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
    """Rank 0 builds the latent cache once (or finds it); every rank opens it. -> (cache, text encoder)"""
    try:
        cache_path = error = None
        if D.master:
            try:
                cache_path = datalib.ensure_cache(C.data, C.resolution, C.vae, C.text_encoder, cache_dir=C.cache_dir,
                                                  device=C.device, text_states=C.text_states)
            except datalib.DataError as e:
                error = str(e)
        if D.ddp:  # the others learn the path, or rank 0's error, and exit with the same message
            holder = [(cache_path, error)]
            dist.broadcast_object_list(holder, src=0, group=D.ctrl)
            cache_path, error = holder[0]
        if error:
            raise datalib.DataError(error)
        return datalib.LatentCache(cache_path), datalib.load_text_encoder(C.text_encoder, device=C.device)
    except datalib.DataError as e:
        fail(e)


def model_config(C, channels, side, text_dim, pooled_dim):
    """The DiTConfig of train.py's model keys on (channels, side, side) latents (bench.py and scripts/ablate.py
    build theirs here too)."""
    return make_config(C.model, depth=C.depth, width=C.width, heads=C.heads, patch=C.patch, in_channels=channels,
                       input_size=side, text_dim=text_dim, pooled_dim=pooled_dim, text_len=C.text_len,
                       adaln=C.adaln, qk_norm=C.qk_norm, rope=C.rope, cross_norm=C.cross_norm, cross_gate=C.cross_gate,
                       text_proj=C.text_proj, weight_init=C.weight_init, grad_ckpt=C.grad_ckpt,
                       route_frac=C.route_frac, route_from=C.route_from, route_to=C.route_to,
                       ckpt_blocks=C.ckpt_blocks)


def inherit_architecture(C, init, path):
    """init_from: the model keys left at their defaults take the checkpoint's values; one set otherwise must agree.
    The encoders must be the checkpoint's (the weights were trained on their latents and states). ConfigError."""
    saved, mc = init.get("config", {}), init["model_config"]
    for key in ("vae", "text_encoder"):
        if key in saved and getattr(C, key) != saved[key]:
            raise ConfigError(f"{path} was trained with --{key} {saved[key]}, this run has {getattr(C, key)}")
    C.model = saved.get("model", C.model) if C.model == DEFAULTS["model"] else C.model
    for key in ("depth", "width", "heads", "patch", "adaln", "qk_norm", "rope", "cross_norm", "cross_gate", "text_proj"):
        have = mc.get(key, getattr(DiTConfig, key))  # checkpoints older than rope / cross_norm have them on
        if getattr(C, key) == DEFAULTS[key]:
            setattr(C, key, have)
        elif getattr(C, key) != have:
            raise ConfigError(f"--{key} {getattr(C, key)}: the weights of {path} have {key} {have}")
    if C.text_len == DEFAULTS["text_len"]:
        C.text_len = mc["text_len"]
    if C.text_len > mc["text_len"]:
        raise ConfigError(f"--text_len {C.text_len}: {path} was trained on {mc['text_len']} text tokens")


def stage_start(C, ck, resume_from):
    """init_from: the stage's architecture (into C) and position grid, from its own checkpoint ck when it resumes.
    -> (the checkpoint whose EMA weights start a new stage, or None; its grid, or None). Errors exit 2."""
    if not C.init_from:
        return None, None
    try:
        source = ck if ck is not None else load_checkpoint(C.init_from, need=FOR_SAMPLING)
        inherit_architecture(C, source, C.init_from if ck is None else resume_from)
        check_config(C)  # the inherited depth against route_from / route_to
    except (CheckpointError, ConfigError) as e:
        fail(f"--init_from: {e}")
    return (source if ck is None else None), source["model_config"]["input_size"]


def build_model(C, latent_shape, text_encoder, init=None, base_grid=None):
    """-> (model, EMA copy in eval mode, AdamW, Diffusion), seeded by C.seed. init (init_from's checkpoint): its EMA
    weights start both. base_grid (init_from's training grid): the model's position grid, so that a new resolution
    interpolates the positions the weights learnt, as sampling at another resolution does."""
    torch.manual_seed(C.seed)
    mcfg = model_config(C, latent_shape[0], latent_shape[1], text_encoder.dim, text_encoder.pooled_dim)
    if base_grid is not None:
        mcfg = dataclasses.replace(mcfg, input_size=base_grid)
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
            ema.load_state_dict(init["ema"])
        except RuntimeError as e:  # e.g. another latent channel count or text width
            fail(f"--init_from {C.init_from}: its weights do not fit this model: {str(e).splitlines()[0]}")
    else:
        ema.load_state_dict(model.state_dict())
    optimizer = configure_optimizer(model, C.lr, C.weight_decay, (C.adam_beta1, C.adam_beta2), C.optimizer, C.muon_lr)
    return model, ema, optimizer, make_diffusion(C)


def restore(ck, path, C, model, ema, optimizer, loader):
    """Continue from a checkpoint: weights, EMA, optimizer state, loader position, RNG. -> (step, elapsed s, horizon)"""
    # neither activation checkpointing, token routing nor the init of weights that come from the checkpoint matters
    same = lambda a: {k: v for k, v in a.items()
                      if k not in ("grad_ckpt", "ckpt_blocks", "route_frac", "route_from", "route_to", "weight_init")}
    try:  # keys a checkpoint predates (rope, cross_norm, route_*) take DiTConfig's defaults: what it was trained with
        saved = dataclasses.asdict(DiTConfig(**ck["model_config"]))
    except (TypeError, ValueError):
        saved = ck["model_config"]
    if same(saved) != same(dataclasses.asdict(model.config)):
        loader.close()
        fail(f"{path} holds a different model ({ck['model_config']}); use another --out_dir or --resume never")
    model.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    kind = "muon" if "muon" in ck["optimizer"] else "adamw"
    if kind != C.optimizer:
        loader.close()
        fail(f"{path} was trained with --optimizer {kind}, not {C.optimizer}: use another --out_dir")
    optimizer.load_state_dict(ck["optimizer"])
    # the optimizer's state dict brings back its hyperparameters too: this run's settings win
    for group, wd in zip(optimizer.param_groups, (C.weight_decay, 0.0, C.weight_decay)):  # AdamW's two, Muon's
        group["weight_decay"] = wd
        if "betas" in group:
            group["betas"] = (C.adam_beta1, C.adam_beta2)
        else:
            group["lr_scale"] = C.muon_lr / C.lr
    loader.load_state_dict(ck["loader_state"])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"]["cpu"])
    progress = ck.get("progress", {})
    # keep a planned horizon (max_hours); without a budget the horizon is max_steps
    horizon = min(progress.get("horizon", C.max_steps), C.max_steps) if C.max_hours > 0 else C.max_steps
    return ck["step"], progress.get("elapsed_s", 0.0), horizon


def checkpoint_state(C, model, ema, optimizer, loader, step, elapsed_s, horizon):
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "config": dict(vars(C)), "model_config": dataclasses.asdict(model.config),
            "loader_state": loader.state_dict(), "rng": {"cpu": torch.get_rng_state()},
            "progress": {"elapsed_s": elapsed_s, "horizon": horizon}}


def warmup_warning(C):
    """cosine decays over (warmup, max_steps], wsd from its decay start: a warmup past that eats the decay. -> the
    warning, or None (also used by scripts/ablate.py, whose equal-FLOPs rows get few steps)."""
    decay_from = C.max_steps - 1 if C.lr_schedule == "cosine" else lr_decay_start(C.max_steps, C)
    if C.max_hours == 0 and C.lr_schedule != "constant" and C.warmup > decay_from:
        return (f"warning: warmup {C.warmup} runs past step {decay_from} of {C.max_steps}, where the LR should be "
                "decaying: the LR will not follow its schedule (lower --warmup)")


def environment(C, argv, step):
    """log.jsonl's first record of a process: what ran, from which commit, with which versions, on what, how."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout
        commit = git("rev-parse", "HEAD").strip() or "unknown"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", False
    versions = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "open_clip_torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cuda = C.device.startswith("cuda")
    return {"event": "start", "command": ["train.py", *argv], "git_commit": commit, "git_dirty": dirty,
            "versions": versions, "device": torch.cuda.get_device_name(C.device) if cuda else platform.processor()
            or platform.machine(), "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "step": step, "config": dict(vars(C))}


class Horizon:
    """The run's last optimizer step. With max_hours > 0 it is re-planned at log steps from the measured seconds per
    step, so that the LR decay ends on time (under DDP rank 0's plan is the one every rank follows)."""
    def __init__(self, C, steps):
        self.C, self.steps, self.first_log = C, steps, None

    def plan(self, step, elapsed_s):
        """At a log step: re-plan. -> whether the budget is spent."""
        C = self.C
        if C.max_hours <= 0:
            return False
        # seconds per step: the mean since this process's first log step (checkpoint writes and sample grids
        # included, as they recur). The first interval is not used: it holds the compile and, after a resume, may be
        # a few steps long; planning from it would freeze wsd's horizon far too early.
        if self.first_log is None:
            self.first_log = (time.time(), step)
        # wsd freezes the horizon once its decay has begun (moving it would make the LR jump); cosine decays from
        # the end of warmup, so its horizon keeps being corrected (a smooth change)
        elif not (C.lr_schedule == "wsd" and step >= lr_decay_start(self.steps, C)):
            rate = (time.time() - self.first_log[0]) / max(step - self.first_log[1], 1)
            self.steps = max(step, min(C.max_steps, step + int((C.max_hours * 3600 - elapsed_s) / rate)))
        return elapsed_s >= C.max_hours * 3600


class Meter:
    """A log interval's sums, kept on the device: adding is free of host syncs, reading is one."""
    def __init__(self, device, T, bins=10):
        self.T, self.bins = T, bins
        self.sums = {k: torch.zeros((), device=device) for k in ("loss", "n", "skipped", "grad_norm")}
        self.bin_sum, self.bin_cnt = torch.zeros(bins, device=device), torch.zeros(bins, device=device)
        self.bad_streak = torch.zeros((), device=device)  # non-finite steps in a row now
        self.bad_worst = torch.zeros((), device=device)   # the longest such streak since the last read

    def add(self, per_sample, t, grad_norm, found_inf):
        ok = 1.0 - found_inf  # skipped steps stay out of the averages
        per_sample = torch.where(ok > 0, per_sample, 0.0)
        self.sums["loss"] += per_sample.mean()
        self.sums["n"] += ok
        self.sums["skipped"] += found_inf
        self.sums["grad_norm"] += torch.where(ok > 0, grad_norm, 0.0)
        self.bad_streak = (self.bad_streak + 1) * found_inf
        self.bad_worst = torch.maximum(self.bad_worst, self.bad_streak)
        b = (t * self.bins // self.T).long().clamp(0, self.bins - 1)  # the loss in bins of timestep (flow: float t)
        self.bin_sum.index_add_(0, b, per_sample)
        self.bin_cnt.index_add_(0, b, ok.expand_as(per_sample))

    def read(self, D):
        """Sum over ranks, read, reset. -> (mean loss, mean grad norm, skipped steps, loss by t bin, worst streak)"""
        if D.ddp:
            for v in (*self.sums.values(), self.bin_sum, self.bin_cnt):
                dist.all_reduce(v)
        n = max(self.sums["n"].item(), 1e-9)
        out = (self.sums["loss"].item() / n, self.sums["grad_norm"].item() / n,
               int(round(self.sums["skipped"].item() / D.world)),
               [round(s / max(c, 1e-9), 5) for s, c in zip(self.bin_sum.tolist(), self.bin_cnt.tolist())],
               int(self.bad_worst.item()))
        for v in (*self.sums.values(), self.bin_sum, self.bin_cnt, self.bad_worst):
            v.zero_()
        return out


class Progress:
    """The log steps' bookkeeping: the meter's device-side sums, the clock (elapsed seconds across resumes), the
    skipped steps so far, and the record that log.jsonl and the console get."""
    def __init__(self, C, D, model, G, grid, T, step, elapsed_s):
        self.C, self.D, self.model, self.G, self.grid = C, D, model, G, grid  # grid: the latent side (MFU)
        self.meter, self.skipped = Meter(C.device, T), 0
        self.elapsed0, self.t_start = elapsed_s, time.time()
        self.t_log, self.step_log = self.t_start, step

    def elapsed(self):
        return self.elapsed0 + time.time() - self.t_start

    def record(self, step, lr, horizon):
        """Read the meter (the host sync: the clock after it) and re-plan the horizon. -> (the record, the longest
        run of non-finite steps since the last read, whether the time budget is spent)"""
        C, D = self.C, self.D
        loss, gnorm, skipped, loss_by_t, worst = self.meter.read(D)
        now = self.elapsed()
        time_up = horizon.plan(step, now)
        self.skipped += skipped
        dt = time.time() - self.t_log
        imgs = (step - self.step_log) * self.G / dt
        mfu = self.model.mfu(imgs / D.world, C.device, self.grid)  # nan where the peak is unknown (CPU)
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "images_per_s": imgs,
               "mfu": mfu if math.isfinite(mfu) else None, "skipped": self.skipped,
               "peak_mem_gb": torch.cuda.max_memory_allocated(C.device) / 2**30 if D.cuda else 0.0,
               "eta_h": (horizon.steps - step) * dt / max(step - self.step_log, 1) / 3600, "elapsed_h": now / 3600,
               "loss_by_t": loss_by_t}
        return rec, worst, time_up

    def next_interval(self, step):
        """The next interval's clock starts after this log step's writes (as the images/s it reports)."""
        self.t_log, self.step_log = time.time(), step


@torch.no_grad()
def sample_grid(pipe, prompts, cfg, path):
    """The train-time preview: image k is sample.py's `--seed k` image of prompt k (sample.generate, 50 steps of
    the checkpoint's default sampler)."""
    images = generate(pipe, prompts, list(range(len(prompts))), cfg=cfg, steps=50)
    save_png(make_grid(images, cols=math.ceil(math.sqrt(len(prompts)))), path)


def ema_pipeline(pipe, C, ema, diffusion, text_encoder, step, ckpt_path):
    """sample.py's Pipeline around the live EMA weights (made once; the VAE loaded once)."""
    pipe = pipe or Pipeline(ema, diffusion, datalib.load_vae(C.vae, device=C.device), text_encoder, dict(vars(C)),
                            step, torch.device(C.device), ckpt_path)
    pipe.step = step
    return pipe


def preview_grid(pipe, C, ema, diffusion, text_encoder, step, ckpt_path):
    """out_dir/samples/NNNNNNN.png of the EMA weights. -> the pipeline to reuse next time, or None where it failed
    (out of memory, a VAE that cannot be loaded offline, ...): no more grids this run, and training goes on."""
    try:
        pipe = ema_pipeline(pipe, C, ema, diffusion, text_encoder, step, ckpt_path)
        sample_grid(pipe, sample_prompt_list(C), C.sample_cfg, os.path.join(C.out_dir, "samples", f"{step:07d}.png"))
        return pipe
    except Exception as e:
        print(f"warning: sample grid at step {step} failed ({type(e).__name__}: {str(e)[:200]}); no more sample "
              "grids this run (training continues; sample.py works on the checkpoint)", file=sys.stderr)
        return None


class Evaluator:
    """eval_every: a small fixed eval of the EMA weights (25 sampler steps at sample_cfg), as a record for log.jsonl:
    the built-in probe for shapes / scenes data (one image per probe prompt), CLIP score of sample_prompts (4 seeds
    each) otherwise, with the open_clip model the text encoder comes from (its image tower, loaded once here). A
    failure is one warning, and no more evals this run."""
    def __init__(self, C, cache):
        self.C, self.on, self.clip, self.pipe = C, C.eval_every > 0, None, None
        kind = cache.manifest.get("source_kind")  # what the cache was built from
        self.kind = kind if kind in ("shapes", "scenes") else "clip"

    def __call__(self, make_pipe, step):
        """make_pipe(the pipeline this made last time) -> the EMA pipeline; -> the eval record, or None."""
        if not self.on:
            return None
        import evaluate  # only here: evaluate.py is a consumer of train.py's checkpoints, not a part of the loop
        t0, C = time.time(), self.C
        try:
            pipe = self.pipe = make_pipe(self.pipe)
            if self.kind == "shapes":
                r = evaluate.probe_shapes(pipe, cfg=C.sample_cfg, n_per_prompt=1, steps=25)
                metrics = {"shape_acc": r["shape_acc"], "color_acc": r["color_acc"]}
            elif self.kind == "scenes":
                r = evaluate.probe_scenes(pipe, cfg=C.sample_cfg, n_per_prompt=1, steps=25)
                metrics = {"scenes_in": r["in_distribution"]["overall"], "scenes_held_out": r["held_out"]["overall"]}
            else:
                if self.clip is None:
                    if C.text_encoder == "tiny":
                        raise ValueError("the tiny text tower has no image tower to score with")
                    self.clip = evaluate.ClipScorer.load(C.text_encoder, device=C.device)
                prompts = sample_prompt_list(C) * 4
                images = generate(pipe, prompts, list(range(len(prompts))), cfg=C.sample_cfg, steps=25)
                metrics = {"clip_score": float(self.clip(images, prompts).mean())}
        except Exception as e:
            print(f"warning: eval at step {step} failed ({type(e).__name__}: {str(e)[:200]}); no more evals this "
                  "run (training continues; evaluate.py works on the checkpoint)", file=sys.stderr)
            self.on = False
            return None
        return {"event": "eval", "step": step, **metrics, "eval_s": time.time() - t0}


def check_trackers(C):
    """The optional loggers' packages, imported now (a missing one: ConfigError before any work)."""
    try:
        if C.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        if C.wandb_project:
            import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--{'tensorboard' if C.tensorboard else 'wandb_project'}: {e} "
                          f"(pip install {'tensorboard' if C.tensorboard else 'wandb'})") from None


class RunLog:
    """out_dir/log.jsonl (the environment record, then one record per log step), its mirrors in TensorBoard and
    W&B when asked for, and out_dir/curves.png (curves.py) redrawn at every checkpoint."""
    def __init__(self, C, env):
        self.dir, self.draw = C.out_dir, True
        self.file = open(os.path.join(C.out_dir, "log.jsonl"), "a")
        self.file.write(json.dumps(env) + "\n")
        self.file.flush()
        self.tb = self.wandb = None
        if C.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=os.path.join(C.out_dir, "tb"))
        if C.wandb_project:
            import wandb
            run_id = hashlib.sha1(os.path.abspath(C.out_dir).encode()).hexdigest()[:16]  # a resumed run continues
            self.wandb = wandb.init(project=C.wandb_project, name=os.path.basename(os.path.abspath(C.out_dir)),
                                    config=env["config"], dir=C.out_dir, id=run_id, resume="allow")

    def write(self, rec):
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}
        scalars.update({f"loss_by_t/{i}": v for i, v in enumerate(rec.get("loss_by_t") or [])})
        try:  # a mirror that fails (a full disk, the network) is one warning; log.jsonl goes on
            if self.tb is not None:
                for k, v in scalars.items():
                    self.tb.add_scalar(k, v, rec["step"])
            if self.wandb is not None:
                self.wandb.log(scalars, step=rec["step"])
        except Exception as e:
            print(f"warning: TensorBoard / W&B logging failed ({type(e).__name__}: {e}); log.jsonl only from now on",
                  file=sys.stderr)
            self.tb = self.wandb = None

    def curves(self):
        """Redraw curves.png; a failure (no matplotlib, a full disk) is one warning, and training goes on."""
        if self.draw:
            try:
                import curves
                curves.plot_curves({"run": self.file.name}, os.path.join(self.dir, "curves.png"))
            except Exception as e:
                print(f"warning: curves.png not drawn ({type(e).__name__}: {e}); no more tries this run")
                self.draw = False

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def describe(C, model, latent_shape, images, G, world):
    c, tokens = model.config, (latent_shape[1] // model.config.patch) ** 2
    params = sum(p.numel() for p in model.parameters())
    budget = f", {C.max_hours} h budget" if C.max_hours > 0 else ""
    first, end = c.routed_blocks
    until = f" for the first {C.route_until:.0%} of the steps" if C.route_until < 1 else ""
    routing = f" ({c.kept_tokens(tokens)} in blocks {first}..{end - 1}: routing{until})" if c.route_frac > 0 else ""
    fp8 = ""
    if C.fp8:  # the linears fp8_linear_filter picks, and the block linears it leaves out for their sizes
        picked, left = fp8_split(model)
        fp8 = f", {len(picked)} block linears in fp8" + (f" (not {', '.join(left)}: a side not a multiple of 16)"
                                                          if left else "")
    return (f"model {C.model}: {params / 1e6:.1f}M params, depth {c.depth} width {c.width} heads {c.heads} patch "
            f"{c.patch}, {latent_shape} latents -> {tokens} tokens{routing}{fp8}, "
            f"{model.estimate_flops(latent_shape[1]) / 1e9:.1f} GFLOP/img "
            f"(train)\n{images} images | micro-batch {C.batch} x accum {C.accum} x {world} ranks = {G} images/step | "
            f"{C.max_steps} steps max{budget} | device {C.device}")


def console_line(rec):
    mfu = "-" if rec["mfu"] is None else f"{rec['mfu'] * 100:.1f}%"
    return (f"step {rec['step']} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
            f"{rec['images_per_s']:.1f} img/s | mfu {mfu} | mem {rec['peak_mem_gb']:.1f} GB | "
            f"skipped {rec['skipped']} | eta {rec['eta_h']:.2f} h")


def agree(D, signalled, horizon, time_up):
    """Every step under DDP: all ranks take rank 0's horizon and time-up and stop together on any rank's signal
    (torchrun gives SIGTERM'd workers 30 s): a few bytes over the host-side gloo group, no GPU sync."""
    msg = torch.tensor([float(signalled), horizon if D.master else 0, float(time_up) if D.master else 0],
                       dtype=torch.float64)
    dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=D.ctrl)
    return bool(msg[0] > 0), int(msg[1]), bool(msg[2] > 0)

# -----------------------------------------------------------------------------

def read_command_line(argv):
    """The checked config and what to resume from; bad input (a bad checkpoint included) exits 2 before any work.
    -> (C, this run's checkpoint path, the checkpoint to resume from or None, its contents or None)"""
    try:
        C = SimpleNamespace(**parse_args(argv))
        check_config(C)
        check_trackers(C)
        ckpt_path, resume_from = find_resume(C)
        ck = load_checkpoint(resume_from, need=FOR_RESUMING) if resume_from else None  # a bad file fails fast
    except ConfigError as e:
        fail(e)
    except CheckpointError as e:
        fail(f"{e}: move it away, use another --out_dir, or --resume never")
    return C, ckpt_path, resume_from, ck


def setup(C, D, ckpt_path, resume_from, ck, init, base_grid, argv):
    """Data, model, EMA, optimizer, loader, the resumed state, compile and DDP, the stop signals, and rank 0's logs.
    -> the run: a namespace of what the loop uses (the step and the horizon included)."""
    print0 = print if D.master else (lambda *a, **k: None)
    cache, text_encoder = open_data(C, D)
    latent_shape = tuple(cache.latents.shape[2:])  # (C, h, w)
    raw_model, ema_model, optimizer, diffusion = build_model(C, latent_shape, text_encoder, init, base_grid)
    if init is not None:
        init.clear()  # its tensors freed now (the caller holds this same dict)
    try:
        loader = datalib.Loader(cache, C.batch, seed=C.seed, rank=D.rank, world_size=D.world, cond_drop=C.cond_drop,
                                flip=C.flip, device=C.device)
    except ValueError as e:  # fewer samples than one global batch
        fail(f"{e}: lower --batch")
    step, elapsed, horizon = 0, 0.0, Horizon(C, C.max_steps)
    if ck is not None:
        step, elapsed, horizon.steps = restore(ck, resume_from, C, raw_model, ema_model, optimizer, loader)
        print0(f"resumed from {resume_from} at step {step}")  # resume wins over init_from: a stage continues
        ck.clear()  # its tensors freed now (the caller holds this same dict)
    elif C.init_from:
        print0(f"EMA weights of {C.init_from} start a new run: step 0, fresh optimizer")
    warning = warmup_warning(C)
    if warning:
        print0(warning)
    model = torch.compile(raw_model) if C.compile and D.cuda else raw_model
    if D.ddp:
        model = DDP(model, device_ids=[torch.device(C.device).index] if D.cuda else None)
    params, ema_params = list(raw_model.parameters()), list(ema_model.parameters())
    assert all(p.requires_grad for p in params) and sum(len(g["params"]) for g in optimizer.param_groups) == len(params)

    G = C.batch * C.accum * D.world  # images per optimizer step
    tokens = (latent_shape[1] // raw_model.config.patch) * (latent_shape[2] // raw_model.config.patch)
    print0(describe(C, raw_model, latent_shape, len(cache), G, D.world))
    # stop on SIGTERM/SIGINT after the current step, with a checkpoint
    stop = {"signal": None}
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                         for s in (signal.SIGTERM, signal.SIGINT)}
    run_log = bar = None
    if D.master:
        from tqdm import tqdm
        os.makedirs(os.path.join(C.out_dir, "samples"), exist_ok=True)
        run_log = RunLog(C, environment(C, argv, step))
        bar = tqdm(total=horizon.steps, initial=step, dynamic_ncols=True, disable=None)
    return SimpleNamespace(
        model=model, raw_model=raw_model, ema_model=ema_model, params=params, ema_params=ema_params,
        optimizer=optimizer, diffusion=diffusion, text_encoder=text_encoder, loader=loader, latent_shape=latent_shape,
        G=G, tokens=tokens, step=step, horizon=horizon, ckpt_path=ckpt_path, run_log=run_log, bar=bar,
        progress=Progress(C, D, raw_model, G, latent_shape[1], diffusion.T, step, elapsed),
        evaluator=Evaluator(C, cache), preview=None, sampling=C.sample_every > 0, stop=stop,
        previous_handlers=previous_handlers)


def log_step(C, D, R, lr):
    """A log step: one record to log.jsonl and the console, the horizon re-planned; too many non-finite steps in a
    row stop the run (exit 1). -> whether the time budget is spent."""
    rec, worst, time_up = R.progress.record(R.step, lr, R.horizon)
    if D.master:
        R.run_log.write(rec)
        R.bar.total = R.horizon.steps
        R.bar.write(console_line(rec))
    R.progress.next_interval(R.step)
    if worst >= C.max_bad_steps:
        fail(f"{worst} non-finite steps in a row by step {R.step}; stopping. The last good checkpoint "
             f"({R.ckpt_path}) is untouched.", code=1)
    return time_up


def save_and_watch(C, R, last, signalled):
    """Rank 0 after a step: the checkpoint and curves.png (before sampling: a failed preview never costs training),
    then the preview grid and the eval record when they are due (not on a signal: the run is stopping)."""
    step = R.step
    if step % C.ckpt_every == 0 or last or signalled:
        save_checkpoint(R.ckpt_path, checkpoint_state(C, R.raw_model, R.ema_model, R.optimizer, R.loader, step,
                                                      R.progress.elapsed(), R.horizon.steps))
        R.run_log.curves()
    if signalled:
        return
    if R.sampling and (step % C.sample_every == 0 or last):
        R.preview = preview_grid(R.preview, C, R.ema_model, R.diffusion, R.text_encoder, step, R.ckpt_path)
        R.sampling = R.preview is not None
    if R.evaluator.on and (step % C.eval_every == 0 or last):
        rec = R.evaluator(lambda own: ema_pipeline(R.preview or own, C, R.ema_model, R.diffusion, R.text_encoder,
                                                   step, R.ckpt_path), step)
        if rec is not None:
            R.run_log.write(rec)
            R.bar.write(f"eval step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in rec.items()
                                                             if k not in ("event", "step")))


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        sys.exit(0)
    C, ckpt_path, resume_from, ck = read_command_line(argv)
    init, base_grid = stage_start(C, ck, resume_from)  # init_from's errors exit 2 before the process group starts
    D = setup_distributed(C)
    R = setup(C, D, ckpt_path, resume_from, ck, init, base_grid, argv)
    del ck, init

    # ---- the loop
    while R.step < R.horizon.steps:
        rand = step_noise(R.step, R.G, R.latent_shape, C.device, C, R.diffusion,
                          routed_tokens(R.step, R.horizon.steps, R.tokens, C))
        lr = lr_at(R.step, R.horizon.steps, C)
        per_sample, t, grad_norm, found_inf = train_step(R.model, R.optimizer, R.diffusion, R.loader,
                                                         R.text_encoder.encode, rand, lr, C, D.ctx, D.rank, D.world)
        ema_update(R.ema_params, R.params, min(C.ema_decay, (1 + R.step) / (10 + R.step)))
        R.step += 1
        R.progress.meter.add(per_sample, t, grad_norm, found_inf)
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
