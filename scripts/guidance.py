"""
Guidance at sampling, measured: one checkpoint, one probe, every (method, CFG scale, steps) cell over sampling
seeds, as mean +- standard error. The training side of a question is scripts/ablate.py's; this is its sampling side.

    python scripts/guidance.py --ckpt out/shapes/ckpt.pt --probe shapes --cfg 3,5,7.5 --steps 10,25,50 --seeds 0,1

Methods (sample.py's flags): cfg (plain), interval (--cfg_interval LO,HI), apg (--apg ETA, the paper's r and beta),
zero_star (--cfg_zero_star true; flow checkpoints only). Seed s samples probe image k from seed s x 10^6 + k, so the
seeds draw disjoint noise, and every cell of one seed the same noise: cells are paired, and the +- of one cell
overstates the error of a difference between two. OUT/guidance.md (the table, this command at its top) and
OUT/guidance.json (every cell) are written at the end.
"""
import argparse, json, math, os, shlex, sys, time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate
from checkpoint import CheckpointError, atomic_write, write_json
from diffusion import check_guidance
from sample import interval_arg, load_pipeline

SEED_STRIDE = 10 ** 6
# the probe -> its metrics (a dotted key into probe_shapes' / probe_scenes' record)
METRICS = {"shapes": ("shape_acc", "color_acc"), "scenes": ("in_distribution.overall", "held_out.overall"),
           "scenes_wide": ("in_distribution.overall", "held_out.overall"),
           "scenes_wide_long": ("in_distribution.overall", "held_out.overall")}


def methods(args):
    """name -> generate()'s guidance keywords."""
    out = {"cfg": {}, "interval": dict(cfg_interval=args.interval), "apg": dict(apg=args.apg),
           "zero_star": dict(cfg_zero_star=True)}
    return {name: kw for name, kw in out.items() if name in args.methods}


def probe(pipe, args, cfg, steps, seed, guidance):
    """One cell: the probe's record at one setting."""
    if args.probe == "shapes":
        return evaluate.probe_shapes(pipe, cfg=cfg, n_per_prompt=args.probe_n, steps=steps, seed=seed,
                                     batch_size=args.batch, guidance=guidance)
    return evaluate.probe_scenes(pipe, cfg=cfg, n_per_prompt=args.probe_n, steps=steps, seed=seed,
                                 batch_size=args.batch, guidance=guidance, **evaluate.SCENE_PROBES[args.probe])


def read(record, key):
    for part in key.split("."):
        record = record[part]
    return record


def mean_se(values):
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def table(cells, cfgs, metric):
    """Rows (method, steps), a column per CFG scale: mean +- se of `metric` over the seeds."""
    lines = [f"| method | steps | {' | '.join(f'CFG {c:g}' for c in cfgs)} |", "|---|---|" + "---|" * len(cfgs)]
    for (name, steps) in dict.fromkeys((c["method"], c["steps"]) for c in cells):
        row = []
        for cfg in cfgs:
            m, se = mean_se([c[metric] for c in cells if (c["method"], c["steps"], c["cfg"]) == (name, steps, cfg)])
            row.append(f"{m:.3f} ± {se:.3f}")
        lines.append(f"| {name} | {steps} | {' | '.join(row)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--probe", default="shapes", choices=sorted(METRICS))
    p.add_argument("--cfg", default="3,5,7.5", help="CFG scales, comma separated (> 1: at 1 every method is one)")
    p.add_argument("--steps", default="10,25,50", help="sampler steps, comma separated")
    p.add_argument("--seeds", default="0,1", help="sampling seeds, comma separated (>= 2 for an error)")
    p.add_argument("--methods", default="cfg,interval,apg,zero_star")
    p.add_argument("--interval", type=interval_arg, default=(0.2, 0.85), metavar="LO,HI",
                   help="the interval method's LO,HI in s (sigma for flow, t / T otherwise; default: the paper's EDM2 "
                   "sigma range (0.28, 5.42] as flow s = sigma / (1 + sigma): give another for eps / v / x0)")
    p.add_argument("--apg", type=float, default=0.0, metavar="ETA", help="the apg method's eta (the paper's 0)")
    p.add_argument("--probe_n", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="output folder (default: guidance/ beside the checkpoint)")
    args = p.parse_args(argv)
    try:
        cfgs = [float(c) for c in args.cfg.split(",")]
        steps = [int(s) for s in args.steps.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        p.error(f"--cfg, --steps and --seeds are comma-separated numbers: {e}")
    args.methods = args.methods.split(",")
    if min(cfgs) <= 1 or min(steps) < 2 or set(args.methods) - {"cfg", "interval", "apg", "zero_star"}:
        p.error("--cfg > 1, --steps >= 2, --methods of cfg, interval, apg, zero_star")
    if any(len(set(v)) < len(v) for v in (cfgs, steps, seeds, args.methods)):
        p.error("--cfg, --steps, --seeds and --methods each list a value once (a repeat would pool a cell twice)")
    chosen = methods(args)
    def check(diffusion=None):  # each method's settings: before the checkpoint loads, then with its kind
        for guidance in chosen.values():
            check_guidance(**guidance, prediction=diffusion and diffusion.prediction)
    try:
        check()
        pipe = load_pipeline(args.ckpt, args.device, check=check)
    except (ValueError, CheckpointError) as e:
        p.error(str(e))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "guidance")
    cells, start = [], time.time()
    for name, guidance in chosen.items():
        for n in steps:
            for cfg in cfgs:
                for seed in seeds:
                    record = probe(pipe, args, cfg, n, seed * SEED_STRIDE, guidance)
                    cells.append(dict(method=name, steps=n, cfg=cfg, seed=seed, guidance=guidance,
                                      **{m: read(record, m) for m in METRICS[args.probe]}))
                print(f"{name} steps {n} cfg {cfg:g}: " + ", ".join(
                    f"{m} {mean_se([c[m] for c in cells[-len(seeds):]])[0]:.3f}" for m in METRICS[args.probe]),
                    flush=True)
    command = "python scripts/guidance.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    md = [f"# Guidance: {args.probe} probe\n", "```bash", command, "```\n",
          f"Checkpoint {args.ckpt} ({pipe.diffusion.prediction}); methods {json.dumps(chosen)}; {len(seeds)} "
          f"sampling seeds, probe_n {args.probe_n}; mean ± standard error over the seeds (nan: one seed; cells "
          "are paired: each seed draws the same noise in every cell); "
          f"{(time.time() - start) / 60:.1f} min on {args.device}.\n"]
    for metric in METRICS[args.probe]:
        md += [f"{metric}:\n", table(cells, cfgs, metric), ""]
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "guidance.json"), dict(command=command, cells=cells))
    atomic_write(os.path.join(out, "guidance.md"), lambda f: f.write("\n".join(md).encode()))
    print("\n".join(md[4:]) + f"\nwrote {out}/guidance.md and guidance.json")
    return cells


if __name__ == "__main__":
    main()
