"""
Training-step throughput, MFU and peak memory of our DiT against diffusers' PixArtTransformer2DModel at the same
depth/width/heads, run side by side in one process; plus the loader, the text encoder and the sampler.

    python bench.py                                    # B/2, L/2, XL/2 at 256 px, micro-batch 64, vs the PixArt peer
    python bench.py --models B/2,XL/2 --res 512 --batch 16 --out bench.jsonl   # --out appends JSON lines
    python bench.py configs/NAME.py --models XL/2 --grad_ckpt true   # a config file and any train.py --key value
    python bench.py --models XL/2 --fp8 true --no_peer  # ours alone, the blocks' linears in float8 (torchao)
    python bench.py --models B/2 --parts sampling      # only the sampling rows (ours and the peer)
    python bench.py --report out/gpu/bench.jsonl --out out/gpu/gpu_check.json   # every row of a file, one table
    python bench.py --tiny                             # CPU smoke run (< 1 min): tiny shapes, the very same code paths
    python bench.py --models none --batch 256 --text_encoder tiny   # only the loader and text encoder rows

A training step is train.py's own (build_case; the peer's through the same train_step: only the network differs), a
sampling row sample.py's sample_latents around either network (bench_sampling); one runner times every row (run_cases).
"""
import argparse, contextlib, dataclasses, datetime, functools, gc, itertools, json, math, os, platform, statistics
import sys, tempfile, time, warnings, zlib
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import config
import data as datalib
import sample
import train
from checkpoint import write_json
from diffusion import Diffusion
from encoders import load_text_encoder
from loader import Loader
from model import PRESETS, DiT, config_from_keys, convert_to_fp8, fp8_aligned, peak_flops, train_flops
from optim import configure_optimizer, lr_at

TEXT_LEN, TEXT_DIM = 77, 768  # CLIP ViT-L/14 token states, the shape the peer's caption_channels expects
TEXT_WIDTHS = SimpleNamespace(dim=TEXT_DIM, pooled_dim=TEXT_DIM)  # what train.build_model reads of a text encoder
TINY, TINY_GRID, TINY_BATCH = dict(depth=2, width=64, heads=4, patch=2), 8, 4  # --tiny: both nets, 8x8 latents, 4
IMPLS = ("ours", "pixart")  # the two networks of a training or sampling row; --no_peer: ours alone
PARTS = ("train", "loader", "text_encoder", "sampling")  # --parts: the kinds of rows, in the order they run
SYNC_WARNING = "called a synchronizing CUDA operation"  # c10/cuda/CUDAFunctions.cpp warn_or_error_on_sync
fail = functools.partial(config.fail, prog="bench.py")  # the one exit-2 error line of the command lines
log = functools.partial(print, file=sys.stderr, flush=True)  # progress to stderr: stdout is the report

#################################################################################
#                 Timing: the one case runner of every row                      #
#################################################################################

def free_memory(device):
    torch._dynamo.reset()  # the compiled graphs first: they hold on to the modules they were traced from
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

def count_syncs(fn):
    """(number of host<->device synchronizations while fn() runs, their Python call sites), from
    torch.cuda.set_sync_debug_mode, which warns at every synchronizing CUDA call (.item(), a pageable copy, ...)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch's text for a sync, not set_sync_debug_mode's one-off "prototype feature" notice (a phantom sync on an H100)
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
    """Every timed row. Each build() -> Case takes its first step before the next is built (so that each one's
    resident memory, added to its own transient peak, is its own); warm-up; a step under the sync detector; `rounds`
    blocks of `steps` steps per case, A B, B A, ... so that clock and thermal drift hit all alike. -> the cases"""
    cases, cuda = [], device.type == "cuda"
    mem_now = lambda: torch.cuda.memory_allocated(device) if cuda else 0
    for build in builders:  # the first (maybe compiling) step; then its resident memory: AdamW state, grads freed
        base = mem_now()
        cases.append(case := build())
        t0 = time.perf_counter()
        case.work(1)
        if cuda:
            torch.cuda.synchronize(device)
        case.first_s, case.resident = time.perf_counter() - t0, mem_now() - base
    for case in cases * max(0, warmup - 1):  # the warm-up steps after the first, round robin
        case.work(1)
    for case in cases if syncs and cuda else ():  # (CUDA only: syncs stays None)
        case.syncs, case.sync_sites = count_syncs(lambda: case.work(1))
    for r in range(rounds):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            if cuda:  # CUDA events: the device time between the two records; the wall clock on the CPU
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            at, t0 = mem_now(), time.perf_counter()
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

def case_keys(preset, shape, C, device):
    """train.py's keys at the bench shape: the preset with its own (or --tiny's) depth/width/heads/patch, on device."""
    return SimpleNamespace(**{**vars(C), "model": preset, **shape, "device": str(device)})

def our_config(preset, shape, grid, C):
    """Our DiT at the bench shape with train.py's model keys (grad_ckpt acts in training only)."""
    return config_from_keys(case_keys(preset, shape, C, C.device), in_channels=4, input_size=grid, text_dim=TEXT_DIM,
                            pooled_dim=TEXT_DIM)

def build_case(impl, label, preset, shape, grid, C, device, diffusion, ctx):
    """Ours by train.build_model, the peer built alike, each with a device batch; case.work(n) runs n optimizer
    steps: the body of train.py's loop (its own functions) minus its logging accumulators."""
    K = case_keys(preset, shape, C, device)
    if impl == "ours":
        raw, ema, optimizer, _, levers = train.build_model(K, (4, grid, grid), TEXT_WIDTHS)
        ema_params, build = list(ema.parameters()), lambda: DiT(raw.config)
    else:  # as train.build_model builds ours: seeded; fp8 by the same rule, before the optimizer; an EMA copy of every
        # parameter; under --grad_ckpt every block checkpointed; no token routing, no training levers; AdamW alone
        # (Muon's split is written for our blocks): with the recipe's --optimizer muon, ours/peer includes Muon's cost
        K.route_frac, K.optimizer, build, levers = 0.0, "adamw", lambda: PixArtPeer(**shape, grid=grid), None
        torch.manual_seed(K.seed)
        raw = build().to(device)
        if K.grad_ckpt:
            raw.net.enable_gradient_checkpointing()
        if K.fp8:
            convert_to_fp8(raw, peer_fp8_filter)
        ema_params = [p.detach().clone() for p in raw.parameters()]
        optimizer = configure_optimizer(raw, K.lr, K.weight_decay, (K.adam_beta1, K.adam_beta2), "adamw")
    # training FLOPs per image (forward + backward of a batch of 1) by torch.utils.flop_counter, for ours and the
    # peer alike, on the meta device: shapes only, no memory, no compute
    with torch.device("meta"):
        net, counter = build(), FlopCounterMode(display=False)
        with counter:
            net(torch.randn(1, 4, grid, grid), torch.randint(0, 1000, (1,)), torch.randn(1, TEXT_LEN, TEXT_DIM),
                torch.randn(1, TEXT_DIM)).float().pow(2).mean().backward()
    params = list(raw.parameters())
    model = torch.compile(raw) if K.compile and device.type == "cuda" else raw  # train.setup's rule
    g = torch.Generator().manual_seed(K.seed)
    loader = itertools.repeat({"latents": torch.randn(K.batch, 4, grid, grid, generator=g).to(device),
                               "states": torch.randn(K.batch, TEXT_LEN, TEXT_DIM, generator=g).to(device),
                               "pooled": torch.randn(K.batch, TEXT_DIM, generator=g).to(device)})
    steps, tokens = itertools.count(), (grid // shape["patch"]) ** 2  # step_noise and lr_at are functions of the step
    def work(n):
        for step in itertools.islice(steps, n):
            rand = train.step_noise(step, K.batch * K.accum, (4, grid, grid), device, K, diffusion,
                                    train.routed_tokens(step, K.max_steps, tokens, K))
            lr = lr_at(step, K.max_steps, K)
            train.train_step(model, optimizer, diffusion, loader, None, rand, lr, K, ctx, levers=levers)  # text states
            train.ema_update(ema_params, params, step, K.ema_decay)
    counted = counter.get_total_flops()  # for MFU, ours is model.estimate_flops(), what model.mfu() uses
    return Case(f"{impl} {label}", impl, work, images=K.batch * K.accum, n_params=sum(p.numel() for p in params),
                flops=train_flops(raw, K) if impl == "ours" else counted, flops_counted=counted)

def bench_training(label, preset, shape, grid, C, device, ctx, diffusion, steps, rounds, warmup, impls=IMPLS):
    """Ours and the peer at one shape: both resident and alternating; where both do not fit (OOM), one at a time in
    the same process, where an OOM alone becomes that case's error row."""
    builders = [functools.partial(build_case, impl, label, preset, shape, grid, C, device, diffusion, ctx)
                for impl in impls]
    def oom_line(e):  # the first line of an out-of-memory error; anything else is raised again
        if "out of memory" not in str(e):
            raise e
        return str(e).splitlines()[0]
    try:
        return run_cases(builders, steps, rounds, warmup, device), "alternating"
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; inductor may wrap an OOM met autotuning
        log(f"  OOM with both models resident ({oom_line(e)[:120]}); rerunning one at a time")
    free_memory(device)  # outside the except block, so that the traceback no longer pins the tensors
    cases = []
    for impl, build in zip(impls, builders):
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
           "fp8": C.fp8, "mode": mode, "optimizer": C.optimizer if case.impl == "ours" else "adamw"}
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
    """loader.Loader samples/s over a small shapes cache (vae none: 3 x grid x grid "latents", tokens only)."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report
        path = datalib.ensure_cache(f"shapes:{max(256, 4 * C.batch)}", grid, "none", "tiny",
                                    cache_dir=os.path.join(tmp, "cache"))
        loader = Loader(datalib.LatentCache(path), C.batch, seed=C.seed, cond_drop=C.cond_drop, device=device)
        def work(n):
            for _ in range(n):
                case.out = next(loader)
        case = Case("loader.Loader", "loader", work, images=C.batch)
        run_cases([lambda: case], batches, rounds=1, warmup=2, device=device, syncs=False)
        loader.close()
    return {"kind": "loader", "model": "loader.Loader", "batch": C.batch, "latent": list(case.out["latents"].shape[1:]),
            "samples_per_s": case.img_s, "ms_per_batch": case.times[0] * 1e3}

def bench_text_encoder(name, C, device, ctx):
    """encoders.load_text_encoder(name).encode on (B, 77) token batches under train_step's autocast, as train_step runs
    it where text states are not cached. A name that does not load here (offline, not cached) times 'tiny'."""
    try:
        te = load_text_encoder(name, device=device)
    except Exception as e:
        log(f"  cannot load {name!r} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); timing 'tiny' instead")
        name, te = "tiny", load_text_encoder("tiny", device=device)
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

def bench_sampling(label, preset, shape, grid, C, device, diffusion, batch=16, steps=50, cfg=7.5, impls=IMPLS):
    """sample.sample_latents over our DiT and the peer as sample.py runs it: its default sampler (euler for flow, else
    DDIM), CFG as one batched [uncond; cond] forward per step, eval mode, compiled on CUDA unless --compile false;
    image i from seed C.seed + i; a VAE of factor and channels only: no decode. -> (the Cases, their JSON rows)"""
    prompts, seeds = captions(batch), [C.seed + i for i in range(batch)]
    compiled, sampler = bool(C.compile and device.type == "cuda"), diffusion.default_sampler
    def build(impl):
        torch.manual_seed(C.seed)
        net = DiT(our_config(preset, shape, grid, C)) if impl == "ours" else PixArtPeer(**shape, grid=grid)
        net = net.to(device).eval().requires_grad_(False)
        pipe = sample.Pipeline(torch.compile(net) if compiled else net, diffusion,
                               SimpleNamespace(name="none (no decode)", factor=8, channels=4),
                               stand_in_text_encoder(device), {"resolution": grid * 8}, 0, device, "")
        def work(n):  # n denoising steps: one sample_latents call
            case.out = sample.sample_latents(pipe, prompts, seeds, cfg=cfg, steps=n, sampler=sampler)
        case = Case(f"{impl} {label}", impl, work, images=batch / steps)
        return case
    cases = run_cases([functools.partial(build, impl) for impl in impls], steps, 1, 2, device, syncs=False)
    recs = [{"kind": "sampling", "model": case.name, "impl": case.impl, "preset": label, "batch": batch, "steps": steps,
             "cfg": cfg, "sampler": sampler, "latent": [4, grid, grid], "compile": compiled,  # (one round)
             "s_per_batch": case.times[0] * steps, "img_s": case.img_s, "ms_per_step": case.times[0] * 1e3,
             "peak_gb": case.peak / 2**30 if device.type == "cuda" else None} for case in cases]
    if len(cases) == 2:
        recs[0]["ratio_vs_peer"] = cases[0].img_s / cases[1].img_s
    return cases, recs

#################################################################################
#                               Report and main                                 #
#################################################################################

def fmt(v, spec, dash="-"):
    return dash if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

def table(rows):
    """Train and sampling rows (this run's, or every row of a --report file) as one markdown table with the settings
    each ran with, then where the FLOPs come from and any host-sync call sites. -> its lines"""
    head = ["model", "batch", "setting", "params", "GFLOP/img", "ms/step", "img/s", "MFU", "peak GB", "ours/peer",
            "syncs/step"]
    lines = []
    for r in rows:
        ratio, mfu, cells = r.get("ratio_vs_peer"), r.get("mfu"), [r["model"], r.get("batch", ""), setting(r)]
        lines.append(cells + [""] * 7 + [r["error"][:60]] if r.get("error") else cells + [
            f"{r['params'] / 1e6:.1f}M" if "params" in r else "-", fmt(r.get("gflop_per_img"), ".4g"),
            f"{r.get('step_ms', r.get('ms_per_step')):.1f}", f"{r['img_s']:.1f}",
            fmt(mfu and mfu * 100, ".1f") + ("%" if mfu else ""), fmt(r.get("peak_gb"), ".2f"),
            "ref" if r.get("impl") == "pixart" else fmt(ratio, ".2f") + ("x" if ratio else ""),
            fmt(r.get("syncs_per_step"), "d")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    line = lambda cells: "| " + " | ".join(str(x).ljust(w) for x, w in zip(cells, widths)) + " |"
    counted = ", ".join(f"{r['preset']} {r['gflop_counted']:.4g}" for r in rows
                        if r.get("impl") == "ours" and r.get("gflop_counted"))
    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, lines),
            f"# GFLOP/img: model.estimate_flops for ours (torch.utils.flop_counter: {counted or '-'}), the flop "
            "counter's for the peer"] + [f"# {r['model']}: host syncs at {', '.join(r['sync_sites'])}"
                                         for r in rows if r.get("syncs_per_step")]

def print_header(argv, C, args, device):
    """The '#' lines above the table; -> the fields every JSON line carries (where and with what it was measured)."""
    import diffusers
    date, cuda = datetime.datetime.now().astimezone().isoformat(timespec="seconds"), device.type == "cuda"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):  # on Linux platform.processor() says little more than 'x86_64'
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    card = torch.cuda.get_device_name(device) if cuda else f"CPU {cpu} ({torch.get_num_threads()} threads)"
    keys = ("optimizer", "grad_ckpt", "ckpt_blocks", "fp8", "adaln", "qk_norm", "rope", "cross_norm", "text_len")
    meta = {"cmd": " ".join(["python bench.py", *argv]), "card": card, "date": date, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": str(device), "dtype": C.dtype if cuda else "float32",
            "compile": bool(C.compile and cuda), **{k: getattr(C, k) for k in keys[-4:]}}  # (train rows: their own)
    print(f"# bench.py | {meta['card']} | {date} | torch {torch.__version__} | diffusers {diffusers.__version__}")
    print(f"# {args.grid * 8} px -> latents 4x{args.grid}x{args.grid}, text {TEXT_LEN}x{TEXT_DIM} | micro-batch "
          f"{C.batch} x accum {C.accum} | autocast {meta['dtype']} | compile {meta['compile']} | "
          + "".join(f"{k} {getattr(C, k)} | " for k in keys)
          + f"{args.warmup} warm-up + {args.rounds} rounds x {args.steps} timed steps per case")
    peak = peak_flops(device)
    print(f"# peak FLOP/s for MFU: {fmt(peak and peak / 1e12, '.1f', 'unknown')} TFLOP/s (model.PEAK_FLOPS, bf16"
          f"{': fp8 rows are held to the bf16 peak too' if C.fp8 else ''})", flush=True)
    return meta

def setting(r):
    """A row's settings in a few words: precision, Muon, activation checkpointing, the extras that are off; sampling."""
    if r["kind"] == "sampling":
        return f"sample {r['sampler']} {r['steps']} steps cfg {r['cfg']:g}" + (" compiled" if r.get("compile") else "")
    words = ["fp8" if r.get("fp8") else {"bfloat16": "bf16", "float32": "fp32"}.get(r.get("dtype"), r.get("dtype"))]
    words += ["muon"] * (r.get("optimizer") == "muon")  # (the peer's optimizer is AdamW: build_case)
    if r.get("grad_ckpt"):
        words.append(f"ckpt {r.get('ckpt_blocks') or 'all'}")
    off = [k for k in ("qk_norm", "rope", "cross_norm") if r.get(k) is False]
    return " ".join(words + ([f"no {'/'.join(off)}"] if off else []))

def report(path, out):
    """--report JSONL [--out JSON]: every train and sampling row of a bench.py --out file (runs appended one after
    another, as scripts/gpu_check.sh writes it) in one table; --out writes them as one JSON list. -> the rows"""
    try:
        with open(path) as f:
            rows = [r for r in map(json.loads, filter(str.strip, f)) if r.get("kind") in ("train", "sampling")]
    except (OSError, json.JSONDecodeError) as e:
        fail(f"--report {path}: {e}")
    print(f"# {path}: {len(rows)} rows | " + " | ".join(sorted({f"{r['card']}, torch {r['torch']}" for r in rows})))
    print("\n".join(table(rows)))
    if out:
        write_json(out, rows)
    return rows

def parse(argv):
    """-> (args with the run's shapes and step counts, C: train.py's config with bench.py's overrides)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Other --key value pairs (and a leading config file) are train.py keys.")
    add = p.add_argument
    add("--models", default="B/2,L/2,XL/2", help="comma-separated presets (B/2 or DiT-B/2), or none")
    add("--batch", type=int, help="micro-batch (default: train.py's)")
    add("--res", type=int, help="image side in px (default: train.py's resolution)")
    add("--steps", type=int, help="timed steps per case per round (default 10; --tiny 2)")
    add("--rounds", type=int, help="alternating timed rounds (default 3; --tiny 2)")
    add("--warmup", type=int, help="warm-up steps per case, the first included (default 3; --tiny 1)")
    add("--text_encoder", help="encoder to time (default: train.py's architecture, random weights)")
    add("--tiny", action="store_true", help="tiny shapes, few steps: a < 1 min CPU smoke run of every path")
    add("--no_peer", action="store_true", help="time ours alone (rows that need no ratio: memory, fp8)")
    add("--parts", default=",".join(PARTS), help=f"comma-separated rows to run, of {','.join(PARTS)}")
    add("--report", default="", metavar="JSONL", help="only print one table of every row of this bench.py --out file")
    add("--out", default="", help="append the JSON lines to this file (--report: write the rows' JSON list here)")
    args, rest = p.parse_known_args(argv)
    try:
        C = SimpleNamespace(**config.parse_args(rest, train.DEFAULTS))
        C.device = config.resolve_device(C.device)  # "auto": CUDA when there is a GPU, else the CPU
        C.text_len = C.text_len or TEXT_LEN  # 0 = all of the tower's tokens: what the rows' models cross-attend to
        config.check_speed_keys(C)  # ckpt_blocks with grad_ckpt; fp8: a card with FP8 and torchao; or one line now
    except config.ConfigError as e:
        fail(e)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if set(args.parts) - set(PARTS) or not args.parts:
        fail(f"--parts {','.join(args.parts)}: a comma-separated list of {','.join(PARTS)}")
    tiny = args.tiny
    C.batch, C.resolution = args.batch or (TINY_BATCH if tiny else C.batch), args.res or C.resolution
    models = [] if args.models.strip().lower() == "none" else \
        ["DiT-" + m.strip().removeprefix("DiT-") for m in args.models.split(",")]
    if set(models) - set(PRESETS):
        fail(f"unknown preset {sorted(set(models) - set(PRESETS))}; choose from {sorted(PRESETS)}")
    if C.resolution % 16:
        fail(f"--res {C.resolution}: must be a multiple of 16 (8x VAE, patch 2)")
    args.grid = TINY_GRID if tiny else C.resolution // 8
    args.presets = [("tiny", "DiT-S/2", TINY)] if tiny else [(m.removeprefix("DiT-"), m, PRESETS[m]) for m in models]
    for label, preset, shape in args.presets:  # the model's own checks (ckpt_blocks within the depth, ...), now
        try:
            our_config(preset, shape, args.grid, C)
        except ValueError as e:
            fail(f"{label}: {e}")
    args.steps, args.rounds, args.warmup = (args.steps or (2 if tiny else 10), args.rounds or (2 if tiny else 3),
                                            args.warmup or (1 if tiny else 3))
    # the encoder's cost does not depend on its weights: by default train.py's architecture with random weights
    te = C.text_encoder  # "ViT-L-14/laion2b_s32b_b82k" -> "ViT-L-14": the CLIP-L/14 text tower, no download
    args.text_encoder = "tiny" if tiny else args.text_encoder or (te.split("/")[0] if not os.path.exists(te) else te)
    return args, C

def main(argv):
    args, C = parse(argv)
    if args.report:
        return report(args.report, args.out)
    ctx = train.setup_distributed(C).ctx  # train.py's TF32 and autocast rules; one process here
    device, diffusion = torch.device(C.device), Diffusion.from_config(vars(C))
    if args.tiny and device.type == "cpu":  # tiny ops gain nothing from intra-op threads, and on a busy 2-core
        torch.set_num_threads(1)            # machine OpenMP spin-waits made them 10-20x slower (measured)
    meta, records, impls = print_header(argv, C, args, device), [], IMPLS[:1] if args.no_peer else IMPLS
    def emit(rec, line=None):  # each record reaches --out as soon as it exists: a run cut short keeps what it measured
        records.append(rec)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**meta, **rec}) + "\n")
        if line:
            print(line, flush=True)

    for label, preset, shape in args.presets if "train" in args.parts else ():
        cases, mode = bench_training(label, preset, shape, args.grid, C, device, ctx, diffusion, args.steps,
                                     args.rounds, args.warmup, impls)
        for case, ref in zip(cases, cases[1:] + [None]):  # ours' row carries its ratios to the peer
            emit(r := train_record(case, ref, label, args.grid, C, device, mode))
            log(f"  {r['model']}: " + (r["error"] if r.get("error") else f"first step {case.first_s:.1f} s"
                f"{' (compiles)' if meta['compile'] else ''}, {r['step_ms']:.1f} ms/step, {r['img_s']:.1f} img/s, "
                f"peak {fmt(r['peak_gb'], '.2f')} GB"))
        free_memory(device)  # before the next shape
    if records:  # the training rows, all the records so far
        print("\n" + "\n".join(table([{**meta, **r} for r in records])))
    if "loader" in args.parts:
        r = bench_loader(C, args.grid, device, batches=20 if args.tiny else 200)
        emit(r, f"\nloader: {r['samples_per_s']:.0f} samples/s ({r['ms_per_batch']:.2f} ms per batch of {r['batch']}, "
             f"latents {'x'.join(map(str, r['latent']))} fp16 from a memmap cache)")
    if "text_encoder" in args.parts:
        r = bench_text_encoder(args.text_encoder, C, device, ctx)
        r["share_of_step"] = {o["preset"]: r["ms_per_step"] / (o["step_ms"] + r["ms_per_step"])
                              for o in records if o.get("impl") == "ours" and not o.get("error")}
        share = ", ".join(f"{v * 100:.1f}% of a {k} step" for k, v in r["share_of_step"].items())
        emit(r, f"text encoder {r['model']} ({r['params'] / 1e6:.1f}M): {r['ms_per_step']:.2f} ms per step of "
             f"{r['batch']} captions if text states are not cached ({share})")
    for label, preset, shape in args.presets if "sampling" in args.parts else ():
        for r in bench_sampling(label, preset, shape, args.grid, C, device, diffusion, impls=impls)[1]:
            emit(r, f"sampling {r['model']}: {r['s_per_batch']:.2f} s per batch of {r['batch']} ({r['steps']}-step "
                 f"{r['sampler']}, CFG {r['cfg']}, compile {r['compile']}: {r['ms_per_step']:.1f} ms/step, "
                 f"{r['img_s']:.2f} img/s" + (f", {r['ratio_vs_peer']:.2f}x the peer" if "ratio_vs_peer" in r else "")
                 + ")")
        free_memory(device)
    print("\n" + "\n".join(json.dumps({**meta, **r}) for r in records))
    return records

if __name__ == "__main__":
    main(sys.argv[1:])
