"""
Training-step throughput, MFU and peak memory of our DiT against diffusers' PixArtTransformer2DModel at the same
depth/width/heads, run side by side in one process; plus the loader, the text encoder and the sampler.

    python bench.py                                    # B/2, L/2, XL/2 at 256 px, micro-batch 64, vs the PixArt peer
    python bench.py --models B/2,XL/2 --batch 64 --out bench.jsonl
    python bench.py --res 512 --models B/2 --batch 16
    python bench.py --models XL/2 --grad_ckpt true     # any other --key value is a train.py key (train.parse_args)
    python bench.py --models XL/2 --fp8 true --no_peer  # ours alone, the blocks' linears in float8 (torchao)
    python bench.py --models B/2 --parts sampling      # only the sampling rows (ours and the peer)
    python bench.py --report out/gpu/bench.jsonl --out out/gpu/gpu_check.json   # every row of a file, one table
    python bench.py configs/NAME.py --models B/2       # or a train.py config file
    python bench.py --tiny                             # CPU smoke run (< 1 min): tiny shapes, the very same code paths
    python bench.py --models none --batch 256 --text_encoder tiny   # only the loader and text encoder rows

A training step is train.py's (step_noise, lr_at, train_step with diffusion.loss, clip and fused AdamW, ema_update)
under its autocast and torch.compile rule (compiled on CUDA only). The peer goes through the same train_step via a
thin adapter, so only the network differs. Text states are cached-style device tensors: the loader and the text
encoder have rows of their own. A sampling row is sample.py's sample_latents around our DiT and around the peer
(the denoising loop, compiled on CUDA as sample.py runs it; no VAE decode). Every row goes through one runner,
run_cases: CUDA events around blocks of steps, warm-up (and compilation) excluded, cases alternating A B / B A in
every round; step ms is the median over rounds.
For a kernel profile, run under `python -m torch.utils.bottleneck` or torch.profiler.
"""
import argparse
import contextlib
import dataclasses
import datetime
import functools
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
import zlib
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import data as datalib
import sample
import train
from model import PRESETS, DiT, convert_to_fp8, fp8_aligned, fp8_linear_filter, peak_flops

TEXT_LEN, TEXT_DIM = 77, 768  # CLIP ViT-L/14 token states, the shape the peer's caption_channels expects
TINY = dict(depth=2, width=64, heads=4, patch=2)  # --tiny: ours and the peer at this shape, 8x8 latents
TINY_GRID, TINY_BATCH = 8, 4
PARTS = ("train", "loader", "text_encoder", "sampling")  # --parts: the kinds of rows, in the order they run
SYNC_WARNING = "called a synchronizing CUDA operation"  # c10/cuda/CUDAFunctions.cpp warn_or_error_on_sync

#################################################################################
#                 Timing: the one case runner of every row                      #
#################################################################################

def mem_now(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def free_memory(device):
    torch._dynamo.reset()  # the compiled graphs first: they hold on to the modules they were traced from
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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

@dataclasses.dataclass
class Case:
    name: str            # "ours DiT-B/2" | "pixart DiT-B/2"
    impl: str            # "ours" | "pixart"
    work: object = None  # work(n): n steps (optimizer steps, or one n-step denoising loop); holds the live objects
    images: float = 0.0  # images per step: batch * accum (an optimizer step), batch / steps (a denoising step)
    n_params: int = 0
    flops: float = 0.0   # training FLOPs per image used for MFU: ours model.estimate_flops(), the peer's counted
    flops_counted: float = 0.0  # torch.utils.flop_counter's count for either (a cross-check of estimate_flops)
    resident: int = 0    # bytes this case keeps allocated between steps (weights, EMA, AdamW state, its batch)
    peak: int = 0        # bytes at the peak of its own step, the other case's resident memory excluded
    first_s: float = 0.0  # seconds of the first (maybe compiling) step
    times: list = dataclasses.field(default_factory=list)  # seconds per step, one per timed round
    syncs: int = None    # host syncs in one step (CUDA only)
    sync_sites: list = dataclasses.field(default_factory=list)
    error: str = ""
    img_s: float = None
    out: object = None   # the last result: sampling, the latents; the loader, a batch


def run_cases(builders, steps, rounds, warmup, device, syncs=True):
    """Every timed row: training, loader, text encoder, sampling. Each build() -> Case takes its first step before
    the next is built, so that each one's resident memory is its own; warm-up steps; one untimed step under the sync
    detector (a training step should have none); then `rounds` blocks of `steps` steps per case, alternating A B,
    B A, ... so that clock and thermal drift hit all alike. Peak memory: a case's own transient peak plus its own
    resident memory, what it would need alone. -> the cases with their img/s, their live objects dropped."""
    cases, cuda = [], device.type == "cuda"
    for build in builders:  # the first (maybe compiling) step; then its resident memory: AdamW state, grads freed
        base = mem_now(device)
        cases.append(case := build())
        t0 = time.perf_counter()
        case.work(1)
        if cuda:
            torch.cuda.synchronize(device)
        case.first_s, case.resident = time.perf_counter() - t0, mem_now(device) - base
    for case in cases * max(0, warmup - 1):  # the warm-up steps after the first, round robin
        case.work(1)
    for case in cases if syncs else ():
        case.syncs, case.sync_sites = count_syncs(lambda: case.work(1), device)
    for r in range(rounds):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            if cuda:  # CUDA events: the device time between the two records; the wall clock on the CPU
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            at, t0 = mem_now(device), time.perf_counter()
            case.work(steps)
            if cuda:
                end.record()
                end.synchronize()
                case.peak = max(case.peak, torch.cuda.max_memory_allocated(device) - at + case.resident)
            case.times.append((start.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - t0) / steps)
    for case in cases:
        case.img_s = case.images / statistics.median(case.times) if case.times else None
        case.work = None
    return cases

#################################################################################
#                         Training step: ours vs the peer                       #
#################################################################################

class PixArtPeer(torch.nn.Module):
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


def peer_fp8_filter(module, name):
    """model.fp8_linear_filter's rule for the peer: the linears of its transformer blocks (self- and cross-attention,
    feed-forward) whose sides are multiples of 16; not its embedders, adaLN-single or output projection."""
    return isinstance(module, torch.nn.Linear) and name.startswith("net.transformer_blocks.") and fp8_aligned(module)


def our_config(preset, shape, grid, C):
    """Our DiT at the bench shape with train.py's model keys (grad_ckpt acts in training only)."""
    at = {**dict(depth=0, width=0, heads=0, patch=0), **shape}  # the preset's own values unless --tiny's shape
    return train.model_config(SimpleNamespace(**{**vars(C), "model": preset, **at}), 4, grid, TEXT_DIM, TEXT_DIM)


def build_case(impl, label, preset, shape, grid, C, device, diffusion, ctx):
    """Model, EMA, optimizer and a device batch, built as train.py builds them; case.work(n) runs n optimizer steps,
    the body of train.py's loop minus its logging accumulators."""
    torch.manual_seed(C.seed)
    mcfg = our_config(preset, shape, grid, C)
    if impl != "ours":  # the peer has no token routing, and Muon's split is written for our blocks: AdamW for it
        C = SimpleNamespace(**{**vars(C), "route_frac": 0.0, "optimizer": "adamw"})
    build = (lambda: DiT(mcfg)) if impl == "ours" else (lambda: PixArtPeer(**shape, grid=grid))
    raw = build().to(device)
    if impl == "pixart" and C.grad_ckpt:
        raw.net.enable_gradient_checkpointing()  # the same memory-for-compute trade as ours (every block)
    if C.fp8:  # train.py's conversion (before the optimizer and the compile), by the same rule for the peer
        convert_to_fp8(raw, fp8_linear_filter if impl == "ours" else peer_fp8_filter)
    # training FLOPs per image (forward + backward of a batch of 1) by torch.utils.flop_counter, for ours and the
    # peer alike, on the meta device: shapes only, no memory, no compute
    with torch.device("meta"):
        net, counter = build(), FlopCounterMode(display=False)
        with counter:
            net(torch.randn(1, 4, grid, grid), torch.randint(0, 1000, (1,)), torch.randn(1, TEXT_LEN, TEXT_DIM),
                torch.randn(1, TEXT_DIM)).float().pow(2).mean().backward()
    params = list(raw.parameters())
    ema_params = [p.detach().clone() for p in params]  # train.py keeps an EMA copy of every parameter
    optimizer = train.configure_optimizer(raw, C.lr, C.weight_decay, (C.adam_beta1, C.adam_beta2), C.optimizer,
                                          C.muon_lr)
    model = torch.compile(raw) if C.compile and device.type == "cuda" else raw  # train.py's rule
    def no_text_encoder(tokens):
        raise AssertionError("bench batches carry text states: the text encoder must not run in the timed step")
    g = torch.Generator().manual_seed(C.seed)
    loader = itertools.repeat({"latents": torch.randn(C.batch, 4, grid, grid, generator=g).to(device),
                               "states": torch.randn(C.batch, TEXT_LEN, TEXT_DIM, generator=g).to(device),
                               "pooled": torch.randn(C.batch, TEXT_DIM, generator=g).to(device)})
    steps = itertools.count()  # optimizer steps taken: step_noise and lr_at are functions of it, as in train.py
    def work(n):
        for step in itertools.islice(steps, n):
            rand = train.step_noise(step, C.batch * C.accum, (4, grid, grid), device, C, diffusion,
                                    tokens=(grid // mcfg.patch) ** 2)
            lr = train.lr_at(step, C.max_steps, C)
            train.train_step(model, optimizer, diffusion, loader, no_text_encoder, rand, lr, C, ctx)
            train.ema_update(ema_params, params, min(C.ema_decay, (1 + step) / (10 + step)))
    counted = counter.get_total_flops()  # for MFU, ours is model.estimate_flops(), what model.mfu() uses
    return Case(f"{impl} {label}", impl, work, images=C.batch * C.accum, n_params=sum(p.numel() for p in params),
                flops=raw.estimate_flops() if impl == "ours" else counted, flops_counted=counted)


def bench_training(label, preset, shape, grid, C, device, ctx, diffusion, steps, rounds, warmup, log, sequential=False,
                   impls=("ours", "pixart")):
    """Ours and the peer at one shape: both resident and alternating; where both do not fit (OOM), or with
    sequential=True, one at a time in the same process, where an OOM alone becomes that case's error row."""
    builders = {impl: lambda impl=impl: build_case(impl, label, preset, shape, grid, C, device, diffusion, ctx)
                for impl in impls}
    def oom_line(e):  # the first line of an out-of-memory error; anything else is raised again
        if "out of memory" not in str(e):
            raise e
        return str(e).splitlines()[0]
    if not sequential:
        try:
            return run_cases(list(builders.values()), steps, rounds, warmup, device), "alternating"
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; inductor may wrap an OOM met autotuning
            oom = oom_line(e)
        free_memory(device)  # outside the except block, so that the traceback no longer pins the tensors
        log(f"  OOM with both models resident ({oom[:120]}); rerunning one at a time")
    cases = []
    for impl, build in builders.items():
        try:
            cases += run_cases([build], steps, rounds, warmup, device)
        except RuntimeError as e:
            cases.append(Case(f"{impl} {label}", impl, error=f"OOM alone: {oom_line(e)}"))
        free_memory(device)
    return cases, "sequential"


def train_record(case, peer, label, grid, C, device, mode):
    """One JSON-able row for a case (with ratios against the peer in ours' row). MFU as model.mfu computes it (PaLM
    arXiv 2204.02311 App. B), from the case's training FLOPs per image."""
    rec = {"kind": "train", "model": f"{case.impl} {label}", "impl": case.impl, "preset": label, "batch": C.batch,
           "accum": C.accum, "latent": [4, grid, grid], "compile": bool(C.compile and device.type == "cuda"),
           "grad_ckpt": C.grad_ckpt, "ckpt_blocks": C.ckpt_blocks if case.impl == "ours" else 0,  # the peer: all
           "fp8": C.fp8, "mode": mode}
    if case.error or not case.times:
        return {**rec, "error": case.error or "not timed"}
    cuda, peak = device.type == "cuda", peak_flops(device)
    rec.update(params=case.n_params, gflop_per_img=case.flops / 1e9, gflop_counted=case.flops_counted / 1e9,
               step_ms=statistics.median(case.times) * 1e3, step_ms_min=min(case.times) * 1e3,
               step_ms_max=max(case.times) * 1e3, img_s=case.img_s,
               mfu=case.img_s * case.flops / peak if peak else None, peak_gb=case.peak / 2**30 if cuda else None,
               syncs_per_step=case.syncs, sync_sites=case.sync_sites)
    if case.impl == "ours" and peer is not None and peer.img_s:
        rec["ratio_vs_peer"] = case.img_s / peer.img_s
        rec["mem_ratio_vs_peer"] = case.peak / peer.peak if cuda and peer.peak else None
    return rec

#################################################################################
#                       Loader, text encoder, sampler                           #
#################################################################################

def captions(n):
    return [f"a photo of a red fox number {i} sitting in the snow, golden hour" for i in range(n)]


def bench_loader(C, grid, device, batches):
    """data.Loader samples/s over a small shapes cache (vae none: 3 x grid x grid "latents", tokens only)."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report
        path = datalib.ensure_cache(f"shapes:{max(256, 4 * C.batch)}", grid, "none", "tiny",
                                    cache_dir=os.path.join(tmp, "cache"))
        loader = datalib.Loader(datalib.LatentCache(path), C.batch, seed=C.seed, cond_drop=C.cond_drop, device=device)
        def work(n):
            for _ in range(n):
                case.out = next(loader)
        case = Case("data.Loader", "loader", work, images=C.batch)
        run_cases([lambda: case], batches, rounds=1, warmup=2, device=device, syncs=False)
        loader.close()
    return {"kind": "loader", "model": "data.Loader", "batch": C.batch, "latent": list(case.out["latents"].shape[1:]),
            "samples_per_s": case.img_s, "ms_per_batch": case.times[0] * 1e3}


def bench_text_encoder(name, C, device, ctx, log):
    """data.load_text_encoder(name).encode on (B, 77) token batches under train_step's autocast, as train_step runs
    it where text states are not cached. A name that does not load here (offline, not cached) times 'tiny'."""
    try:
        te = datalib.load_text_encoder(name, device=device)
    except Exception as e:
        log(f"  cannot load {name!r} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); timing 'tiny' instead")
        name, te = "tiny", datalib.load_text_encoder("tiny", device=device)
    n, reps = C.batch * C.accum, 10 if device.type == "cuda" else 2
    tokens = te.tokenize(captions(n)).to(device)
    def work(k):
        with ctx:
            for _ in range(k):
                te.encode(tokens)
    [case] = run_cases([lambda: Case(te.name, "text_encoder", work, images=n)], reps, rounds=1, warmup=1,
                       device=device, syncs=False)
    random_weights = name != "tiny" and "/" not in name and not os.path.exists(name)  # an open_clip arch alone
    return {"kind": "text_encoder", "model": te.name + (" (random weights: the cost only)" if random_weights else ""),
            "batch": n, "dim": te.dim, "params": sum(p.numel() for p in te.tower.parameters() if p is not None),
            "ms_per_step": case.times[0] * 1e3, "captions_per_s": case.img_s}


def stand_in_text_encoder(device):
    """captions -> (states (B, 77, 768), pooled (B, 768)) of CLIP-L's shape, each caption's drawn once from its crc32
    and kept on the device: the sampling row pays for a lookup, not an encoder (the encoder has its own row)."""
    @functools.lru_cache(maxsize=None)
    def one(caption):
        g = torch.Generator().manual_seed(zlib.crc32(caption.encode()))
        return torch.randn(TEXT_LEN, TEXT_DIM, generator=g).to(device), torch.randn(TEXT_DIM, generator=g).to(device)
    return lambda captions: tuple(torch.stack(x) for x in zip(*map(one, captions)))


def bench_sampling(label, preset, shape, grid, C, device, diffusion, batch=16, steps=50, cfg=7.5,
                   impls=("ours", "pixart")):
    """sample.sample_latents at batch 16: 50-step DDIM with CFG (one batched forward of [uncond; cond] per step) over
    our DiT and over the peer at the same shape, alternating, in eval mode as sample.py runs it (compiled on CUDA
    unless --compile false, sample.py's default), image i from seed C.seed + i. The Pipeline's VAE is only the
    factor and channels that Pipeline.latent_shape reads: the rows stop before the decode. -> (the Cases, their JSON
    rows; ours with its ratio to the peer)"""
    prompts, seeds = captions(batch), [C.seed + i for i in range(batch)]
    compiled = bool(C.compile and device.type == "cuda")
    def builder(impl):
        def build():
            torch.manual_seed(C.seed)
            net = DiT(our_config(preset, shape, grid, C)) if impl == "ours" else PixArtPeer(**shape, grid=grid)
            net = net.to(device).eval().requires_grad_(False)
            pipe = sample.Pipeline(torch.compile(net) if compiled else net, diffusion,
                                   SimpleNamespace(name="none (no decode)", factor=8, channels=4),
                                   stand_in_text_encoder(device), {"resolution": grid * 8}, 0, device, "")
            def work(n):  # n denoising steps: one sample_latents call
                case.out = sample.sample_latents(pipe, prompts, seeds, cfg=cfg, steps=n, sampler="ddim")
            case = Case(f"{impl} {label}", impl, work, images=batch / steps)
            return case
        return build
    cases = run_cases([builder(impl) for impl in impls], steps, rounds=1, warmup=2, device=device, syncs=False)
    recs = []
    for case in cases:
        dt = statistics.median(case.times) * steps
        recs.append({"kind": "sampling", "model": case.name, "impl": case.impl, "preset": label, "batch": batch,
                     "steps": steps, "cfg": cfg, "sampler": "ddim", "latent": [4, grid, grid], "compile": compiled,
                     "s_per_batch": dt, "img_s": case.img_s, "ms_per_step": dt / steps * 1e3,
                     "peak_gb": case.peak / 2**30 if device.type == "cuda" else None})
    if len(cases) == 2:
        recs[0]["ratio_vs_peer"] = cases[0].img_s / cases[1].img_s
    return cases, recs

#################################################################################
#                               Report and main                                 #
#################################################################################

def fmt(v, spec, dash="-"):
    return dash if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def print_table(rows):
    """The training rows as a markdown table, then where the FLOPs come from and any host-sync call sites."""
    head = ["model", "params", "GFLOP/img", "step ms", "img/s", "MFU", "peak GB", "ours/peer", "syncs/step"]
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["model"], "", "", "", "", "", "", "", r["error"][:60]])
            continue
        ratio = r.get("ratio_vs_peer")
        ratio = "ref" if r["impl"] == "pixart" else fmt(ratio, ".2f") + ("x" if ratio else "")
        lines.append([r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['gflop_per_img']:.4g}", f"{r['step_ms']:.1f}",
                      f"{r['img_s']:.1f}", fmt(r["mfu"] and r["mfu"] * 100, ".1f") + ("%" if r["mfu"] else ""),
                      fmt(r["peak_gb"], ".2f"), ratio, fmt(r["syncs_per_step"], "d")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(l, widths)) + " |" for l in lines]
    counted = ", ".join(f"{r['preset']} {r['gflop_counted']:.4g}" for r in rows
                        if r["impl"] == "ours" and not r.get("error"))
    out.append(f"# GFLOP/img: model.estimate_flops for ours (torch.utils.flop_counter: {counted or '-'}), "
               "the flop counter's for the peer")
    out += [f"# {r['model']}: host syncs at {', '.join(r['sync_sites'])}" for r in rows if r.get("syncs_per_step")]
    print("\n".join(out))


def print_header(argv, C, args, device):
    """The '#' lines above the table; -> the fields every JSON line carries (where and with what it was measured)."""
    import diffusers
    date, cuda = datetime.datetime.now().astimezone().isoformat(timespec="seconds"), device.type == "cuda"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):  # on Linux platform.processor() says little more than 'x86_64'
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    card = torch.cuda.get_device_name(device) if cuda else f"CPU {cpu} ({torch.get_num_threads()} threads)"
    meta = {"cmd": " ".join(["python bench.py", *argv]), "card": card, "date": date, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": str(device), "dtype": C.dtype if cuda else "float32",
            "compile": bool(C.compile and cuda), "qk_norm": C.qk_norm, "rope": C.rope, "cross_norm": C.cross_norm,
            "text_len": C.text_len}
    peak = peak_flops(device)
    print(f"# bench.py | {meta['card']} | {date} | torch {torch.__version__} | diffusers {diffusers.__version__}")
    print(f"# {args.grid * 8} px -> latents 4x{args.grid}x{args.grid}, text {TEXT_LEN}x{TEXT_DIM} | micro-batch "
          f"{C.batch} x accum {C.accum} | autocast {meta['dtype']} | compile {meta['compile']} | "
          f"grad_ckpt {C.grad_ckpt} (ckpt_blocks {C.ckpt_blocks}) | fp8 {C.fp8} | adaln {C.adaln} | qk_norm "
          f"{C.qk_norm} | rope {C.rope} | cross_norm {C.cross_norm} | text_len {C.text_len} | "
          f"{args.warmup} warm-up + {args.rounds} rounds x {args.steps} timed steps per case")
    print(f"# peak FLOP/s for MFU: {fmt(peak and peak / 1e12, '.1f', 'unknown')} TFLOP/s (model.PEAK_FLOPS, bf16"
          f"{': fp8 rows are held to the bf16 peak too' if C.fp8 else ''})", flush=True)
    return meta


def setting(r):
    """A row's settings in a few words: precision, activation checkpointing, the extras that are off; sampling."""
    if r["kind"] == "sampling":
        return f"sample {r['sampler']} {r['steps']} steps cfg {r['cfg']:g}" + (" compiled" if r.get("compile") else "")
    words = ["fp8" if r.get("fp8") else {"bfloat16": "bf16", "float32": "fp32"}.get(r.get("dtype"), r.get("dtype"))]
    if r.get("grad_ckpt"):
        words.append(f"ckpt {r.get('ckpt_blocks') or 'all'}")
    off = [k for k in ("qk_norm", "rope", "cross_norm") if r.get(k) is False]
    return " ".join(words + ([f"no {'/'.join(off)}"] if off else []))


def report_main(argv):
    """--report JSONL [--out JSON]: every train and sampling row of a bench.py --out file (runs appended one after
    another, as scripts/gpu_check.sh writes it) in one table with the settings each ran with; --out writes the
    rows as one JSON list. -> the rows"""
    p = argparse.ArgumentParser(prog="bench.py --report", allow_abbrev=False)
    p.add_argument("--report", required=True, metavar="JSONL")
    p.add_argument("--out", default="", help="write the rows here as one JSON list")
    args = p.parse_args(argv)
    try:
        with open(args.report) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        p.error(f"--report {args.report}: {e}")
    rows = [r for r in rows if r.get("kind") in ("train", "sampling")]
    head = ["model", "batch", "setting", "ms/step", "img/s", "MFU", "peak GB", "ours/peer"]
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["model"], r.get("batch", ""), setting(r), "", "", "", "", r["error"][:60]])
            continue
        ratio = r.get("ratio_vs_peer")
        ratio = "ref" if r.get("impl") == "pixart" else fmt(ratio, ".2f") + ("x" if ratio else "")
        mfu = r.get("mfu")
        lines.append([r["model"], r["batch"], setting(r), f"{r.get('step_ms', r.get('ms_per_step')):.1f}",
                      f"{r['img_s']:.1f}", fmt(mfu and mfu * 100, ".1f") + ("%" if mfu else ""),
                      fmt(r.get("peak_gb"), ".2f"), ratio])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = [f"# {args.report}: {len(rows)} rows | " + " | ".join(sorted({f"{r['card']}, torch {r['torch']}"
                                                                       for r in rows})),
           "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(l, widths)) + " |" for l in lines]
    print("\n".join(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def parse(argv):
    """-> (args with the run's shapes and step counts, C: train.py's config with bench.py's overrides)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Other --key value pairs (and a leading config file) go to train.parse_args.")
    add = p.add_argument
    add("--models", default="B/2,L/2,XL/2", help="comma-separated presets (B/2 or DiT-B/2), or none")
    add("--batch", type=int, help="micro-batch (default: train.py's)")
    add("--res", type=int, help="image side in px (default: train.py's resolution)")
    add("--steps", type=int, help="timed steps per case per round (default 10; --tiny 2)")
    add("--rounds", type=int, help="alternating timed rounds (default 3; --tiny 2)")
    add("--warmup", type=int, help="warm-up steps per case, the first included (default 3; --tiny 1)")
    add("--text_encoder", help="encoder to time (default: train.py's architecture, random weights)")
    add("--sequential", action="store_true", help="one model resident at a time (automatic after an OOM)")
    add("--tiny", action="store_true", help="tiny shapes, few steps: a < 1 min CPU smoke run of every path")
    add("--no_peer", action="store_true", help="time ours alone (rows that need no ratio: memory, fp8)")
    add("--parts", default=",".join(PARTS), help=f"comma-separated rows to run, of {','.join(PARTS)}")
    add("--report", default="", metavar="JSONL", help="only print one table of every row in this bench.py --out file "
        "(and write them to --out as one JSON list)")
    add("--out", default="", help="append the JSON lines to this file")
    args, rest = p.parse_known_args(argv)
    try:
        C = SimpleNamespace(**train.parse_args(rest))
        train.check_speed_keys(C)  # ckpt_blocks with grad_ckpt; fp8: a card with FP8 and torchao; or one line now
    except train.ConfigError as e:
        p.error(str(e))
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if set(args.parts) - set(PARTS) or not args.parts:
        p.error(f"--parts {','.join(args.parts)}: a comma-separated list of {','.join(PARTS)}")
    tiny = args.tiny
    C.batch = args.batch or (TINY_BATCH if tiny else C.batch)
    C.resolution = args.res or C.resolution
    models = [] if args.models.strip().lower() == "none" else \
        ["DiT-" + m.strip().removeprefix("DiT-") for m in args.models.split(",")]
    if set(models) - set(PRESETS):
        p.error(f"unknown preset {sorted(set(models) - set(PRESETS))}; choose from {sorted(PRESETS)}")
    if C.resolution % 16:
        p.error(f"--res {C.resolution}: must be a multiple of 16 (8x VAE, patch 2)")
    args.grid = TINY_GRID if tiny else C.resolution // 8
    args.presets = [("tiny", "DiT-S/2", TINY)] if tiny else [(m.removeprefix("DiT-"), m, PRESETS[m]) for m in models]
    for label, preset, shape in args.presets:  # the model's own checks (ckpt_blocks within the depth, ...), now
        try:
            our_config(preset, shape, args.grid, C)
        except ValueError as e:
            p.error(f"{label}: {e}")
    args.steps, args.rounds = args.steps or (2 if tiny else 10), args.rounds or (2 if tiny else 3)
    args.warmup = args.warmup or (1 if tiny else 3)
    # The encoder's cost does not depend on its weights: by default train.py's architecture with random weights
    # ("ViT-L-14/laion2b_s32b_b82k" -> "ViT-L-14": the CLIP-L/14 text tower, no download)
    te = C.text_encoder
    default = te.split("/")[0] if "/" in te and not os.path.exists(te) else te
    args.text_encoder = "tiny" if tiny else args.text_encoder or default
    return args, C


def main(argv):
    if "--report" in argv or any(a.startswith("--report=") for a in argv):
        return report_main(argv)
    args, C = parse(argv)
    ctx = train.setup_distributed(C).ctx  # train.py's device ("auto"), TF32 and autocast rules; one process here
    device, diffusion = torch.device(C.device), train.make_diffusion(C)
    if args.tiny and device.type == "cpu":  # tiny ops gain nothing from intra-op threads, and on a busy 2-core
        torch.set_num_threads(1)            # machine OpenMP spin-waits made them 10-20x slower (measured)
    meta = print_header(argv, C, args, device)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    records = []
    def emit(rec):  # each record reaches --out as soon as it exists: a run cut short keeps what it measured
        records.append(rec)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**meta, **rec}) + "\n")
        return rec

    impls = ("ours",) if args.no_peer else ("ours", "pixart")
    for label, preset, shape in args.presets if "train" in args.parts else ():
        cases, mode = bench_training(label, preset, shape, args.grid, C, device, ctx, diffusion, args.steps,
                                     args.rounds, args.warmup, log, sequential=args.sequential, impls=impls)
        peer = cases[1] if len(cases) > 1 else None
        for case, ref in ((cases[0], peer), (peer, None))[:len(cases)]:
            r = emit(train_record(case, ref, label, args.grid, C, device, mode))
            log(f"  {r['model']}: " + (r["error"] if r.get("error") else f"first step {case.first_s:.1f} s"
                f"{' (compiles)' if meta['compile'] else ''}, {r['step_ms']:.1f} ms/step, {r['img_s']:.1f} img/s, "
                f"peak {fmt(r['peak_gb'], '.2f')} GB"))
        free_memory(device)  # before the next shape
    if records:  # the training rows, all the records so far
        print()
        print_table(records)
    if "loader" in args.parts:
        rec = emit(bench_loader(C, args.grid, device, batches=20 if args.tiny else 200))
        print(f"\nloader: {rec['samples_per_s']:.0f} samples/s ({rec['ms_per_batch']:.2f} ms per batch of "
              f"{rec['batch']}, latents {'x'.join(map(str, rec['latent']))} fp16 from a memmap cache)", flush=True)
    if "text_encoder" in args.parts:
        rec = bench_text_encoder(args.text_encoder, C, device, ctx, log)
        rec["share_of_step"] = {r["preset"]: rec["ms_per_step"] / (r["step_ms"] + rec["ms_per_step"])
                                for r in records if r.get("impl") == "ours" and not r.get("error")}
        emit(rec)
        share = ", ".join(f"{v * 100:.1f}% of a {k} step" for k, v in rec["share_of_step"].items())
        print(f"text encoder {rec['model']} ({rec['params'] / 1e6:.1f}M): {rec['ms_per_step']:.2f} ms per step of "
              f"{rec['batch']} captions if text states are not cached ({share})", flush=True)
    for label, preset, shape in args.presets if "sampling" in args.parts else ():
        for rec in bench_sampling(label, preset, shape, args.grid, C, device, diffusion, impls=impls)[1]:
            emit(rec)
            ratio = f", {rec['ratio_vs_peer']:.2f}x the peer" if "ratio_vs_peer" in rec else ""
            print(f"sampling {rec['model']}: {rec['s_per_batch']:.2f} s per batch of {rec['batch']} ({rec['steps']}-"
                  f"step DDIM, CFG {rec['cfg']}, compile {rec['compile']}: {rec['ms_per_step']:.1f} ms/step, "
                  f"{rec['img_s']:.2f} img/s{ratio})", flush=True)
        free_memory(device)
    print("\n" + "\n".join(json.dumps({**meta, **r}) for r in records))
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
