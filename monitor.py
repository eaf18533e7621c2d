"""
Watching a run: the environment record that opens log.jsonl, the device-side meter and the progress line, the
loggers (log.jsonl, TensorBoard, W&B), the train-time preview grid and in-run eval of the EMA weights, and
curves.png.

    python monitor.py out/shapes                 # -> out/shapes/curves.png
    python monitor.py out/a out/b --out ab.png   # several runs on the same axes

train.py redraws out_dir/curves.png at every checkpoint. matplotlib is imported only to draw.
"""
import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from checkpoint import atomic_write
from config import prompt_list
from diffusion import LEVER_TERMS, parse_cfg_interval
from encoders import ClipScorer, load_vae
from model import fp8_split, train_flops
from sample import STEPS, Pipeline, generate, make_grid, save_png


def environment(C, argv, step):
    """log.jsonl's first record of a process: what ran, from which commit, with which versions, on what, how."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout
        commit = git("rev-parse", "HEAD").strip() or "unknown"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", False
    # torch's own version string keeps its build (2.14.1+cu130): the CUDA build matters to a rerun
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("diffusers", "open_clip_torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cuda = C.device.startswith("cuda")
    return {"event": "start", "command": ["train.py", *argv], "git_commit": commit, "git_dirty": dirty,
            "versions": versions, "device": torch.cuda.get_device_name(C.device) if cuda else platform.processor()
            or platform.machine(), "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "step": step, "config": dict(vars(C))}


class Meter:
    """A log interval's sums, kept on the device: adding is free of host syncs, reading is one."""
    def __init__(self, device, T, bins=10):
        self.T, self.bins = T, bins
        self.sums = {k: torch.zeros((), device=device) for k in ("loss", "n", "skipped", "grad_norm")}
        self.bin_sum, self.bin_cnt = torch.zeros(bins, device=device), torch.zeros(bins, device=device)
        self.bad_streak = torch.zeros((), device=device)  # non-finite steps in a row now
        self.bad_worst = torch.zeros((), device=device)   # the longest such streak since the last read

    def add(self, per_sample, t, grad_norm, found_inf, terms=None):
        ok = 1.0 - found_inf  # skipped steps stay out of the averages
        for k, v in (terms or {}).items():  # the training levers' terms (train_step: the step's mean of each)
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(ok > 0, v, 0.0)
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

    def read(self, ddp, world):
        """Sum over ranks, read, reset. -> (mean loss, mean grad norm, skipped steps, loss by t bin, worst streak,
        {lever term: its mean})"""
        if ddp:
            for v in (*self.sums.values(), self.bin_sum, self.bin_cnt):
                dist.all_reduce(v)
        n = max(self.sums["n"].item(), 1e-9)
        out = (self.sums["loss"].item() / n, self.sums["grad_norm"].item() / n,
               int(round(self.sums["skipped"].item() / world)),
               [round(s / max(c, 1e-9), 5) for s, c in zip(self.bin_sum.tolist(), self.bin_cnt.tolist())],
               int(self.bad_worst.item()), {k: self.sums[k].item() / n for k in LEVER_TERMS if k in self.sums})
        for v in (*self.sums.values(), self.bin_sum, self.bin_cnt, self.bad_worst):
            v.zero_()
        return out


class Progress:
    """The log steps' bookkeeping: the meter's device-side sums, the clock (elapsed seconds across resumes), the
    skipped steps so far, and the record that log.jsonl and the console get."""
    def __init__(self, C, D, model, G, grid, T, step, elapsed_s):
        self.C, self.D, self.model, self.G = C, D, model, G
        self.flops = train_flops(model, C, grid)  # training FLOPs per image at the latent side grid (MFU), levers in
        self.meter, self.skipped = Meter(C.device, T), 0
        self.elapsed0, self.t_start = elapsed_s, time.time()
        self.t_log, self.step_log = self.t_start, step

    def elapsed(self):
        return self.elapsed0 + time.time() - self.t_start

    def record(self, step, lr, horizon):
        """Read the meter (the host sync: the clock after it) and re-plan the horizon. -> (the record, the longest
        run of non-finite steps since the last read, whether the time budget is spent)"""
        C, D = self.C, self.D
        loss, gnorm, skipped, loss_by_t, worst, terms = self.meter.read(D.ddp, D.world)
        now = self.elapsed()
        time_up = horizon.plan(step, now)
        self.skipped += skipped
        dt = time.time() - self.t_log
        imgs = (step - self.step_log) * self.G / dt
        mfu = self.model.mfu(imgs / D.world, C.device, flops=self.flops)  # nan where the peak is unknown (CPU)
        eta_s = (horizon.steps - step) * dt / max(step - self.step_log, 1)
        if C.max_hours > 0:  # the horizon is planned from the second log step on: the budget bounds it before that
            eta_s = min(eta_s, max(0.0, C.max_hours * 3600 - now))
        rec = {"step": step, "loss": loss, **terms, "lr": lr, "grad_norm": gnorm, "images_per_s": imgs,
               "mfu": mfu if math.isfinite(mfu) else None, "skipped": self.skipped,
               "peak_mem_gb": torch.cuda.max_memory_allocated(C.device) / 2**30 if D.cuda else 0.0,
               "eta_h": eta_s / 3600, "elapsed_h": now / 3600, "loss_by_t": loss_by_t}
        return rec, worst, time_up

    def next_interval(self, step):
        """The next interval's clock starts after this log step's writes (as the images/s it reports)."""
        self.t_log, self.step_log = time.time(), step


def describe(C, model, latent_shape, tokens, images, G, world, loader=None):
    """The run in two lines (three with aspect buckets: each bucket's images), printed at its start."""
    c = model.config
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
    levers = "".join(text for weight, text in (  # the training levers on, beside the FLOPs they cost
        (C.cfm_weight, f", cfm {C.cfm_weight}"), (C.disp_weight, f", disp {C.disp_weight} on block {C.disp_block}"),
        (C.sra_weight, f", sra {C.sra_weight}: block {C.sra_block} -> EMA {C.sra_target_block}, gap {C.sra_gap}"))
        if weight > 0)
    return (f"model {C.model}: {params / 1e6:.1f}M params, depth {c.depth} width {c.width} heads {c.heads} patch "
            f"{c.patch}, {latent_shape} latents -> {tokens} tokens{routing}{fp8}, "
            f"{train_flops(model, C, latent_shape[1]) / 1e9:.1f} GFLOP/img (train{levers})\n"
            f"{images} images | micro-batch {C.batch} x accum {C.accum} x {world} ranks = {G} images/step | "
            f"{C.max_steps} steps max{budget} | device {C.device}" + (buckets(loader) if loader else ""))


def buckets(loader):
    """The line of a bucketed run: each bucket's size and images, and those too small for a global batch."""
    c = loader.cache
    if len(c.sizes) == 1:
        return ""
    merged = "".join(f"; {a} merged into {b}" for a, b in c.manifest.get("merged", {}).items())  # by data.py
    return ("\nbuckets: " + ", ".join(f"{W}x{H} ({len(m)})" for (W, H), m in zip(c.sizes, c.members)) + merged
            + (f"; left out, smaller than a global batch: {loader.left_out}" if loader.left_out else ""))


def guidance(C):
    """The guidance keys of the grids and evals -> generate()'s keywords (sample.py's flags of the same names)."""
    return dict(cfg_interval=parse_cfg_interval(C.sample_cfg_interval), apg=None if C.sample_apg < 0 else C.sample_apg,
                cfg_zero_star=C.sample_cfg_zero_star)


def console_line(rec):
    mfu = "-" if rec["mfu"] is None else f"{rec['mfu'] * 100:.1f}%"
    terms = "".join(f" | {k} {rec[k]:.4f}" for k in LEVER_TERMS if k in rec)  # the training levers' terms
    return (f"step {rec['step']} | loss {rec['loss']:.4f}{terms} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
            f"{rec['images_per_s']:.1f} img/s | mfu {mfu} | mem {rec['peak_mem_gb']:.1f} GB | "
            f"skipped {rec['skipped']} | eta {rec['eta_h']:.2f} h")

#################################################################################
#                  The EMA weights while training: preview, eval                 #
#################################################################################

def eval_kind(source_kind):
    """What the in-run eval scores: the built-in probe of shapes / scenes data, else the CLIP score."""
    if source_kind in ("scenes_wide", "scenes_wide2"):
        return "scenes_wide"  # sampled at its 2:1 and 1:2 buckets
    return source_kind if source_kind in ("shapes", "scenes") else "clip"


class Watcher:
    """The preview grids (out_dir/samples/NNNNNNN.png: image k is sample.py's `--seed k` image of prompt k, 25 steps
    of the checkpoint's default sampler) and the eval records (eval_every: 25 sampler steps at sample_cfg; the
    built-in probe for shapes / scenes data, one image per probe prompt, else the CLIP score of sample_prompts, 4
    seeds each, with the image tower of the open_clip model the text tower comes from: no second load). Both go
    through sample.py's Pipeline around the live EMA weights, made once. A failure (out of memory, a VAE that
    cannot be loaded offline, ...) is one warning and no more of that kind this run: training goes on."""
    def __init__(self, C, source_kind, ema, diffusion, text_encoder, ckpt_path):
        self.C, self.ema, self.diffusion, self.text_encoder, self.ckpt_path = C, ema, diffusion, text_encoder, ckpt_path
        self.sampling, self.evaluating = C.sample_every > 0, C.eval_every > 0
        self.kind = eval_kind(source_kind)
        self.pipe = self.clip = None

    def pipeline(self, step):
        if self.pipe is None:
            C = self.C
            self.pipe = Pipeline(self.ema, self.diffusion, load_vae(C.vae, device=C.device), self.text_encoder,
                                 dict(vars(C)), step, torch.device(C.device), self.ckpt_path)
        self.pipe.step = step
        return self.pipe

    def preview(self, step):
        C = self.C
        try:
            prompts = prompt_list(C.sample_prompts)
            images = generate(self.pipeline(step), prompts, list(range(len(prompts))), cfg=C.sample_cfg, steps=STEPS,
                              **guidance(C))
            save_png(make_grid(images, cols=math.ceil(math.sqrt(len(prompts)))),
                     os.path.join(C.out_dir, "samples", f"{step:07d}.png"))
        except Exception as e:
            print(f"warning: sample grid at step {step} failed ({type(e).__name__}: {str(e)[:200]}); no more sample "
                  "grids this run (training continues; sample.py works on the checkpoint)", file=sys.stderr)
            self.sampling = False

    def evaluate(self, step):
        """-> the eval record for log.jsonl, or None."""
        import evaluate  # only here: evaluate.py is a consumer of train.py's checkpoints, not a part of the loop
        t0, C = time.time(), self.C
        try:
            pipe = self.pipeline(step)
            if self.kind == "shapes":
                r = evaluate.probe_shapes(pipe, cfg=C.sample_cfg, n_per_prompt=1, steps=25, guidance=guidance(C))
                metrics = {"shape_acc": r["shape_acc"], "color_acc": r["color_acc"]}
            elif self.kind in ("scenes", "scenes_wide"):
                r = evaluate.probe_scenes(pipe, cfg=C.sample_cfg, n_per_prompt=1 + (self.kind == "scenes_wide"),
                                          steps=25, wide=self.kind == "scenes_wide", guidance=guidance(C))
                metrics = {"scenes_in": r["in_distribution"]["overall"], "scenes_held_out": r["held_out"]["overall"]}
            else:
                if self.clip is None:
                    if C.text_encoder == "tiny":  # its image tower is random: a score of it says nothing
                        raise ValueError("the tiny text tower has no trained image tower to score with")
                    self.clip = ClipScorer.load(C.text_encoder, device=C.device, text_encoder=self.text_encoder)
                prompts = prompt_list(C.sample_prompts) * 4
                images = generate(pipe, prompts, list(range(len(prompts))), cfg=C.sample_cfg, steps=25,
                                  **guidance(C))
                metrics = {"clip_score": float(self.clip(images, prompts).mean())}
        except Exception as e:
            print(f"warning: eval at step {step} failed ({type(e).__name__}: {str(e)[:200]}); no more evals this "
                  "run (training continues; evaluate.py works on the checkpoint)", file=sys.stderr)
            self.evaluating = False
            return None
        return {"event": "eval", "step": step, **metrics, "eval_s": time.time() - t0}

#################################################################################
#                 log.jsonl, its mirrors, and curves.png                         #
#################################################################################

class RunLog:
    """out_dir/log.jsonl (the environment record, then one record per log step), its mirrors in TensorBoard and
    W&B when asked for, and out_dir/curves.png redrawn at every checkpoint."""
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
                plot_curves({"run": self.file.name}, os.path.join(self.dir, "curves.png"))
            except Exception as e:
                print(f"warning: curves.png not drawn ({type(e).__name__}: {e}); no more tries this run")
                self.draw = False

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_log(path):
    """log.jsonl -> (step records, eval records), each in step order. A run resumed from an earlier checkpoint
    logs some steps again: the later records replace those of the steps they repeat (what the weights went on from).
    Environment records ("event": "start") and lines that do not parse (a write cut short by a kill) are skipped."""
    steps, evals = [], []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "step" not in rec or rec.get("event") == "start":
                continue
            series = evals if rec.get("event") == "eval" else steps
            while series and series[-1]["step"] >= rec["step"]:  # a restart from an earlier step
                series.pop()
            series.append(rec)
    return steps, evals


def _numeric(records, key):
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p for p in pts if math.isfinite(p[1])]


def plot_curves(runs, path):
    """runs: {label: log.jsonl path}; writes the PNG to `path` (atomically). Panels: loss, loss by timestep bin, LR,
    grad norm, images/s, and the eval records' metrics when the runs have them."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    logs = {label: read_log(p) for label, p in runs.items()}
    eval_keys = sorted({k for _, evals in logs.values() for r in evals for k, v in r.items()
                        if k not in ("step", "event") and isinstance(v, (int, float))})
    terms = [k for k in LEVER_TERMS if any(_numeric(steps, k) for steps, _ in logs.values())]  # the levers' terms
    panels = ["loss", *terms, "loss_by_t", "lr", "grad_norm", "images_per_s"] + eval_keys
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for label, (steps, evals) in logs.items():
            if key == "loss_by_t":  # the latest record's loss per timestep bin (noisier to the right)
                last = next((r["loss_by_t"] for r in reversed(steps) if r.get("loss_by_t")), None)
                if last:
                    ax.plot([(i + 0.5) / len(last) for i in range(len(last))], last, marker="o", label=label)
                continue
            pts = _numeric(evals if key in eval_keys else steps, key)
            if pts:
                ax.plot(*zip(*pts), marker="o" if key in eval_keys else None, label=label)
        ax.set_title(key if key != "loss_by_t" else "loss by timestep (last log step)")
        ax.set_xlabel("t / T" if key == "loss_by_t" else "step")
        if key in ("loss", "grad_norm") and any(_numeric(s, key) for s, _ in logs.values()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(logs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="monitor.py", description="A run's curves from its log.jsonl, as one PNG.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("runs", nargs="+", help="run folders (out_dir) or log.jsonl files")
    p.add_argument("--out", default="", help="PNG path (default: RUN/curves.png for one run)")
    args = p.parse_args(argv)
    runs = {}
    for r in args.runs:
        log = os.path.join(r, "log.jsonl") if os.path.isdir(r) else r
        if not os.path.isfile(log):
            p.error(f"{r}: no log.jsonl")
        runs[os.path.basename(os.path.dirname(os.path.abspath(log)))] = log
    if not args.out and len(runs) > 1:
        p.error("several runs: say where the PNG goes (--out)")
    out = args.out or os.path.join(os.path.dirname(next(iter(runs.values()))), "curves.png")
    print(f"wrote {plot_curves(runs, out)}")


if __name__ == "__main__":
    sys.exit(main())
