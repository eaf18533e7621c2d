"""
Training-step throughput, MFU and peak memory of our DiT against diffusers' PixArtTransformer2DModel at the same
depth/width/heads, run side by side in one process; plus the loader, the text encoder and the sampler.

    python bench.py                                    # B/2, L/2, XL/2 at 256 px, micro-batch 64, vs the PixArt peer
    python bench.py --models B/2,XL/2 --batch 64 --out bench.jsonl
    python bench.py --res 512 --models B/2 --batch 16
    python bench.py --models XL/2 --grad_ckpt true     # any other --key value is a train.py key (train.parse_args)
    python bench.py configs/NAME.py --models B/2       # or a train.py config file
    python bench.py --tiny                             # CPU smoke run (< 1 min): tiny shapes, the very same code paths

A training step is train.py's: step_noise + lr_at + train_step (the accumulation loop, diffusion.loss, backward,
clip, fused AdamW with on-device skip) + ema_update, under the same autocast and torch.compile rule (compiled on
CUDA only). The peer goes through the very same train_step via a thin adapter, so both sides pay for the same
loss (v-target MSE with min-SNR weights), optimizer and EMA, and only the network differs. Text states are fed
as cached-style device tensors, so neither the loader nor the text encoder is inside the timed step (both are
measured on their own below). Timing: CUDA events around blocks of steps, warm-up (and compilation) excluded,
ours and the peer alternating A B / B A in every round; step ms is the median over rounds.
"""
import argparse
import contextlib
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import data as datalib
import train
from diffusion import Diffusion
from model import PRESETS, DiT, make_config, peak_flops

TEXT_LEN, TEXT_DIM = 77, 768  # CLIP ViT-L/14 token states, the shape the peer's caption_channels expects
TINY = dict(depth=2, width=64, heads=4, patch=2)  # --tiny: ours and the peer at this shape, 8x8 latents
TINY_GRID, TINY_BATCH = 8, 4

#################################################################################
#                               The peer                                        #
#################################################################################

class PixArtPeer(nn.Module):
    """diffusers' PixArtTransformer2DModel behind our forward signature, so train.train_step drives it unchanged.
    `pooled` is unused: PixArt conditions on the timestep (adaLN-single) and the text states only."""
    def __init__(self, depth, width, heads, patch, grid, caption_channels=TEXT_DIM):
        super().__init__()
        from diffusers import PixArtTransformer2DModel
        self.net = PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4, out_channels=4,
            num_layers=depth, sample_size=grid, patch_size=patch, caption_channels=caption_channels,
            cross_attention_dim=width, use_additional_conditions=False, norm_type="ada_norm_single")

    def forward(self, x, t, text, pooled):
        # x (B, 4, H, W); t (B,) long; text (B, L, caption_channels) -> (B, 4, H, W)
        return self.net(x, encoder_hidden_states=text, timestep=t,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]

#################################################################################
#                               Helpers                                         #
#################################################################################

def card_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn, device):
    """Seconds that fn() takes: CUDA events on the GPU (device time between the two records), wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mem_now(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def counted_flops(build, grid, patch_in=4):
    """Training FLOPs per image (forward + backward of a batch of 1) counted by torch.utils.flop_counter on the
    meta device: shapes only, no memory, no compute. The same counter ANCHORS.md used for the peer's numbers."""
    with torch.device("meta"):
        net = build()
        x = torch.randn(1, patch_in, grid, grid)
        t = torch.randint(0, 1000, (1,))
        text, pooled = torch.randn(1, TEXT_LEN, TEXT_DIM), torch.randn(1, TEXT_DIM)
        counter = FlopCounterMode(display=False)
        with counter:
            net(x, t, text, pooled).float().pow(2).mean().backward()
    return counter.get_total_flops()


SYNC_WARNING = "called a synchronizing CUDA operation"  # c10/cuda/CUDAFunctions.cpp warn_or_error_on_sync


def count_syncs(fn, device):
    """(number of host<->device synchronizations while fn() runs, their Python call sites), from
    torch.cuda.set_sync_debug_mode, which warns at every synchronizing CUDA call (.item(), a pageable copy, ...)."""
    if device.type != "cuda":
        return None, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch's text for a sync; not its one-off "Synchronization debug mode is a prototype feature" notice that
    # set_sync_debug_mode itself raises (counting that gave a phantom sync on the first call, seen on an H100)
    hits = [w for w in caught if SYNC_WARNING in str(w.message)]
    return len(hits), sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in hits})


#################################################################################
#                         Training step: ours vs the peer                       #
#################################################################################

IMPLS = ("ours", "pixart")


@dataclasses.dataclass
class Case:
    name: str            # "ours DiT-B/2" | "pixart DiT-B/2"
    impl: str            # "ours" | "pixart"
    n_params: int = 0
    flops: float = 0.0   # training FLOPs per image used for MFU: ours model.estimate_flops(), the peer's counted
    flops_counted: float = 0.0  # torch.utils.flop_counter's count for either (a cross-check of estimate_flops)
    step: int = 0
    base: int = 0        # bytes allocated before this case was built
    resident: int = 0    # bytes this case keeps allocated between steps (weights, EMA, AdamW state, its batch)
    peak: int = 0        # bytes at the peak of its own step, the other case's resident memory excluded
    times: list = dataclasses.field(default_factory=list)  # seconds per step, one per timed round
    syncs: int = None    # host syncs in one step (CUDA only)
    sync_sites: list = dataclasses.field(default_factory=list)
    error: str = ""
    # the live objects, dropped by release()
    raw: nn.Module = None        # the uncompiled module
    model: nn.Module = None      # what train_step calls (compiled on CUDA when C.compile, as train.py does)
    optimizer: object = None
    params: list = None
    ema_params: list = None
    loader: object = None        # yields the same cached-style batch (latents, states, pooled) forever
    shape: tuple = None          # (C, h, w) of the latents
    img_s: float = None
    mfu: float = None

    def summarize(self, C, device):
        """img/s and MFU while the module is alive: ours through model.mfu, the peer through its counted FLOPs."""
        if self.times:
            self.img_s = C.batch * C.accum / statistics.median(self.times)
            peak = peak_flops(device)
            mfu = self.raw.mfu(self.img_s, device) if self.impl == "ours" else (self.img_s * self.flops / peak if peak else None)
            self.mfu = mfu if mfu is not None and math.isfinite(mfu) else None

    def release(self):
        self.raw = self.model = self.optimizer = self.params = self.ema_params = self.loader = None


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def our_config(preset, shape, grid, C):
    """Our DiT at the bench shape with train.py's model keys (grad_ckpt acts in training only)."""
    return make_config(preset, depth=shape["depth"], width=shape["width"], heads=shape["heads"], patch=shape["patch"],
                       in_channels=4, input_size=grid, text_dim=TEXT_DIM, pooled_dim=TEXT_DIM, adaln=C.adaln,
                       qk_norm=C.qk_norm, text_len=C.text_len, grad_ckpt=C.grad_ckpt)


def build_case(impl, label, preset, shape, grid, C, device):
    """Model, EMA, optimizer and a device batch, built as train.py builds them."""
    case = Case(f"{impl} {label}", impl, base=mem_now(device))
    torch.manual_seed(C.seed)
    if impl == "ours":
        mcfg = our_config(preset, shape, grid, C)
        build = lambda: DiT(mcfg)
        case.raw = build().to(device)
        case.flops = case.raw.estimate_flops()  # what model.mfu() uses
    else:
        build = lambda: PixArtPeer(shape["depth"], shape["width"], shape["heads"], shape["patch"], grid)
        case.raw = build().to(device)
        if C.grad_ckpt:
            case.raw.net.enable_gradient_checkpointing()  # the same memory-for-compute trade as ours
    case.flops_counted = counted_flops(build, grid)
    case.flops = case.flops or case.flops_counted
    case.params = list(case.raw.parameters())
    case.n_params = sum(p.numel() for p in case.params)
    case.ema_params = [p.detach().clone() for p in case.params]  # train.py keeps an EMA copy of every parameter
    case.optimizer = train.configure_optimizer(case.raw, C.lr, C.weight_decay, (C.adam_beta1, C.adam_beta2), device.type)
    case.model = torch.compile(case.raw) if C.compile and device.type == "cuda" else case.raw  # train.py's rule
    g = torch.Generator().manual_seed(C.seed)
    batch = {"latents": torch.randn(C.batch, 4, grid, grid, generator=g).to(device),
             "states": torch.randn(C.batch, TEXT_LEN, TEXT_DIM, generator=g).to(device),
             "pooled": torch.randn(C.batch, TEXT_DIM, generator=g).to(device)}
    case.loader, case.shape = itertools.repeat(batch), (4, grid, grid)
    return case


def no_text_encoder(tokens):
    raise AssertionError("bench batches carry text states: the text encoder must not run in the timed step")


def run_steps(case, n, C, diffusion, ctx, device):
    """n optimizer steps of `case`: the body of train.py's loop, minus its logging accumulators."""
    for _ in range(n):
        rand = train.step_noise(case.step, C.batch * C.accum, case.shape, device, C, diffusion.T)
        lr = train.lr_at(case.step, C.max_steps, C)
        train.train_step(case.model, case.optimizer, diffusion, case.loader, no_text_encoder, rand, lr, C, ctx)
        train.ema_update(case.ema_params, case.params, min(C.ema_decay, (1 + case.step) / (10 + case.step)))
        case.step += 1


def first_step(case, C, diffusion, ctx, device, log):
    """The compiling step; afterwards the case's resident memory (AdamW state exists, grads are freed)."""
    t0 = time.perf_counter()
    run_steps(case, 1, C, diffusion, ctx, device)
    sync(device)
    case.resident = mem_now(device) - case.base
    log(f"  {case.name}: first step{' (compiles)' if C.compile and device.type == 'cuda' else ''} "
        f"{time.perf_counter() - t0:.1f} s")


def timed_round(case, steps, C, diffusion, ctx, device):
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    at = mem_now(device)
    dt = time_block(lambda: run_steps(case, steps, C, diffusion, ctx, device), device)
    case.times.append(dt / steps)
    if device.type == "cuda":  # own transient peak + own resident memory: what the case would need alone
        case.peak = max(case.peak, torch.cuda.max_memory_allocated(device) - at + case.resident)


def profile_steps(case, C, diffusion, ctx, device, folder, log, n=3):
    """torch.profiler over n untimed steps: a Chrome/Perfetto trace in `folder` and the top ops on stderr."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_steps(case, n, C, diffusion, ctx, device)
        sync(device)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{case.name.replace(' ', '_').replace('/', '-')}.json")
    prof.export_chrome_trace(path)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(f"  profile of {n} steps of {case.name} -> {path}\n" + prof.key_averages().table(sort_by=sort, row_limit=20))


def bench_training(label, preset, shape, grid, C, device, ctx, diffusion, steps, rounds, warmup, log, sequential=False,
                   profile=""):
    """Ours and the peer at one shape. Both resident and alternating (A B, B A, ... so that clock and thermal drift
    hit both alike); where both do not fit (OOM), or with sequential=True, one at a time in the same process."""
    oom = None
    if not sequential:
        cases, case = [], None
        try:
            for impl in IMPLS:  # built and stepped one after the other, so that each one's resident memory is its own
                case = build_case(impl, label, preset, shape, grid, C, device)
                cases.append(case)
                first_step(case, C, diffusion, ctx, device, log)
            for _ in range(max(0, warmup - 1)):
                for case in cases:
                    run_steps(case, 1, C, diffusion, ctx, device)
            for case in cases:  # one untimed step under the sync detector: a step should have none
                case.syncs, case.sync_sites = count_syncs(lambda: run_steps(case, 1, C, diffusion, ctx, device), device)
            for r in range(rounds):
                for case in (cases if r % 2 == 0 else cases[::-1]):
                    timed_round(case, steps, C, diffusion, ctx, device)
            for case in cases:
                if profile:
                    profile_steps(case, C, diffusion, ctx, device, profile, log)
                case.summarize(C, device)
                case.release()
            return cases, "alternating"
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # inductor may wrap an OOM met while autotuning
            if "out of memory" not in str(e):
                raise
            oom = str(e).splitlines()[0]
        for case in cases:  # outside the except block, so that the traceback no longer pins the tensors
            case.release()
        cases = case = None
        torch._dynamo.reset()
        free_memory(device)
        log(f"  OOM with both models resident ({oom[:120]}); rerunning one at a time")
    cases = []
    for impl in IMPLS:
        case = Case(f"{impl} {label}", impl)
        try:
            case = build_case(impl, label, preset, shape, grid, C, device)
            first_step(case, C, diffusion, ctx, device, log)
            run_steps(case, max(0, warmup - 1), C, diffusion, ctx, device)
            case.syncs, case.sync_sites = count_syncs(lambda: run_steps(case, 1, C, diffusion, ctx, device), device)
            for _ in range(rounds):
                timed_round(case, steps, C, diffusion, ctx, device)
            if profile:
                profile_steps(case, C, diffusion, ctx, device, profile, log)
            case.summarize(C, device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if "out of memory" not in str(e):
                raise
            case.error = f"OOM alone: {str(e).splitlines()[0]}"
        case.release()
        torch._dynamo.reset()
        free_memory(device)
        cases.append(case)
    return cases, "sequential"


def train_record(case, peer, label, grid, C, device, mode):
    """One JSON-able row for a case (with ratios against the peer in ours' row)."""
    rec = {"kind": "train", "model": f"{case.impl} {label}", "impl": case.impl, "preset": label, "batch": C.batch,
           "accum": C.accum, "latent": [4, grid, grid], "compile": bool(C.compile and device.type == "cuda"),
           "grad_ckpt": C.grad_ckpt, "mode": mode}
    if case.error or not case.times:
        return {**rec, "error": case.error or "not timed"}
    rec.update(params=case.n_params, gflop_per_img=case.flops / 1e9, gflop_counted=case.flops_counted / 1e9,
               step_ms=statistics.median(case.times) * 1e3, step_ms_min=min(case.times) * 1e3,
               step_ms_max=max(case.times) * 1e3, img_s=case.img_s, mfu=case.mfu,
               peak_gb=case.peak / 2**30 if device.type == "cuda" else None, syncs_per_step=case.syncs,
               sync_sites=case.sync_sites)
    if case.impl == "ours" and peer is not None and peer.img_s:
        rec["ratio_vs_peer"] = case.img_s / peer.img_s
        rec["mem_ratio_vs_peer"] = case.peak / peer.peak if device.type == "cuda" and peer.peak else None
    return rec

#################################################################################
#                       Loader, text encoder, sampler                           #
#################################################################################

def bench_loader(C, grid, device, batches):
    """data.Loader samples/s over a small shapes cache (vae none: 3 x grid x grid "latents", tokens only)."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report
        n = max(256, 4 * C.batch)
        path = datalib.ensure_cache(f"shapes:{n}", grid, "none", "tiny", cache_dir=os.path.join(tmp, "cache"))
        loader = datalib.Loader(datalib.LatentCache(path), C.batch, seed=C.seed, cond_drop=C.cond_drop, device=device)
        for _ in range(2):
            next(loader)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(loader)
        sync(device)
        dt = time.perf_counter() - t0
        loader.close()
    return {"kind": "loader", "model": "data.Loader", "batch": C.batch, "latent": list(batch["latents"].shape[1:]),
            "samples_per_s": batches * C.batch / dt, "ms_per_batch": dt / batches * 1e3}


def bench_text_encoder(name, C, device, ctx, reps):
    """data.load_text_encoder(name).encode on (B, 77) token batches, as train_step runs it when states are not cached."""
    te = datalib.load_text_encoder(name, device=device)
    n = C.batch * C.accum
    tokens = te.tokenize([f"a photo of a red fox number {i} sitting in the snow, golden hour" for i in range(n)]).to(device)
    with ctx:
        te.encode(tokens)  # warm-up
    def work():  # under train_step's autocast, as it runs there
        with ctx:
            for _ in range(reps):
                te.encode(tokens)
    dt = time_block(work, device) / reps
    random_weights = name != "tiny" and "/" not in name and not os.path.exists(name)  # an open_clip arch alone
    return {"kind": "text_encoder", "model": te.name + (" (random weights: the cost only)" if random_weights else ""),
            "batch": n, "dim": te.dim,
            "params": sum(p.numel() for p in te.tower.parameters() if p is not None),
            "ms_per_step": dt * 1e3, "captions_per_s": n / dt}


def bench_sampling(preset, shape, grid, C, device, ctx, diffusion, batch=16, steps=50, cfg=7.5):
    """50-step DDIM with CFG (one batched forward of [uncond; cond]) at batch 16, as sample.py runs it (eager, eval)."""
    mcfg = our_config(preset, shape, grid, C)
    torch.manual_seed(C.seed)
    model = DiT(mcfg).to(device).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(C.seed)
    cond = (torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g).to(device), torch.randn(batch, TEXT_DIM, generator=g).to(device))
    uncond = (torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g).to(device).expand(batch, -1, -1),
              torch.randn(1, TEXT_DIM, generator=g).to(device).expand(batch, -1))
    def model_fn(x, t, c):  # sample.py's model_fn
        with ctx:
            return model(x, t, c[0], c[1]).float()
    def run(n_steps):
        gens = [torch.Generator(device).manual_seed(C.seed + i) for i in range(batch)]
        x_T = torch.stack([torch.randn((4, grid, grid), generator=gg, device=device) for gg in gens])
        return diffusion.sample(model_fn, x_T, cond, uncond=uncond, cfg=cfg, steps=n_steps, sampler="ddim", generator=gens)
    run(2)  # warm-up
    dt = time_block(lambda: run(steps), device)
    del model
    return {"kind": "sampling", "model": f"ours {preset}", "batch": batch, "steps": steps, "cfg": cfg, "sampler": "ddim",
            "latent": [4, grid, grid], "s_per_batch": dt, "img_s": batch / dt, "ms_per_step": dt / steps * 1e3}

#################################################################################
#                                   Main                                        #
#################################################################################

def fmt(v, spec, dash="-"):
    return dash if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def print_table(rows):
    head = ["model", "params", "GFLOP/img", "step ms", "img/s", "MFU", "peak GB", "ours/peer", "syncs/step"]
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["model"], "", "", "", "", "", "", "", r["error"][:60]])
            continue
        ratio = "ref" if r["impl"] == "pixart" else fmt(r.get("ratio_vs_peer"), ".2f") + ("x" if r.get("ratio_vs_peer") else "")
        lines.append([r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['gflop_per_img']:.4g}", f"{r['step_ms']:.1f}",
                      f"{r['img_s']:.1f}", fmt(r["mfu"] and r["mfu"] * 100, ".1f") + ("%" if r["mfu"] else ""),
                      fmt(r["peak_gb"], ".2f"), ratio, fmt(r["syncs_per_step"], "d")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(l, widths)) + " |" for l in lines]
    print("\n".join(out))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Other --key value pairs (and a leading config file) go to train.parse_args.")
    p.add_argument("--models", default="B/2,L/2,XL/2", help="comma-separated presets (B/2 or DiT-B/2), or none (only the "
                   "loader and text encoder rows); ignored with --tiny")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: train.py's, 64)")
    p.add_argument("--res", type=int, default=None, help="image side in px; latents are 4 x res/8 x res/8 (default 256)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile as train.py does (CUDA only; default: train.py's compile key)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case per round (default 10; --tiny 2)")
    p.add_argument("--rounds", type=int, default=None, help="alternating timed rounds (default 3; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per case, the compiling one included (default 3; --tiny 1)")
    p.add_argument("--text_encoder", default=None,
                   help="encoder to time (default: the architecture of train.py's, random weights, e.g. ViT-L-14; 'tiny' with --tiny)")
    p.add_argument("--sequential", action="store_true",
                   help="one model resident at a time (automatic after an OOM with both resident), else alternating")
    p.add_argument("--profile", default="", help="also profile 3 untimed steps of each case: Chrome traces into this folder")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: a < 1 min CPU smoke run of every path")
    p.add_argument("--out", default="", help="append the JSON lines to this file")
    args, rest = p.parse_known_args(argv)
    try:
        config = train.parse_args(rest)
    except train.ConfigError as e:
        p.error(str(e))
    C = SimpleNamespace(**config)
    if args.batch is not None:
        C.batch = args.batch
    if args.res is not None:
        C.resolution = args.res
    if args.compile is not None:
        C.compile = args.compile
    if args.tiny:
        C.batch = args.batch or TINY_BATCH
    C.device = ("cuda" if torch.cuda.is_available() else "cpu") if C.device == "auto" else C.device
    args.models = [] if args.models.strip().lower() == "none" else \
        [m.strip() if m.strip().startswith("DiT-") else f"DiT-{m.strip()}" for m in args.models.split(",")]
    for name in args.models:
        if name not in PRESETS:
            p.error(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    if C.resolution % 16:
        p.error(f"--res {C.resolution}: must be a multiple of 16 (8x VAE, patch 2)")
    return args, C


def main(argv):
    args, C = parse(argv)
    device = torch.device(C.device)
    if args.tiny and device.type == "cpu":  # tiny ops gain nothing from intra-op threads, and on a busy 2-core
        torch.set_num_threads(1)            # machine OpenMP spin-waits made them 10-20x slower (measured)
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py's main()
    torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[C.dtype]
    ctx = torch.autocast(device.type, dtype=ptdtype) if device.type == "cuda" and ptdtype != torch.float32 else contextlib.nullcontext()
    diffusion = Diffusion(schedule=C.schedule, beta_start=C.beta_start, beta_end=C.beta_end, prediction=C.prediction,
                          zero_terminal_snr=C.zero_terminal_snr)
    if args.tiny:
        grid, presets = TINY_GRID, [("tiny", "DiT-S/2", TINY)]
        steps, rounds, warmup = args.steps or 2, args.rounds or 2, args.warmup or 1
    else:
        grid = C.resolution // 8
        presets = [(name.removeprefix("DiT-"), name, PRESETS[name]) for name in args.models]
        steps, rounds, warmup = args.steps or 10, args.rounds or 3, args.warmup or 3
    compiled = bool(C.compile and device.type == "cuda")
    import diffusers
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    meta = {"cmd": " ".join(["python bench.py", *argv]), "card": card_name(device), "date": date, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": str(device), "dtype": C.dtype if device.type == "cuda" else "float32",
            "compile": compiled, "qk_norm": C.qk_norm, "text_len": C.text_len}
    print(f"# bench.py | {meta['card']} | {date} | torch {torch.__version__} | diffusers {diffusers.__version__}")
    print(f"# {C.resolution if not args.tiny else grid * 8} px -> latents 4x{grid}x{grid}, text {TEXT_LEN}x{TEXT_DIM} | "
          f"micro-batch {C.batch} x accum {C.accum} | autocast {meta['dtype']} | compile {compiled} | "
          f"grad_ckpt {C.grad_ckpt} | adaln {C.adaln} | qk_norm {C.qk_norm} | text_len {C.text_len} | "
          f"{warmup} warm-up + {rounds} rounds x {steps} timed steps per case")
    print(f"# peak FLOP/s for MFU: {fmt(peak_flops(device) and peak_flops(device) / 1e12, '.1f', 'unknown')} TFLOP/s (model.PEAK_FLOPS)")
    sys.stdout.flush()
    log = lambda s: print(s, file=sys.stderr, flush=True)

    records = []
    def emit(rec):  # each record reaches --out as soon as it exists: a run cut short keeps what it measured
        records.append(rec)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**meta, **rec}) + "\n")

    for label, preset, shape in presets:
        log(f"[train] {label} {shape}")
        (ours, peer), mode = bench_training(label, preset, shape, grid, C, device, ctx, diffusion, steps, rounds, warmup, log,
                                            sequential=args.sequential, profile=args.profile)
        for rec in (train_record(ours, peer, label, grid, C, device, mode), train_record(peer, None, label, grid, C, device, mode)):
            emit(rec)
            log(f"  {rec['model']}: " + (rec["error"] if rec.get("error") else
                f"{rec['step_ms']:.1f} ms/step, {rec['img_s']:.1f} img/s, peak {fmt(rec['peak_gb'], '.2f')} GB"))
        torch._dynamo.reset()  # drop the compiled graphs before the next shape
        free_memory(device)

    train_rows = list(records)
    print()
    print_table(train_rows)
    for label, _, _ in presets:
        o = next(r for r in train_rows if r["model"] == f"ours {label}")
        if "ratio_vs_peer" in o:
            mem = o.get("mem_ratio_vs_peer")
            print(f"# {label}: ours {o['ratio_vs_peer']:.2f}x the peer's img/s (target >= 1.2x)"
                  + (f", {mem:.2f}x its peak memory (target <= 1.0x), {o['peak_gb']:.1f} GB "
                     f"({'fits' if o['peak_gb'] < 32 else 'does not fit'} 32 GB)" if mem else ""))
        if not o.get("error"):
            print(f"# {label}: GFLOP/img is model.estimate_flops for ours ({o['gflop_counted']:.4g} by torch.utils.flop_counter), "
                  f"the flop counter's for the peer")
        if o.get("syncs_per_step"):
            print(f"# {label}: ours has {o['syncs_per_step']} host syncs per step, at {', '.join(o['sync_sites'])}")
    sys.stdout.flush()

    log("[loader]")
    rec = bench_loader(C, grid, device, batches=20 if args.tiny else 200)
    emit(rec)
    print(f"\nloader: {rec['samples_per_s']:.0f} samples/s ({rec['ms_per_batch']:.2f} ms per batch of {rec['batch']}, "
          f"latents {'x'.join(map(str, rec['latent']))} fp16 from a memmap cache)")

    log("[text encoder]")
    # The cost does not depend on the weights: by default time train.py's encoder architecture with random weights
    # ("ViT-L-14/laion2b_s32b_b82k" -> "ViT-L-14": the CLIP-L/14 text tower, no download). --text_encoder NAME loads NAME.
    name = "tiny" if args.tiny else args.text_encoder or (C.text_encoder.split("/")[0] if "/" in C.text_encoder
                                                            and not os.path.exists(C.text_encoder) else C.text_encoder)
    reps = 10 if device.type == "cuda" else 2
    try:
        rec = bench_text_encoder(name, C, device, ctx, reps)
    except Exception as e:  # not loadable here (offline, not cached): the tiny tower instead, and say so
        log(f"  cannot load {name!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); timing 'tiny' instead")
        rec = bench_text_encoder("tiny", C, device, ctx, reps)
    ours_ms = {r["preset"]: r["step_ms"] for r in train_rows if r["impl"] == "ours" and not r.get("error")}
    rec["share_of_step"] = {k: rec["ms_per_step"] / (ms + rec["ms_per_step"]) for k, ms in ours_ms.items()}
    emit(rec)
    share = ", ".join(f"{v * 100:.1f}% of a {k} step" for k, v in rec["share_of_step"].items())
    print(f"text encoder {rec['model']} ({rec['params'] / 1e6:.1f}M): {rec['ms_per_step']:.2f} ms per step of "
          f"{rec['batch']} captions if text states are not cached ({share})")

    for label, preset, shape in presets:
        log(f"[sampling] {label}")
        rec = bench_sampling(preset, shape, grid, C, device, ctx, diffusion)
        rec["model"] = f"ours {label}"
        emit(rec)
        print(f"sampling ours {label}: {rec['s_per_batch']:.2f} s per batch of {rec['batch']} "
              f"({rec['steps']}-step DDIM, CFG {rec['cfg']}: {rec['ms_per_step']:.1f} ms/step, {rec['img_s']:.2f} img/s)")

    print("\n" + "\n".join(json.dumps({**meta, **r}) for r in records))
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
