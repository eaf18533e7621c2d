"""
Sample quality as papers report it: FID, Inception Score and CLIP score over a prompt file, optionally over a
sweep of CFG scales, plus pixel-level prompt-adherence probes for the built-in `shapes`, `scenes` and `scenes_wide`
sets.

    python evaluate.py --ckpt out/ckpt.pt --prompts coco30k.txt --ref coco30k_256/ --n 30000 --cfg 1,3,5
    python evaluate.py --ckpt out/ckpt.pt --probe shapes --cfg 1,4
    python evaluate.py --ckpt out/ckpt.pt --probe scenes --cfg 1,3,5   # GenEval's six categories (toys.py)
    python evaluate.py --probe scenes --truth --resolution 64          # the reader on true renders: 1.0
    python evaluate.py --ckpt out/ckpt.pt --probe scenes_wide --cfg 3  # the same at the 2:1 and 1:2 bucket sizes
    python evaluate.py --ckpt out/ckpt.pt --probe scenes_wide_long     # ... prompted with long captions (toys.py)

FID / IS use the TF-Inception "2015-12-05" weights through torch-fidelity (the weights TTUR, pytorch-fid and
clean-fid use). torch-fidelity resizes uint8 images to 299x299 with a bilinear resize that reproduces
TensorFlow 1.x's tf.image.resize_bilinear (align_corners=False, no antialiasing), as the original TF FID / IS
code did. Offline: --inception_weights weights-inception-2015-12-05-6726825d.pth (torch-fidelity's release file),
or that file in $TORCH_HOME/hub/checkpoints/. Reference images are center-cropped to a square and resized to the
model's resolution (PIL bicubic) before Inception; their statistics are cached in --stats_cache.
"""
import argparse
import datetime
import hashlib
import json
import os
import random

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from tqdm import tqdm

import toys
from checkpoint import atomic_write, write_json
from config import fail, resolve_device
from data import bucket_size, to_pixels
from sources import IMAGE_EXTS
from diffusion import SAMPLERS
from encoders import ClipScorer, InceptionV3
from toys import SHAPE_BACKGROUNDS, SHAPE_COLORS, SHAPE_KINDS, render_shape, shape_attributes, shapes_caption
from sample import add_guidance_args, check_args, fresh_path, generate, guidance_args, open_pipeline, save_png

#################################################################################
#                                  Metrics                                      #
#################################################################################

def feature_stats(features) -> tuple:
    """(N, D) features -> mean (D,), covariance (D, D), float64, as pytorch-fid's calculate_activation_statistics."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"a covariance needs >= 2 images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)  (Heusel et al. 2017, arXiv 1706.08500, eq. 6), computed as
    pytorch-fid's calculate_frechet_distance: scipy sqrtm, eps added to both diagonals when the product is singular."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    try:
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    except linalg.LinAlgError:  # newer scipy raises where older returned non-finite values
        covmean = np.full_like(sigma1, np.nan)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding gives tiny imaginary parts; large ones mean a broken covariance
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm(S1 S2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10) -> tuple:
    """exp(E_x KL(p(y|x) || p(y))) per split, mean and std over splits (Salimans et al. 2016, arXiv 1606.03498;
    split as OpenAI's inception_score.py: consecutive chunks i*N//splits, p(y) the chunk's mean)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    n = logits.shape[0]
    if n < splits:  # a split of one image has KL 0: IS would read exactly 1 whatever the images
        raise ValueError(f"Inception Score over {splits} splits needs >= {splits} images, got {n}")
    log_p = logits.log_softmax(dim=1)  # (N, K) log p(y|x)
    scores = []
    for i in range(splits):
        lp = log_p[i * n // splits:(i + 1) * n // splits]  # (n_i, K)
        p = lp.exp()
        log_py = p.mean(dim=0).log()  # (K,) log p(y), the split's marginal
        kl = (p * (lp - log_py)).where(p > 0, 0.0).sum(dim=1)  # (n_i,) KL(p(y|x) || p(y)), with 0 log 0 = 0
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))

#################################################################################
#                          Reference statistics (cached)                        #
#################################################################################

def list_images(folder: str) -> list:
    files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
             if f.lower().endswith(IMAGE_EXTS)]
    return sorted(files)


def load_image(path: str, resolution: int) -> np.ndarray:
    """RGB, center-cropped to a square and resized to resolution (PIL bicubic) -> uint8 (R, R, 3)."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    if (w, h) != (resolution, resolution):
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(im)


def reference_stats(ref: str, extractor, resolution: int, cache_dir="cache/fid_stats", batch_size=64) -> dict:
    """mu, sigma of `extractor`'s features over a folder of images (cached, keyed by the folder's files, the
    resolution and the extractor's name), or read from a .npz with mu and sigma (pytorch-fid's format)."""
    if ref.endswith(".npz"):
        with np.load(ref) as f:
            return dict(mu=f["mu"], sigma=f["sigma"], n=int(f["n"]) if "n" in f else None, source=ref, cached=True)
    files = list_images(ref)
    if len(files) < 2:
        raise FileNotFoundError(f"{len(files)} images ({', '.join(IMAGE_EXTS)}) under {ref}: FID needs a reference set")
    key = hashlib.sha1(json.dumps([extractor.name, resolution, os.path.abspath(ref)] + [
        (os.path.relpath(f, ref), os.path.getsize(f), os.path.getmtime(f)) for f in files]).encode()).hexdigest()[:16]
    name = f"{os.path.basename(os.path.normpath(ref))}-{extractor.name}-{resolution}px-{key}.npz"
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
        with np.load(path) as f:
            return dict(mu=f["mu"], sigma=f["sigma"], n=int(f["n"]), source=ref, cache=path, cached=True)
    feats = []
    for i in tqdm(range(0, len(files), batch_size), desc="reference features", unit="batch"):
        batch = torch.from_numpy(np.stack([load_image(f, resolution) for f in files[i:i + batch_size]]))
        feats.append(extractor(batch)[0])
    mu, sigma = feature_stats(torch.cat(feats).numpy())
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, n=len(files), extractor=extractor.name,  # whole or
                                          source=os.path.abspath(ref)))  # not at all, if the run is interrupted
    return dict(mu=mu, sigma=sigma, n=len(files), source=ref, cache=path, cached=False)

#################################################################################
#                                  Evaluation                                   #
#################################################################################

def read_prompts(path: str) -> list:
    """.txt: one caption per non-empty line; .jsonl: "text" or "caption" of each record."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
            prompts = [r["text"] if "text" in r else r["caption"] for r in records]
        else:
            prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def evaluate(pipe, prompts, cfgs, extractor, clip_scorer=None, ref=None, n=0, steps=50, sampler=None, eta=0.0,
             guidance_rescale=0.0, seed=0, batch_size=16, save_dir="", guidance=None) -> list:
    """For each CFG scale: n samples (caption k % len(prompts), seed + k; the same pairs for every scale),
    -> [{cfg, n, fid, is_mean, is_std, clip_score}]; fid None without `ref` stats, clip_score None without a scorer.
    guidance: generate()'s guidance keywords (cfg_interval, apg, apg_norm, apg_momentum, cfg_zero_star); None: CFG."""
    n = n or len(prompts)
    captions = [prompts[k % len(prompts)] for k in range(n)]
    seeds = [seed + k for k in range(n)]
    rows = []
    for cfg in cfgs:
        feats, logits, clip = [], [], []
        for i in tqdm(range(0, n, batch_size), desc=f"cfg {cfg:g}", unit="batch"):
            images = generate(pipe, captions[i:i + batch_size], seeds[i:i + batch_size], cfg=cfg, steps=steps,
                              sampler=sampler, eta=eta, guidance_rescale=guidance_rescale, batch_size=batch_size,
                              **(guidance or {}))
            pool, logit = extractor(images)
            feats.append(pool)
            logits.append(logit)
            if clip_scorer is not None:
                clip.append(clip_scorer(images, captions[i:i + batch_size]))
            if save_dir:
                os.makedirs(os.path.join(save_dir, f"cfg{cfg:g}"), exist_ok=True)
                for k, im in enumerate(images.numpy()):
                    save_png(Image.fromarray(im), os.path.join(save_dir, f"cfg{cfg:g}", f"{i + k:05d}.png"))
        is_mean, is_std = inception_score(torch.cat(logits))
        fid = None
        if ref is not None:
            fid = frechet_distance(*feature_stats(torch.cat(feats).numpy()), ref["mu"], ref["sigma"])
        rows.append(dict(cfg=cfg, n=n, fid=fid, is_mean=is_mean, is_std=is_std,
                         clip_score=float(torch.cat(clip).mean()) if clip else None))
    return rows

#################################################################################
#                           Shapes prompt-adherence probe                       #
#################################################################################

def probe_accuracy(images, colors, kinds) -> dict:
    """Share of images whose colour / kind / both, as toys.shape_attributes reads them, match the prompted ones."""
    found = shape_attributes(images)
    color_ok = np.array([c == want for (c, _), want in zip(found, colors)])
    kind_ok = np.array([k == want for (_, k), want in zip(found, kinds)])
    return dict(n=len(found), color_acc=float(color_ok.mean()), shape_acc=float(kind_ok.mean()),
                both_acc=float((color_ok & kind_ok).mean()))


def probe_shapes(pipe, cfg=4.0, n_per_prompt=4, steps=50, seed=0, sampler=None, batch_size=16, progress=False,
                 t_start=None, eta=0.0, guidance_rescale=0.0, guidance=None) -> dict:
    """Every (colour, kind, background) caption of the shapes set, n_per_prompt seeds each -> probe_accuracy + cfg.
    Chance level: 1/len(SHAPE_COLORS) for colour, 1/len(SHAPE_KINDS) for shape.
    t_start: start from a true render of each caption noised to t_start instead of pure noise (SDEdit), to find
    the noise level below which the model keeps the prompted shape (a perfect model: 1.0 from any t_start).
    guidance: generate()'s guidance keywords, as evaluate()'s."""
    combos = [(c, k, b) for c in SHAPE_COLORS for k in SHAPE_KINDS for b in SHAPE_BACKGROUNDS
              for _ in range(n_per_prompt)]
    prompts = [shapes_caption(c, k, b) for c, k, b in combos]
    init = None
    if t_start is not None:
        rng = random.Random(f"probe-{seed}")
        pixels = to_pixels([np.asarray(render_shape(c, k, b, pipe.resolution, rng)) for c, k, b in combos])
        init = torch.cat([pipe.vae.encode(pixels[i:i + batch_size]).float().cpu()  # (N, C, h, w) latents
                          for i in range(0, len(pixels), batch_size)])
    images = generate(pipe, prompts, [seed + i for i in range(len(prompts))], cfg=cfg, steps=steps, sampler=sampler,
                      eta=eta, guidance_rescale=guidance_rescale, batch_size=batch_size, progress=progress, init=init,
                      t_start=t_start, **(guidance or {}))
    accuracy = probe_accuracy(images, [c for c, _, _ in combos], [k for _, k, _ in combos])
    return dict(cfg=cfg, t_start=t_start, **accuracy)

#################################################################################
#                   Scenes compositional probe (GenEval-style)                  #
#################################################################################

# The prompts, the reader and the rules are toys.py's; this samples the images and prints the tables.

SCENE_SETS = {"in_distribution": toys.in_distribution_prompts, "held_out": toys.held_out_prompts}
# each scenes probe -> probe_scenes' keywords (scenes_wide: the 2:1 and 1:2 buckets; _long: long prompts)
SCENE_PROBES = {"scenes": dict(wide=False, long=False), "scenes_wide": dict(wide=True, long=False),
                "scenes_wide_long": dict(wide=True, long=True)}
# The free colours of a long prompt's objects: in-distribution ones only from the pairs training draws, so that a
# long in-distribution prompt names no held-out pair; held-out prompts from every pair (as their true renders).
LONG_PAIRS = {"in_distribution": toys.TRAIN_PAIRS, "held_out": toys.ALL_PAIRS}


TRUTH_MULTIPLE = 2  # --truth's bucket sides (no checkpoint): pixel space at patch 2, as issue 24's 46 x 22 at 32 px


def wide_sizes(resolution, multiple):
    """The scenes_wide probe's (W, H): the 2:1 and 1:2 buckets of ~resolution^2 px, as training's (data.bucket_size)."""
    return [bucket_size(resolution, aspect, multiple) for aspect in (2.0, 0.5)]


def probe_scenes(pipe, cfg=4.0, n_per_prompt=4, steps=50, seed=0, sampler=None, eta=0.0, guidance_rescale=0.0,
                 batch_size=16, progress=False, resolution=None, wide=False, guidance=None, long=False) -> dict:
    """Both prompt sets, n_per_prompt seeds each (image k: seed + k) -> {cfg, truth, resolution, sizes,
    in_distribution, held_out} with toys.evaluate_images' accuracies. pipe None: true renders at `resolution` (the
    reader's ceiling, 1.0 by construction) instead of samples. wide: scenes_wide's probe, image k at sizes[k % 2]
    (the 2:1, then the 1:2 bucket: each prompt at both when n_per_prompt is even), read on 2 cells a short side;
    by_size holds each size's accuracies. guidance: generate()'s guidance keywords, as evaluate()'s. long (wide
    only): each image prompted with toys.long_prompt (the caption, then where each object of its seed's true
    render stands) and scored against the spec as the short probe; long_prompts holds the texts."""
    if long and not wide:
        raise ValueError("the long prompts place objects on scenes_wide's grids: long needs wide")
    resolution = resolution if pipe is None else pipe.resolution
    multiple = TRUTH_MULTIPLE if pipe is None else pipe.vae.factor * pipe.model.config.patch
    sizes = wide_sizes(resolution, multiple) if wide else [None]  # None: the square resolution
    out = dict(cfg=None if pipe is None else cfg, truth=pipe is None, resolution=resolution)
    if wide:
        out.update(sizes=["%dx%d" % s for s in sizes], by_size={})
    if long:
        out["long_prompts"] = {}
    for name, prompts in SCENE_SETS.items():
        texts, specs, seeds = toys.probe_plan(prompts(), n_per_prompt, seed)
        pairs = LONG_PAIRS[name] if long else toys.ALL_PAIRS
        if long:
            texts = [toys.long_prompt(spec, s, sizes[k % len(sizes)], pairs)
                     for k, (spec, s) in enumerate(zip(specs, seeds))]
            out["long_prompts"][name] = texts
        images = [None] * len(texts)
        for j, size in enumerate(sizes):
            ks = range(j, len(texts), len(sizes))
            if pipe is None:
                drawn = [np.asarray(toys.render_spec(specs[k], seeds[k], size or resolution, pairs)) for k in ks]
            else:
                drawn = generate(pipe, [texts[k] for k in ks], [seeds[k] for k in ks], cfg=cfg, steps=steps,
                                 sampler=sampler, eta=eta, guidance_rescale=guidance_rescale, batch_size=batch_size,
                                 progress=progress, size=size, **(guidance or {})).numpy()
            for k, image in zip(ks, drawn):
                images[k] = image
            if wide:
                out["by_size"].setdefault(out["sizes"][j], {})[name] = toys.evaluate_images(
                    images[j::len(sizes)], specs[j::len(sizes)], toys.WIDE_CELLS)
        out[name] = toys.evaluate_images(images, specs, toys.WIDE_CELLS if wide else toys.GRID)
    return out


def run_scenes_probe(args, pipe, cfgs, report):
    """The scenes (scenes_wide, scenes_wide_long) probe at every CFG scale (once on true renders when pipe is None)
    into `report` (probe_<name>), a table each; the wide ones have a row per set and size, then both sizes."""
    wide = SCENE_PROBES[args.probe]["wide"]
    rows = [probe_scenes(pipe, cfg=c, n_per_prompt=args.probe_n, steps=args.steps, seed=args.seed,
                         sampler=args.sampler, eta=args.eta, guidance_rescale=args.guidance_rescale,
                         batch_size=args.batch, progress=True, resolution=args.resolution,
                         guidance=guidance_args(args), **SCENE_PROBES[args.probe])
             for c in (cfgs if pipe is not None else [None])]
    report[f"probe_{args.probe}"] = rows
    report[f"probe_{args.probe}_prompts"] = {name: [p.text for p in prompts()] for name, prompts in SCENE_SETS.items()}
    names = [c.replace("_", " ") for c in toys.CATEGORIES]
    for r in rows:
        at = " and ".join(r["sizes"]) if wide else r["resolution"]
        print(f"\n{args.probe} probe, {'true renders' if r['truth'] else 'cfg %g' % r['cfg']} "
              f"at {at} px ({args.probe_n} images per prompt, {toys.SLOTS} prompts per category; overall: the mean "
              "over the categories a set has)")
        print(f"| set | n | {' | '.join(names)} | overall |\n|---|---|{'---|' * (len(names) + 1)}")
        for name in SCENE_SETS:
            for size, acc in [(s, r["by_size"][s][name]) for s in r.get("sizes") or []] + [("", r[name])]:
                print(f"| {name.replace('_', '-')}{' ' * bool(size)}{size} | {acc['n']} | "
                      + " | ".join(fmt(acc[c], ".3f") for c in toys.CATEGORIES + ("overall",)) + " |")

#################################################################################
#                                  CLI                                          #
#################################################################################

def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py",
                                description="FID / IS / CLIP score and the shapes probe for a train.py checkpoint.")
    p.add_argument("--ckpt", default="out/ckpt.pt")
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.add_argument("--prompts", default="", help=".txt (one caption per line) or .jsonl (text / caption)")
    p.add_argument("--ref", default="", help="folder of reference images, or a .npz with mu and sigma")
    p.add_argument("--n", type=int, default=0, help="samples per CFG scale (default: one per prompt)")
    p.add_argument("--cfg", default="7.5", help="CFG scale(s), comma separated: 1,3,5")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="default: ddim, or euler for a flow model")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance_rescale", type=float, default=0.0)
    add_guidance_args(p)  # --cfg_interval, --apg, --apg_norm, --apg_momentum, --cfg_zero_star: sample.py's
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="images sampled together")
    p.add_argument("--device", default="auto", help="auto: cuda when there is a GPU, else cpu")
    p.add_argument("--inception_weights", default="", help="local TF-Inception .pth (offline)")
    p.add_argument("--clip", default="ViT-L-14/openai", help="open_clip ARCH/TAG for the CLIP score, or none")
    p.add_argument("--clip_weights", default="", help="local open_clip checkpoint of --clip's ARCH/TAG (offline; "
                   "the TAG still decides QuickGELU vs GELU)")
    p.add_argument("--stats_cache", default="cache/fid_stats", help="folder caching reference statistics")
    p.add_argument("--probe", default="", choices=("", "shapes", *SCENE_PROBES),
                   help="also run a prompt-adherence probe: shapes (colour, kind), scenes (GenEval's categories), "
                   "scenes_wide (the same at the 2:1 and 1:2 bucket sizes) or scenes_wide_long (scenes_wide's, each "
                   "prompt followed by where every object stands, as scenes_wide2's long captions)")
    p.add_argument("--probe_n", type=int, default=8, help="probe images per caption (shapes) or prompt (scenes)")
    p.add_argument("--truth", action="store_true", help="with a scenes probe, no checkpoint: score "
                   "true renders of the probe's prompts (the reader's ceiling)")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"--truth's render size (default {toys.MIN_RESOLUTION}, scenes_wide[_long] "
                   f"{toys.WIDE_MIN_RESOLUTION}: the smallest the reader reads)")
    p.add_argument("--probe_from", default="", help="also probe from true renders noised to these timesteps "
                   "(comma separated, e.g. 200,400): where the model loses the prompted shape")
    p.add_argument("--save_images", default="", help="folder to keep the generated images in (a new one: "
                   "if it holds files, the next free FOLDER-2, ... is used)")
    p.add_argument("--out", default="", help="JSON results (default: eval.json beside the checkpoint; an existing "
                   "file is kept and eval-2.json, ... written instead)")
    return p


def parse_settings(p: argparse.ArgumentParser, argv) -> tuple:
    """The settings that need no checkpoint, checked (p.error: exit 2) -> (args, cfgs, prompts, t_starts)."""
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    if not args.prompts and not args.probe:
        p.error("nothing to do: give --prompts (FID / IS / CLIP) and/or --probe "
                + "|".join(("shapes", *SCENE_PROBES)))
    check_args(p, args)
    if args.n < 0 or args.probe_n < 1:
        p.error("--n must be >= 0 (0: one sample per prompt) and --probe_n >= 1")
    try:
        cfgs = [float(c) for c in args.cfg.split(",") if c.strip()]
    except ValueError:
        p.error(f"--cfg must be comma-separated numbers, got {args.cfg!r}")
    if not cfgs:
        p.error(f"--cfg needs at least one scale, got {args.cfg!r}")
    prompts = []
    if args.prompts:
        try:
            prompts = read_prompts(args.prompts)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--prompts {args.prompts}: {type(e).__name__}: {e}")
        if (args.n or len(prompts)) < 10:
            p.error(f"{args.n or len(prompts)} samples per scale: the Inception Score over 10 splits needs >= 10 "
                    "(--n N samples cycles through the prompts; papers use 10K-50K)")
    try:
        t_starts = [int(t) for t in args.probe_from.split(",") if t.strip()]
    except ValueError:
        p.error(f"--probe_from must be comma-separated timesteps: 200,400, got {args.probe_from!r}")
    if t_starts and args.probe != "shapes":
        p.error("--probe_from needs --probe shapes")
    check_truth_settings(p, args)
    return args, cfgs, prompts, t_starts


def check_truth_settings(p: argparse.ArgumentParser, args):
    """--truth and --resolution: true renders of the scenes probe, no checkpoint (p.error: exit 2)."""
    if args.truth and (args.probe not in SCENE_PROBES or args.prompts):
        p.error("--truth scores true renders of the scenes probe: give --probe " + ", ".join(SCENE_PROBES)
                + ", without --prompts")
    if args.resolution is not None and not args.truth:
        p.error("--resolution is --truth's render size (a checkpoint samples at its own resolution)")
    if args.truth:
        wide = SCENE_PROBES[args.probe]["wide"]
        least, check = (toys.WIDE_MIN_RESOLUTION, toys.check_wide_resolution) if wide else \
            (toys.MIN_RESOLUTION, toys.check_resolution)
        args.resolution = least if args.resolution is None else args.resolution
        try:
            check(args.resolution)
        except ValueError as e:
            p.error(f"--resolution: {e}")


def check_pipeline_settings(p: argparse.ArgumentParser, args, pipe, t_starts):
    """The settings checked against the loaded checkpoint, before anything is sampled (p.error: exit 2)."""
    if any(not 0 <= t < pipe.diffusion.T for t in t_starts):
        p.error(f"--probe_from timesteps must be in [0, {pipe.diffusion.T - 1}], got {args.probe_from!r}")
    if args.probe in SCENE_PROBES:
        try:
            (toys.check_wide_resolution if SCENE_PROBES[args.probe]["wide"] else toys.check_resolution)(
                pipe.resolution)
        except ValueError as e:
            p.error(f"--probe {args.probe}: the checkpoint's images are too small: {e}")


def metric_networks(args, device, extractor=None, clip_scorer=None) -> tuple:
    """(extractor, clip_scorer): the injected ones, else TF-Inception and open_clip (from local files on an
    offline machine); exit 2 with a one-line error when they cannot be had."""
    try:
        extractor = extractor or InceptionV3(args.inception_weights or None, device=device)
        if clip_scorer is None and args.clip.lower() != "none":
            clip_scorer = ClipScorer.load(args.clip, args.clip_weights, device=device)
    except Exception as e:  # a download, a missing file, a checkpoint of another architecture: one line each
        fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
             "(offline: --inception_weights PATH, --clip_weights PATH or --clip none)", prog="evaluate.py")
    return extractor, clip_scorer


def run_metrics(args, pipe, prompts, cfgs, report, extractor=None, clip_scorer=None):
    """FID / IS / CLIP score at every CFG scale into `report`, and their table on stdout."""
    extractor, clip_scorer = metric_networks(args, pipe.device, extractor, clip_scorer)
    try:
        ref = reference_stats(args.ref, extractor, pipe.resolution, args.stats_cache, args.batch) if args.ref else None
    except (OSError, KeyError, ValueError) as e:  # a missing or too small folder, an .npz without mu / sigma
        fail(f"--ref {args.ref}: {e}", prog="evaluate.py")
    rows = evaluate(pipe, prompts, cfgs, extractor, clip_scorer, ref, n=args.n, steps=args.steps,
                    sampler=args.sampler, eta=args.eta, guidance_rescale=args.guidance_rescale, seed=args.seed,
                    batch_size=args.batch, guidance=guidance_args(args),
                    save_dir=fresh_path(args.save_images, folder=True) if args.save_images else "")
    report.update(prompts=args.prompts, feature_extractor=extractor.name,
                  clip_model=getattr(clip_scorer, "name", None), results=rows,
                  reference=None if ref is None else dict(source=ref["source"], n=ref["n"], cache=ref.get("cache")))
    print(f"\nFID vs {args.ref or '(no reference)'} ({ref['n'] if ref else 0} images), {extractor.name}; "
          f"IS over 10 splits; CLIP score {report['clip_model']}")
    if ref is not None and rows[0]["n"] < len(ref["mu"]):
        print(f"note: {rows[0]['n']} samples < {len(ref['mu'])} feature dimensions: FID is biased upward "
              "(papers use 10K-50K samples: FID-30K on COCO)")
    print("| cfg | n | FID | IS | CLIP score |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cfg']:g} | {r['n']} | {fmt(r['fid'])} | {r['is_mean']:.2f} ± {r['is_std']:.2f} "
              f"| {fmt(r['clip_score'])} |")


def run_probe(args, pipe, cfgs, t_starts, report):
    """The shapes probe at every CFG scale, from pure noise and from each of t_starts, into `report` and stdout."""
    probe = [probe_shapes(pipe, cfg=c, n_per_prompt=args.probe_n, steps=args.steps, seed=args.seed,
                          sampler=args.sampler, batch_size=args.batch, progress=True, t_start=t, eta=args.eta,
                          guidance_rescale=args.guidance_rescale, guidance=guidance_args(args))
             for t in [None] + t_starts for c in cfgs]
    report["probe_shapes"] = probe
    print(f"\nshapes probe (chance: colour {1 / len(SHAPE_COLORS):.2f}, shape {1 / len(SHAPE_KINDS):.2f}; "
          "from: sampled from pure noise, or from a true render noised to timestep t)")
    print("| from | cfg | n | colour acc | shape acc | both |\n|---|---|---|---|---|---|")
    for r in probe:
        print(f"| {'noise' if r['t_start'] is None else 't=%d' % r['t_start']} | {r['cfg']:g} | {r['n']} "
              f"| {r['color_acc']:.3f} | {r['shape_acc']:.3f} | {r['both_acc']:.3f} |")


def write_report(report, out, ckpt):
    """JSON to `out` (default eval.json beside the checkpoint), a fresh name if taken, written atomically."""
    out = fresh_path(out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "eval.json"))
    write_json(out, report, indent=2)
    print(f"\nwrote {out}")


def main(argv=None, extractor=None, clip_scorer=None):
    """extractor / clip_scorer: injected callables (tests); by default the TF-Inception and open_clip models."""
    p = build_parser()
    args, cfgs, prompts, t_starts = parse_settings(p, argv)
    if args.truth:  # no checkpoint: the scenes reader on true renders
        report = dict(truth=True, date=datetime.date.today().isoformat(),
                      settings=dict(seed=args.seed, probe_n=args.probe_n))
        run_scenes_probe(args, None, cfgs, report)
        write_report(report, args.out or "eval-truth.json", args.ckpt)  # no checkpoint: not beside one
        return
    pipe = open_pipeline(p, args, weights=args.weights)
    check_pipeline_settings(p, args, pipe, t_starts)
    device_name = torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else "cpu"
    report = dict(ckpt=args.ckpt, step=pipe.step, date=datetime.date.today().isoformat(), device=device_name,
                  settings=dict(steps=args.steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
                                guidance_rescale=args.guidance_rescale, weights=args.weights, **guidance_args(args)))
    print(f"{args.ckpt} (step {pipe.step}) on {device_name}, {report['date']}: {args.sampler} {args.steps} steps")
    if args.prompts:
        run_metrics(args, pipe, prompts, cfgs, report, extractor, clip_scorer)
    if args.probe == "shapes":
        run_probe(args, pipe, cfgs, t_starts, report)
    if args.probe in SCENE_PROBES:
        run_scenes_probe(args, pipe, cfgs, report)
    write_report(report, args.out, args.ckpt)


if __name__ == "__main__":
    main()
