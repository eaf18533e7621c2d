"""
A run's curves from its log.jsonl, as one PNG: loss, loss by timestep bin, LR, grad norm, images/s, and the eval
records' metrics when the run has them.

    python curves.py out/shapes                 # -> out/shapes/curves.png
    python curves.py out/a out/b --out ab.png   # several runs on the same axes

train.py writes out_dir/curves.png with plot_curves at every checkpoint. matplotlib is imported here only.
"""
import argparse
import json
import math
import os
import sys


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
    """runs: {label: log.jsonl path}; writes the PNG to `path` (a temporary file, then renamed)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    logs = {label: read_log(p) for label, p in runs.items()}
    eval_keys = sorted({k for _, evals in logs.values() for r in evals for k, v in r.items()
                        if k not in ("step", "event") and isinstance(v, (int, float))})
    panels = ["loss", "loss_by_t", "lr", "grad_norm", "images_per_s"] + eval_keys
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
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
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
