"""
Prompts in, PNGs out: loads a checkpoint's EMA weights and everything needed to rebuild the sampler.

    python sample.py --cfg 7.5 "a red fox" "a blue car"            # out/samples/0000.png ... + grid.png
    python sample.py --ckpt out/ckpt.pt --n 8 --seed 1 --steps 30 --sampler heun --negative "blurry" "a red fox"
    python sample.py --compile false "a red fox"                    # eager (the default on the CPU; CUDA compiles)
    python sample.py --size 512x256 "a red fox in the snow"          # 2:1 (default: the checkpoint's square size)
    python sample.py --cfg 7 --cfg_interval 0.1,0.9 --apg 0 "a red fox"  # guidance: interval + APG (or --cfg_zero_star)

Image k (prompt k // n) is sampled from its own torch.Generator seeded `seed + k`, so it is the same picture
whatever --batch is. evaluate.py and the tests use the importable API: load_pipeline(), generate().
"""
import argparse
import dataclasses
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from checkpoint import CheckpointError, atomic_write, load_checkpoint
from config import boolean, fail, resolve_device
from diffusion import APG_MOMENTUM, APG_NORM, SAMPLERS, Diffusion, check_guidance, parse_cfg_interval
from encoders import LoadError, load_text_encoder, load_vae
from model import DiT, DiTConfig

# The defaults follow the guidance table on the demo's checkpoint (docs/log.md 2026-12-05, "Guidance at sampling"):
# 25 Euler steps as good as 50, CFG 5 at least as good as 3 and better than 7.5.
CFG, STEPS = 5.0, 25

#################################################################################
#                                  Loading                                      #
#################################################################################

@dataclasses.dataclass
class Pipeline:
    model: DiT                 # denoiser with the checkpoint's EMA (or raw) weights, eval mode, no grad
    diffusion: Diffusion       # schedule rebuilt from the checkpoint's config
    vae: object                # encoders.load_vae(config["vae"])
    text_encoder: object       # encoders.load_text_encoder(config["text_encoder"], chunks=config["text_chunks"])
    config: dict               # train.py globals stored in the checkpoint
    step: int                  # optimizer step the checkpoint was saved at
    device: torch.device
    ckpt: str

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    def latent_shape(self, size=None) -> tuple:
        """(C, h, w) of the latents of a W x H image, size = (W, H); None: the square training resolution. The DiT
        takes any grid its patch divides (positions are computed per grid, model.py), so W and H must be multiples
        of the VAE's factor x patch: ValueError otherwise (the training resolution fits by construction, and is not
        checked: bench.py samples a peer network that has no DiTConfig)."""
        f, w, h = self.vae.factor, *(size or (self.resolution, self.resolution))
        p = self.model.config.patch if size else 1
        if w < 1 or h < 1 or w % (f * p) or h % (f * p):
            raise ValueError(f"{w}x{h}: width and height must be positive multiples of {f * p} "
                             f"(the VAE's factor {f} x patch {p})")
        return (self.vae.channels, h // f, w // f)


def load_pipeline(ckpt_path: str, device="cpu", weights: str = "ema", check=None) -> Pipeline:
    """Rebuild DiT (with `weights`: "ema" or "model"), Diffusion, VAE and text encoder from one checkpoint.
    check(diffusion): called before the VAE and the text encoder load (the CLIs' settings that need the model's kind:
    its ValueError reaches the caller)."""
    device = torch.device(device)
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt["config"]
    if not isinstance(ckpt.get(weights), dict):  # e.g. --weights model on a release that ships only the EMA
        hint = " (try --weights ema)" if weights == "model" else ""
        raise CheckpointError(f"{ckpt_path} has no '{weights}' weights{hint}")
    try:
        model = DiT(DiTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt[weights])
    except (TypeError, ValueError, RuntimeError) as e:  # a model_config model.py cannot build, or other shapes
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"{ckpt_path}: '{weights}' weights do not fit model.py: {reason}") from None
    model.to(device).eval().requires_grad_(False)
    try:
        diffusion = Diffusion.from_config(config)
    except ValueError as e:
        raise CheckpointError(f"{ckpt_path}: its diffusion settings are invalid: {e}") from None
    if check is not None:
        check(diffusion)
    vae = load_vae(config["vae"], device=device)
    try:  # prompts are encoded as the captions were in training: text_chunks windows of 75 tokens (1 before the key)
        text_encoder = load_text_encoder(config["text_encoder"], device=device, chunks=config.get("text_chunks", 1))
    except ValueError as e:
        raise CheckpointError(f"{ckpt_path}: {e}") from None
    if vae.channels != model.config.in_channels:
        raise CheckpointError(f"{ckpt_path}: vae {vae.name} has {vae.channels} channels, the model "
                              f"{model.config.in_channels}")
    return Pipeline(model, diffusion, vae, text_encoder, config, int(ckpt.get("step", 0)), device, ckpt_path)

#################################################################################
#                                  Sampling                                     #
#################################################################################

def encode_text(pipe: Pipeline, captions: list) -> tuple:
    states, pooled = pipe.text_encoder(list(captions))
    return states.to(pipe.device), pooled.to(pipe.device)  # (B, L, D), (B, P)


@torch.no_grad()
def sample_latents(pipe: Pipeline, prompts: list, seeds: list, cfg=CFG, steps=STEPS, sampler=None, eta=0.0,
                   guidance_rescale=0.0, negative="", init=None, t_start=None, size=None, cfg_interval=None,
                   apg=None, apg_norm=APG_NORM, apg_momentum=APG_MOMENTUM, cfg_zero_star=False) -> torch.Tensor:
    """One batch: latent i comes only from torch.Generator(seed i) (x_T and every sampler noise).
    -> (B, C, h, w) fp32. init (B, C, h, w) latents + t_start: start from init noised to t_start (SDEdit).
    size: (W, H) of the images, None = the square training resolution (Pipeline.latent_shape).
    cfg_interval, apg, apg_norm, apg_momentum, cfg_zero_star: Diffusion.sample's guidance options."""
    assert len(prompts) == len(seeds), "one seed per prompt"
    assert init is None or t_start is not None, "init latents need the t_start they are noised to"
    # CPU generators (as diffusers' randn_tensor): the same seed gives the same x_T and noise on any device
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = pipe.latent_shape(size)  # (C, h, w)
    x_T = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(pipe.device)  # (B, C, h, w)
    if init is not None:
        x_T = pipe.diffusion.add_noise(init.to(pipe.device), x_T, torch.full((len(x_T),), t_start, device=pipe.device))
    cond = encode_text(pipe, prompts)
    uncond = None
    if cfg != 1.0:  # scale 1 is the conditional model alone: skip the unconditional half entirely
        states, pooled = encode_text(pipe, [negative])  # the negative prompt takes the empty caption's place in CFG
        uncond = (states.expand(len(prompts), -1, -1), pooled.expand(len(prompts), -1))
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if pipe.device.type == "cuda" else nullcontext()

    def model_fn(x, t, c):  # diffusion.sample concatenates cond and uncond halves: one batched forward
        with ctx:
            return pipe.model(x, t, c[0], c[1]).float()

    return pipe.diffusion.sample(model_fn, x_T, cond, uncond=uncond, cfg=cfg, guidance_rescale=guidance_rescale,
                                 steps=steps, sampler=sampler, eta=eta, generator=gens, t_start=t_start,
                                 cfg_interval=cfg_interval, apg=apg, apg_norm=apg_norm, apg_momentum=apg_momentum,
                                 cfg_zero_star=cfg_zero_star).float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list, seeds: list, cfg=CFG, steps=STEPS, sampler=None, eta=0.0,
             guidance_rescale=0.0, negative="", batch_size=16, progress=False, init=None, t_start=None,
             size=None, cfg_interval=None, apg=None, apg_norm=APG_NORM, apg_momentum=APG_MOMENTUM,
             cfg_zero_star=False) -> torch.Tensor:
    """One image per (prompt, seed), sampled batch_size at a time and decoded -> uint8 (N, H, W, 3).
    init: (N, C, h, w) latents to start from, noised to t_start (SDEdit); None: pure noise. size: (W, H), None = the
    square training resolution. cfg_interval, apg, apg_norm, apg_momentum, cfg_zero_star: Diffusion.sample's."""
    guidance = dict(cfg_interval=cfg_interval, apg=apg, apg_norm=apg_norm, apg_momentum=apg_momentum,
                    cfg_zero_star=cfg_zero_star)
    assert len(prompts) == len(seeds), "one seed per prompt"
    out = []
    with tqdm(total=len(prompts), disable=not progress, desc=f"sampling cfg {cfg:g}", unit="img") as bar:
        for i in range(0, len(prompts), batch_size):
            latents = sample_latents(pipe, prompts[i:i + batch_size], seeds[i:i + batch_size], cfg=cfg, steps=steps,
                                     sampler=sampler, eta=eta, guidance_rescale=guidance_rescale, negative=negative,
                                     init=None if init is None else init[i:i + batch_size], t_start=t_start,
                                     size=size, **guidance)
            out.append(to_uint8(pipe.vae.decode(latents)))
            bar.update(len(latents))
    return torch.cat(out)

#################################################################################
#                                  Output                                       #
#################################################################################

def make_grid(images: torch.Tensor, cols: int, pad: int = 2, min_cell: int = 256) -> Image.Image:
    """uint8 (N, H, W, 3) -> one PIL image, `cols` per row, white padding. Small images are enlarged by an integer
    factor (nearest neighbour: every pixel stays a sharp square) to at least `min_cell` px, so a grid of 16-px
    samples is visible as it is."""
    factor = max(1, math.ceil(min_cell / min(images.shape[1:3])))
    images = images.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k, im in enumerate(images.numpy()):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return Image.fromarray(grid)


def fresh_path(path: str, folder: bool = False) -> str:
    """path, or the first free of path-2, path-3, ... (before the extension for a file: eval-2.json), reserved by
    creating it (an empty folder, or an empty file to be replaced), so that a run never overwrites, or mixes its
    files with, an earlier or a concurrent run's. An existing empty folder counts as free."""
    path = os.path.normpath(path)  # "samples/" -> "samples", so the next one is "samples-2"
    root, ext = (path, "") if folder else os.path.splitext(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for k in range(1, 1_000_000):
        candidate = path if k == 1 else f"{root}-{k}{ext}"
        try:
            if folder:
                os.mkdir(candidate)
            else:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return candidate
        except FileExistsError:
            if folder and os.path.isdir(candidate) and not os.listdir(candidate):
                return candidate
    raise FileExistsError(f"no free name for {path}")


def save_png(image: Image.Image, path: str, pnginfo=None):
    """Write to a temporary name, then rename: a killed run or a full disk leaves no truncated PNG under `path`."""
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=pnginfo))


def boolean_arg(text: str) -> bool:
    """config.boolean as an argparse type."""
    try:
        return boolean(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size_arg(text: str) -> tuple:
    """'WxH' (or 'N': N x N) -> (W, H) as an argparse type; Pipeline.latent_shape checks the multiples."""
    w, sep, h = text.lower().partition("x")
    try:
        return int(w), int(h if sep else w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects WIDTHxHEIGHT in pixels (e.g. 512x256), got {text!r}") from None


def interval_arg(text: str) -> tuple:
    """diffusion.parse_cfg_interval as an argparse type ("LO,HI" -> (lo, hi))."""
    try:
        return parse_cfg_interval(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_guidance_args(p: argparse.ArgumentParser):
    """Diffusion.sample's guidance options as flags (shared with evaluate.py); guidance_args reads them back."""
    p.add_argument("--cfg_interval", type=interval_arg, default=None, metavar="LO,HI",
                   help="guide only the evaluations whose s (sigma for flow, t / T otherwise) is in [LO, HI] "
                   "(arXiv 2404.07724); the others run the conditional model alone (default: guide everywhere)")
    p.add_argument("--apg", type=float, default=None, metavar="ETA", help="adaptive projected guidance (arXiv "
                   "2410.02416) instead of CFG, ETA the weight of the parallel component (0: the paper's main "
                   "setting; default: off)")
    p.add_argument("--apg_norm", type=float, default=None, metavar="R",
                   help=f"APG's norm threshold r, > 0 (default {APG_NORM}; inf: no rescaling)")
    p.add_argument("--apg_momentum", type=float, default=None, metavar="BETA",
                   help=f"APG's momentum beta over the steps (default {APG_MOMENTUM}; the paper's is negative)")
    p.add_argument("--cfg_zero_star", type=boolean_arg, default=False, metavar="true|false",
                   help="CFG-Zero* (arXiv 2503.18886; flow checkpoints only): the optimised scale, first step zeroed")


def guidance_args(args) -> dict:
    """generate()'s guidance keywords from add_guidance_args' flags (APG's r and beta: their defaults if not given)."""
    return dict(cfg_interval=args.cfg_interval, apg=args.apg,
                apg_norm=APG_NORM if args.apg_norm is None else args.apg_norm,
                apg_momentum=APG_MOMENTUM if args.apg_momentum is None else args.apg_momentum,
                cfg_zero_star=args.cfg_zero_star)


def check_args(p: argparse.ArgumentParser, args):
    """Exit 2 on settings that would otherwise fail only after loading the models (shared with evaluate.py)."""
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")
    if args.eta < 0:
        p.error(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {args.eta}")
    if args.apg is None and (args.apg_norm is not None or args.apg_momentum is not None):
        p.error("--apg_norm and --apg_momentum set APG, which is off: give --apg ETA too")
    try:  # the model's kind is checked in open_pipeline, before the encoders load
        check_guidance(guidance_rescale=args.guidance_rescale, **guidance_args(args))
    except ValueError as e:
        p.error(str(e))
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here (use --device cpu)")


def open_pipeline(p: argparse.ArgumentParser, args, weights="ema") -> Pipeline:
    """load_pipeline for a command line (shared with evaluate.py): a bad checkpoint, an encoder that cannot be
    loaded, --steps beyond the training timesteps, or guidance the model's kind does not take exit 2 with one
    line."""
    def check(diffusion):  # before the VAE and the text encoder load (CFG-Zero*: flow checkpoints only)
        try:
            check_guidance(guidance_rescale=args.guidance_rescale, prediction=diffusion.prediction,
                           **guidance_args(args))
        except ValueError as e:
            p.error(str(e))

    try:
        pipe = load_pipeline(args.ckpt, args.device, weights=weights, check=check)
    except (CheckpointError, LoadError) as e:
        fail(e, prog=p.prog)
    if args.steps > pipe.diffusion.T:
        p.error(f"--steps must be <= the {pipe.diffusion.T} training timesteps, got {args.steps}")
    try:  # --sampler left out: the checkpoint's kind picks it (ddim, or euler for flow)
        args.sampler = pipe.diffusion.check_sampler(args.sampler, args.eta)
    except ValueError as e:
        p.error(f"--sampler: {e}")
    return pipe


def save_images(images: torch.Tensor, prompts: list, seeds: list, settings: dict, out_dir: str, cols: int) -> list:
    """NNNN.png per image with prompt, seed and settings in the PNG text chunk, plus grid.png. -> paths"""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k, (im, prompt, seed) in enumerate(zip(images.numpy(), prompts, seeds)):
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", prompt)
        info.add_text("seed", str(seed))
        info.add_text("parameters", json.dumps({"prompt": prompt, "seed": seed, **settings}))
        paths.append(os.path.join(out_dir, f"{k:04d}.png"))
        save_png(Image.fromarray(im), paths[-1], pnginfo=info)
    save_png(make_grid(images, cols), os.path.join(out_dir, "grid.png"))
    return paths

#################################################################################
#                                  CLI                                          #
#################################################################################

def main(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description="Sample images from a train.py checkpoint.")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="train.py checkpoint")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="EMA weights (default) or the raw ones")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    p.add_argument("--steps", type=int, default=STEPS, help="sampler steps")
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="default: ddim, or euler for a flow model")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--cfg", type=float, default=CFG, help="classifier-free guidance scale (1: conditional only)")
    p.add_argument("--guidance_rescale", type=float, default=0.0, help="CFG rescale phi (arXiv 2305.08891, sec. 3.4)")
    p.add_argument("--negative", default="", help="negative prompt: replaces the empty caption in CFG")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU, else the CPU) | cpu | cuda:N")
    p.add_argument("--out", default="", help="output folder (default: samples/ beside the checkpoint); if it "
                   "holds files already, the next free OUT-2, OUT-3, ... is used: nothing is overwritten")
    p.add_argument("--batch", type=int, default=16, help="images sampled together (CFG doubles the model batch)")
    p.add_argument("--compile", type=boolean_arg, default=None, metavar="true|false",
                   help="torch.compile the denoiser (default: true on CUDA, false on the CPU)")
    p.add_argument("--size", type=size_arg, default=None, metavar="WxH", help="image width x height in pixels, "
                   "multiples of the VAE's factor x patch (default: the checkpoint's square resolution)")
    add_guidance_args(p)
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    if args.n < 1:
        p.error("--n must be >= 1")  # exits 2
    check_args(p, args)
    pipe = open_pipeline(p, args, weights=args.weights)
    args.size = args.size or (pipe.resolution, pipe.resolution)
    try:  # before anything is sampled or written
        pipe.latent_shape(args.size)
    except ValueError as e:
        p.error(f"--size {e}")
    if pipe.device.type == "cuda" if args.compile is None else args.compile:  # generate calls pipe.model: the compiled
        pipe.model = torch.compile(pipe.model)  # module (the first batch, and a smaller last one, compile; then reused)
    out_dir = fresh_path(args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples"), folder=True)
    prompts = [prompt for prompt in args.prompts for _ in range(args.n)]
    seeds = [args.seed + k for k in range(len(prompts))]
    settings = dict(ckpt=args.ckpt, step=pipe.step, weights=args.weights, cfg=args.cfg, steps=args.steps,
                    sampler=args.sampler, eta=args.eta, guidance_rescale=args.guidance_rescale, negative=args.negative,
                    size="{}x{}".format(*args.size), **guidance_args(args))
    images = generate(pipe, prompts, seeds, cfg=args.cfg, steps=args.steps, sampler=args.sampler, eta=args.eta,
                      guidance_rescale=args.guidance_rescale, negative=args.negative, batch_size=args.batch,
                      progress=True, size=args.size, **guidance_args(args))
    paths = save_images(images, prompts, seeds, settings, out_dir, cols=args.n)
    print(f"wrote {len(paths)} images + grid.png to {out_dir}")


if __name__ == "__main__":
    main()
