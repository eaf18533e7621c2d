"""
Ablations at an equal budget: train.py once per row and seed, evaluate.py's probe on each checkpoint, one table.

    python scripts/ablate.py rows.txt --base configs/shapes.py --flops 3e15 --seeds 0,1     # equal training FLOPs
    python scripts/ablate.py --base configs/shapes.py --steps 600 --row "base:" --row "zero: --adaln zero"
    python scripts/ablate.py rows.txt --base configs/shapes.py --hours 0.05 --cfg 3,5 --out out/abl-time
    python scripts/ablate.py rows.txt --base configs/shapes.py --flops 3e15 --dry_run       # the plan, no runs

A row is `name: --key value --key value ...` (train.py keys; one per line in a rows file, `#` comments), trained
as `train.py BASE ROW --seed S --out_dir OUT/name-sS` plus the budget:
  --flops F   equal training FLOPs: max_steps = round(F / (FLOPs per image x batch x accum)) per row, FLOPs per
              image from model.py's train_flops() for the row's model and levers, built as train.py builds it
  --steps N   equal optimizer steps (--max_steps N)
  --hours H   equal wall-clock (--max_hours H; the LR decay is planned to end on time)
then probed: `evaluate.py --ckpt OUT/name-sS/ckpt.pt --probe P --cfg C --probe_n N --steps K --out .../eval.json`.
OUT/ablation.md (the table, this command at its top) and OUT/ablation.json (every run's raw numbers) are
rewritten after each run. Rerunning the same command resumes: runs whose eval.json exists are skipped, a run
stopped mid-training continues from its checkpoint; nothing is ever deleted, and a run folder made with other
arguments is an error, not a silent mix.
"""
import argparse, dataclasses, datetime, functools, json, math, os, re, shlex, signal, subprocess, sys, time
import warnings
from types import SimpleNamespace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config
import data as datalib
import train
from checkpoint import atomic_write, write_json
from encoders import load_text_encoder
from model import DiT, config_from_keys, train_flops
from optim import fit_warmup

TRAIN, EVALUATE = os.path.join(ROOT, "train.py"), os.path.join(ROOT, "evaluate.py")
# evaluate.py --probe NAME -> (its section in eval.json, the default --metric). Each section is a list of records,
# one per CFG scale (and --probe_from start), or one record; a metric is a key of a record, dotted for nested
# values (held_out.counting). A new probe is one line here.
PROBES = {
    "shapes": ("probe_shapes", "shape_acc,color_acc"),  # evaluate.run_probe: {cfg, t_start, n, *_acc}
    # evaluate.run_scenes_probe: {cfg, truth, resolution, in_distribution: {<category>: acc (None where the set
    # has none), overall, n, ...}, held_out: {...}}: a category is e.g. held_out.counting
    "scenes": ("probe_scenes", "in_distribution.overall,held_out.overall"),
    "scenes_wide": ("probe_scenes_wide", "in_distribution.overall,held_out.overall"),  # at the 2:1 and 1:2 buckets
    "scenes_wide_long": ("probe_scenes_wide_long", "in_distribution.overall,held_out.overall"),  # long prompts
}
ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*$")  # it names a folder
TOOL_KEYS = ("out_dir", "seed", "resume")  # set per run by this tool
BUDGET_KEYS = ("max_steps", "max_hours")   # set per row by the budget: a row setting them would break the equality


class ToolError(Exception):
    """Bad input, found before any run starts: one line, exit 2."""

#################################################################################
#                              Rows and the plan                                #
#################################################################################

def strip_comment(line):
    """The line up to an unquoted `#` at the start of a word (a '#' inside a value such as x#1 stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def parse_row(text, where):
    """'name: --key value ...' -> (name, argv)."""
    name, colon, rest = strip_comment(text).partition(":")
    name = name.strip()
    if not colon or not ROW_NAME.match(name):
        raise ToolError(f"{where}: expected `name: --key value ...` (name: letters, digits, _.+=-), got {text!r}")
    try:
        argv = shlex.split(rest)
    except ValueError as e:
        raise ToolError(f"{where} (row {name}): {e}") from None
    if argv and not argv[0].startswith("--"):
        raise ToolError(f"row {name}: rows take --key value only (a config file goes in --base), got {argv[0]!r}")
    for key in cli_keys(argv):
        if key in TOOL_KEYS + BUDGET_KEYS:
            raise ToolError(f"row {name}: --{key} is set by this tool (per run, or by the budget)")
    return name, argv


def read_rows(files, inline):
    rows = []
    for path in files:
        try:
            lines = open(path).read().splitlines()
        except OSError as e:
            raise ToolError(f"rows file {path}: {e}") from None
        rows += [parse_row(line, f"{path}:{n}") for n, line in enumerate(lines, 1)
                 if strip_comment(line).strip()]
    rows += [parse_row(text, "--row") for text in inline]
    if not rows:
        raise ToolError("no rows: give a rows file and/or --row 'name: --key value ...'")
    names = [name for name, _ in rows]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ToolError(f"row names must be unique: {', '.join(dup)}")
    return rows


def cli_keys(argv):
    return [a[2:].partition("=")[0] for a in argv if a.startswith("--")]


def budget_args(args, max_steps=None):
    """train.py arguments that set a row's budget (the last ones given win in config.parse_args)."""
    if args.hours is not None:
        return ["--max_hours", repr(args.hours)]
    return ["--max_steps", str(max_steps if args.flops is not None else args.steps), "--max_hours", "0"]


def plan_row(name, row_argv, base, args):
    """Check a row as train.py will (ConfigError -> ToolError, before anything runs) -> its plan."""
    argv = base + row_argv
    try:
        keys = config.parse_args(argv + budget_args(args, 1), train.DEFAULTS)
        config.check(SimpleNamespace(**keys))
    except config.ConfigError as e:
        raise ToolError(f"row {name}: {e}") from None
    fpi, routed, unrouted = flops_per_image(keys, name)
    per_step = keys["batch"] * keys["accum"]  # one process: world size 1
    max_steps = None
    if args.flops is not None:
        max_steps = round(args.flops / (fpi * per_step))
        if max_steps < 1:
            raise ToolError(f"row {name}: --flops {args.flops:g} is less than half of one optimizer step "
                            f"({fpi * per_step:.3g} FLOPs)")
    elif args.steps is not None:
        max_steps = args.steps
    if max_steps is not None:
        note = fit_warmup(SimpleNamespace(**{**keys, "max_steps": max_steps, "max_hours": 0}), train.DEFAULTS["warmup"])
        if note:  # train.py prints it into the run's log only
            print(f"row {name}: {note}", file=sys.stderr)
    return dict(name=name, args=row_argv, train_argv=argv + budget_args(args, max_steps), flops_per_image=fpi,
                routed_flops_per_image=routed, unrouted_flops_per_image=unrouted, images_per_step=per_step,
                max_steps=max_steps, config=keys)

#################################################################################
#                     FLOPs per training image, as train.py has them            #
#################################################################################

@functools.lru_cache(maxsize=None)
def text_dims(name):
    """(per-token dim, pooled dim) of encoders.load_text_encoder(name): open_clip's config where there is one (no
    weights loaded), else the tower itself ('tiny' is small and random; CLIP ViT-L/14 is 768, 768)."""
    import open_clip
    if name != "tiny":
        try:
            if os.path.isdir(name):
                cfg = json.load(open(os.path.join(name, "open_clip_config.json")))["model_cfg"]
            else:  # a bare checkpoint file is a ViT-L-14 (encoders.open_clip_model)
                cfg = open_clip.get_model_config("ViT-L-14" if os.path.isfile(name) else name.partition("/")[0])
            width, embed = cfg["text_cfg"]["width"], cfg["embed_dim"]
            if width and embed:
                return int(width), int(embed)
        except (OSError, KeyError, TypeError, ValueError):
            pass
    te = load_text_encoder(name)
    return te.dim, te.pooled_dim


def vae_geometry(name):
    """(latent channels, downsampling factor) of encoders.load_vae(name), from its config.json (no weights), else the
    SD VAE's (4, 8); 'none' is pixel space (3, 1)."""
    if name == "none":
        return 3, 1
    cfg = None
    for path in (os.path.join(name, "config.json"), os.path.join(name, "vae", "config.json")):
        if os.path.isfile(path):
            cfg = json.load(open(path))
            break
    if cfg is None:
        try:
            from diffusers import AutoencoderKL
            with warnings.catch_warnings():  # huggingface_hub's deprecation notices, not ours
                warnings.simplefilter("ignore")
                cfg = AutoencoderKL.load_config(name, local_files_only=True)
        except Exception:  # not in the Hugging Face cache (offline): the SD VAE family
            return 4, 8
    return int(cfg.get("latent_channels", 4)), 2 ** (len(cfg.get("block_out_channels", [0] * 4)) - 1)


def flops_per_image(keys, name="?"):
    """model.py's train_flops() for the model train.py would build from `keys` (train.build_model): latent
    shape and text widths from the cache's manifest when --data is a cache, else from the VAE and text encoder.
    -> (the run's mean per image, a routed step's (what train.py prints), an unrouted step's); all three are equal
    without routing, and route_until < 1 mixes the last two as train.routed_tokens splits the steps."""
    C = SimpleNamespace(**keys)
    try:
        manifest = datalib.LatentCache(C.data).manifest if datalib.source_kind(C.data) == "cache" else None
    except datalib.DataError:  # data that is not there yet: train.py will say so; the shape comes from the VAE
        manifest = None
    if manifest:
        (channels, side, _), text_dim = manifest["latent_shape"], manifest["text_dim"]
        pooled_dim = manifest["pooled_dim"]
    else:
        (channels, factor), (text_dim, pooled_dim) = vae_geometry(C.vae), text_dims(C.text_encoder)
        side = C.resolution // factor
    mcfg = config_from_keys(C, in_channels=channels, input_size=side, text_dim=text_dim, pooled_dim=pooled_dim)
    if side % mcfg.patch:
        raise ToolError(f"row {name}: {side} x {side} latents are not divisible by patch {mcfg.patch}")
    with torch.device("meta"):  # no memory, whatever the size: train_flops reads the config only (levers included)
        routed, unrouted = (train_flops(DiT(m), C) for m in (mcfg, dataclasses.replace(mcfg, route_frac=0.0)))
    # an unrouted finish (route_until < 1): the run's mean, as train.routed_tokens splits its steps
    until = C.route_until if mcfg.route_frac > 0 else 1.0
    return until * routed + (1 - until) * unrouted, routed, unrouted


def spent_flops(plan, steps, world=1):
    """Training FLOPs of the first `steps` optimizer steps of a planned run: train.routed_tokens decides which steps
    were routed (at the routed model's FLOPs per image) and which were not."""
    C = SimpleNamespace(**plan["config"])
    horizon = plan["max_steps"] or steps  # (a time budget: train.py refuses route_until < 1 there)
    routed = sum(1 for s in range(steps) if train.routed_tokens(s, horizon, 1, C))
    per_image = routed * plan["routed_flops_per_image"] + (steps - routed) * plan["unrouted_flops_per_image"]
    return per_image * plan["images_per_step"] * world

#################################################################################
#                            Running (and resuming)                             #
#################################################################################

def run_dir(args, name, seed):
    return os.path.join(args.out, f"{name}-s{seed}")


def eval_argv(args, run, keys):
    d = run["dir"]
    argv = ["--ckpt", os.path.join(d, "ckpt.pt"), "--probe", args.probe, "--cfg", args.cfg, "--probe_n",
            str(args.probe_n), "--steps", str(args.eval_steps), "--out", os.path.join(d, "eval.json")]
    extra = shlex.split(args.eval_args)
    if keys["device"] != "auto" and "device" not in cli_keys(extra):  # sample where the row trained
        argv += ["--device", keys["device"]]
    return argv + extra


def make_runs(args, plans, seeds):
    """Seed-major (every row at seed 0, then at seed 1, ...): a stopped ablation has compared all rows once."""
    runs = []
    for seed in seeds:
        for p in plans:
            run = dict(row=p["name"], seed=seed, dir=run_dir(args, p["name"], seed), max_steps=p["max_steps"],
                       max_hours=args.hours)
            run["train_argv"] = p["train_argv"] + ["--seed", str(seed), "--out_dir", run["dir"]]
            run["eval_argv"] = eval_argv(args, run, p["config"]) if args.probe != "none" else None
            runs.append(run)
    return runs


def read_status(run):
    path = os.path.join(run["dir"], "run.json")
    return json.load(open(path)) if os.path.isfile(path) else {}


def write_status(run, status):
    os.makedirs(run["dir"], exist_ok=True)
    write_json(os.path.join(run["dir"], "run.json"), status)


def check_resumable(runs):
    """A folder made by other arguments is an error before anything runs: resuming it would mix two recipes."""
    for run in runs:
        old = read_status(run)
        for key in ("train_argv", "eval_argv"):
            if old.get(key) is not None and old[key] != run[key]:  # a train-only run (--probe none) may be probed
                raise ToolError(f"{run['dir']} was made with other {key.split('_')[0]} arguments:\n  then: "
                                f"{shlex.join(old[key] or [])}\n  now:  {shlex.join(run[key] or [])}\n"
                                "use another --out (or another row name)")


def launch(cmd, log_path):
    """Run cmd, its output appended to log_path (never truncated: a resumed run keeps its history) -> (rc, s)."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = p.wait()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: train.py checkpoints on SIGINT and exits; wait for that
            p.send_signal(signal.SIGINT)
            p.wait()
            raise
    return rc, time.time() - t0


def last_line(path):
    lines = [line.strip() for line in open(path, errors="replace").read().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(empty log)"


def execute(run, args, i, total):
    """Train (unless done), then probe (unless done). -> its status, saved in run.json after each phase."""
    status = read_status(run)
    status.update(row=run["row"], seed=run["seed"], train_argv=run["train_argv"], eval_argv=run["eval_argv"])
    tag = f"[{i}/{total}] {run['dir']}"
    if finished(run, status):
        print(f"{tag}: done earlier, skipped")
        return status
    os.makedirs(run["dir"], exist_ok=True)
    status.pop("error", None)
    if not status.get("train", {}).get("complete") or not os.path.isfile(os.path.join(run["dir"], "ckpt.pt")):
        log = os.path.join(run["dir"], "train.log")
        print(f"{tag}: train.py {shlex.join(run['train_argv'])}\n    log: {log}", flush=True)
        write_status(run, status)  # the arguments first: a crash mid-run still resumes only the same run
        rc, secs = launch([sys.executable, TRAIN, *run["train_argv"]], log)
        stopped = None if rc else stopped_early(run)
        status["train"] = dict(rc=rc, complete=not (rc or stopped),
                               process_s=secs + status.get("train", {}).get("process_s", 0.0))
        if rc or stopped:
            status["error"] = f"{f'train.py exit {rc}: ' + last_line(log) if rc else stopped} (log: {log})"
    if "error" not in status and run["eval_argv"] is not None:
        log = os.path.join(run["dir"], "eval.log")
        print(f"{tag}: evaluate.py {shlex.join(run['eval_argv'])}", flush=True)
        rc, secs = launch([sys.executable, EVALUATE, *run["eval_argv"]], log)
        status["eval"] = dict(rc=rc, process_s=secs)
        if rc:
            status["error"] = f"evaluate.py exit {rc}: {last_line(log)} (log: {log})"
    print(f"{tag}: {'FAILED: ' + status['error'] if 'error' in status else 'done'}", flush=True)
    write_status(run, status)
    return status


def stopped_early(run):
    """train.py stopped by a signal exits 0 with a checkpoint short of its budget -> why, or None when complete."""
    last, _ = read_train_log(run["dir"])
    if last is None:
        return "train.py stopped before its first log step (a signal?): rerun to continue"
    if run["max_steps"] is not None:
        done = last["step"] >= run["max_steps"]
    else:  # --hours: the planned horizon reached (eta 0), or the time spent
        done = last["eta_h"] == 0 or last["elapsed_h"] >= run["max_hours"] * (1 - 1e-9)
    return None if done else (f"train.py stopped short of its budget (last logged step {last['step']}; a signal?): "
                              "rerun to continue")


def finished(run, status):
    if run["eval_argv"] is None:
        return bool(status.get("train", {}).get("complete"))
    return os.path.isfile(os.path.join(run["dir"], "eval.json"))

#################################################################################
#                          Reading a run's numbers                              #
#################################################################################

def read_train_log(run_dir_):
    """out_dir/log.jsonl -> (last step record, last start record): steps, training seconds, images/s, ranks."""
    path = os.path.join(run_dir_, "log.jsonl")
    if not os.path.isfile(path):
        return None, None
    records = [json.loads(line) for line in open(path) if line.strip()]
    starts = [r for r in records if r.get("event") == "start"]
    steps = [r for r in records if "event" not in r and "step" in r]
    return (steps[-1] if steps else None), (starts[-1] if starts else None)


def printed_gflops(run_dir_):
    """The last 'N GFLOP/img (train)' train.py printed into train.log (a check of this tool's FLOP count)."""
    try:
        found = re.findall(r"([\d.]+) GFLOP/img \(train\)", open(os.path.join(run_dir_, "train.log")).read())
    except OSError:
        return None
    return float(found[-1]) if found else None


def lookup(record, path):
    """record's value at a dotted path, else the one value whose dotted path ends with it -> (value, error)."""
    leaves = dict(flatten(record))
    if path in leaves:
        return leaves[path], None
    hits = [k for k in leaves if k.endswith("." + path)]
    if len(hits) == 1:
        return leaves[hits[0]], None
    numeric = ", ".join(k for k, v in leaves.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return None, f"metric {path!r} {'is ambiguous' if hits else 'not found'} (numbers there: {numeric})"


def flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], obj


def metric_values(report, columns, probe):
    """eval.json -> ({column label: value}, error). Records started from a noised render (--probe_from) are left
    out: the table compares samples from pure noise."""
    out = {}
    for col in columns:
        section, _, key = col["metric"].rpartition(":")
        section = section or PROBES[probe][0]
        if section not in report:
            return out, f"eval.json has no {section!r} (it has: {', '.join(report)})"
        records = report[section] if isinstance(report[section], list) else [report[section]]
        records = [r for r in records if isinstance(r, dict) and r.get("t_start") is None]
        if any(r.get("cfg") is not None for r in records):
            records = [r for r in records if r.get("cfg") is not None and math.isclose(r["cfg"], col["cfg"])]
        if len(records) != 1:
            return out, f"{len(records)} records in {section!r} for {col['label']}, expected 1"
        value, error = lookup(records[0], key)
        if error:
            return out, error
        out[col["label"]] = value
    return out, None


def collect(run, status, plan, columns, probe):
    """One run's numbers: optimizer steps, images seen, training FLOPs, wall-clock, img/s, the metrics."""
    rec = dict(row=run["row"], seed=run["seed"], dir=run["dir"], status="done", error=status.get("error"),
               train_cmd="python train.py " + shlex.join(run["train_argv"]),
               eval_cmd=None if run["eval_argv"] is None else "python evaluate.py " + shlex.join(run["eval_argv"]),
               train_process_s=status.get("train", {}).get("process_s"),
               eval_process_s=status.get("eval", {}).get("process_s"), metrics={},
               log=os.path.join(run["dir"], "train.log"))
    last, start = read_train_log(run["dir"])
    if last is not None:
        world = (start or {}).get("world_size", 1)
        images = last["step"] * plan["images_per_step"] * world
        rec.update(steps=last["step"], images=images, flops=spent_flops(plan, last["step"], world),
                   wall_min=last["elapsed_h"] * 60, images_per_s=images / max(last["elapsed_h"] * 3600, 1e-9),
                   git_commit=(start or {}).get("git_commit"), git_dirty=(start or {}).get("git_dirty"))
    shown = printed_gflops(run["dir"])
    planned = plan["routed_flops_per_image"]  # train.py prints a routed step's cost
    if shown is not None and abs(shown - round(planned / 1e9, 1)) > 0.051:
        rec["note"] = f"train.py printed {shown} GFLOP/img, this tool planned {planned / 1e9:.2f}"
    if rec["error"] is not None:
        rec["status"] = "failed"
    elif not finished(run, status):  # not reached yet, or stopped (Ctrl-C) before its probe
        rec["status"] = "not finished" if os.path.isfile(os.path.join(run["dir"], "ckpt.pt")) else "not run"
    else:
        if run["eval_argv"] is not None:
            rec["error"] = read_metrics(run, rec, columns, probe)
        if rec["error"] is None and last is None:
            rec["error"] = f"no step record in {os.path.join(run['dir'], 'log.jsonl')}"
        rec["status"] = "done" if rec["error"] is None else "failed"
    return rec


def read_metrics(run, rec, columns, probe):
    path = os.path.join(run["dir"], "eval.json")
    try:
        report = json.load(open(path))
    except (OSError, ValueError) as e:  # an interrupted evaluate.py can leave its reserved, empty file
        return f"{path} unreadable ({type(e).__name__}): move it away and rerun to probe again"
    rec["eval_json"] = path
    rec["metrics"], error = metric_values(report, columns, probe)
    return None if error is None else f"{error} ({path})"

#################################################################################
#                                  The table                                    #
#################################################################################

def summarize(values):
    """mean and standard error of the mean (sample std, n - 1, / sqrt(n); None for one seed). None values (a
    category the probe had no prompt of) are left out."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return dict(mean=None, stderr=None, n=0, values=[])
    stderr = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return dict(mean=float(v.mean()), stderr=stderr, n=len(v), values=v.tolist())


def sci(x):
    mantissa, exp = f"{x:.3e}".split("e")
    return f"{float(mantissa):.3g}e{int(exp)}"


def show_args(argv):
    return f"`{shlex.join(argv)}`" if argv else "(base)"


def spread(values, fmt):
    """'673', or '640-673' where seeds differ (--hours)."""
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def row_summary(plan, recs, columns):
    ok = [r for r in recs if r["status"] == "done"]
    summary = {c["label"]: summarize([r["metrics"][c["label"]] for r in ok]) for c in columns}
    totals = {k: summarize([r[k] for r in ok]) for k in ("steps", "images", "flops", "wall_min", "images_per_s")}
    return dict(name=plan["name"], args=plan["args"], train_argv=plan["train_argv"],
                flops_per_image=plan["flops_per_image"], images_per_step=plan["images_per_step"],
                max_steps=plan["max_steps"], seeds_done=len(ok), seeds=len(recs), summary=summary, totals=totals,
                runs=recs)


def table_line(row, columns):
    ok = [r for r in row["runs"] if r["status"] == "done"]
    cells = [row["name"], show_args(row["args"])]
    for c in columns:
        s = row["summary"][c["label"]]
        mean = "-" if not s["n"] else f"{s['mean']:.3f}" + (f" ± {s['stderr']:.3f}" if s["n"] > 1 else "")
        cells.append(mean if ok else "failed" if any(r["status"] == "failed" for r in row["runs"]) else "-")
    cells.append(f"{len(ok)}" if len(ok) == len(row["runs"]) else f"{len(ok)} of {len(row['runs'])}")
    t, commas = row["totals"], lambda x: f"{x:,}"
    cells += ["-"] * 5 if not ok else [spread([r["steps"] for r in ok], commas), spread([r["images"] for r in ok],
              commas), sci(t["flops"]["mean"]), f"{t['wall_min']['mean']:.2f}", f"{t['images_per_s']['mean']:.1f}"]
    cells.append("; ".join(run_notes(row["runs"])))
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def run_notes(runs):
    """'seeds 0, 1 failed: <error> (log: OUT/row-s*/train.log)': seeds that failed alike share a note."""
    notes = {}
    for r in runs:
        if r["status"] != "done":
            text = r["status"] + (f": {r['error'].replace(r['dir'], r['dir'][:-len(str(r['seed']))] + '*')}"
                                  if r["error"] else "")
            notes.setdefault(text, []).append(str(r["seed"]))
    out = [f"seed{'s' * (len(seeds) > 1)} {', '.join(seeds)} {text}" for text, seeds in notes.items()]
    return out + [f"seed {r['seed']}: {r['note']}" for r in runs if r.get("note")]


def markdown(report, columns):
    budget, ev = report["budget"], report["eval"]
    what = {"flops": f"equal training FLOPs, {sci(budget['value'])} per run (max_steps per row)",
            "steps": f"equal optimizer steps, {budget['value']:,}",
            "hours": f"equal wall-clock, {budget['value']:g} h of training (train.py --max_hours)"}[budget["mode"]]
    probe = ("none (--probe none)" if ev is None else
             f"`python evaluate.py --probe {ev['probe']} --cfg {ev['cfg']} --probe_n {ev['probe_n']} --steps "
             f"{ev['steps']}{' ' + ev['extra'] if ev['extra'] else ''}`; each metric: mean ± standard error over "
             "seeds (sample std / sqrt(n))")
    lines = ["# Ablation", "", "```bash", report["command"], "```", "",
             f"Budget: {what}. Base: `{shlex.join(report['base']) or '(train.py defaults)'}`. "
             f"Seeds: {', '.join(map(str, report['seeds']))}. Date: {report['date']}.", "",
             f"Probe: {probe}. Each run is `train.py BASE ARGS BUDGET --seed S --out_dir {report['out']}/ROW-sS`, "
             "then the probe on its ckpt.pt (every command: ablation.json). Images = batch x accum x ranks x steps; "
             "FLOPs = model.py's training FLOPs per image x images; wall-clock and img/s: the training loop's time "
             "(log.jsonl elapsed_h).", "",
             "| row | args | " + "".join(c["label"] + " | " for c in columns)
             + "seeds | steps | images | train FLOPs | wall min | img/s | notes |",
             "|" + "---|" * (len(columns) + 9)]
    lines += [table_line(row, columns) for row in report["rows"]]
    return "\n".join(lines) + "\n"


def write_outputs(args, report, columns, quiet=True):
    os.makedirs(args.out, exist_ok=True)
    text = markdown(report, columns)
    for name, body in (("ablation.md", text), ("ablation.json", json.dumps(report, indent=1) + "\n")):
        atomic_write(os.path.join(args.out, name), lambda f: f.write(body.encode()))
    if not quiet:
        print("\n" + text + f"\nwrote {os.path.join(args.out, 'ablation.md')} and ablation.json")

#################################################################################
#                                  CLI                                          #
#################################################################################

def build_parser():
    p = argparse.ArgumentParser(prog="ablate.py", description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("rows", nargs="*", metavar="ROWS_FILE", help="files of rows: `name: --key value ...` per line")
    p.add_argument("--row", action="append", default=[], help='one row, "name: --key value ..." (repeatable)')
    p.add_argument("--base", default="", help='before every row: a config file and/or args ("configs/shapes.py")')
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="equal training FLOPs per run")
    budget.add_argument("--steps", type=int, help="equal optimizer steps per run")
    budget.add_argument("--hours", type=float, help="equal wall-clock hours of training per run")
    p.add_argument("--seeds", default="0", help="train.py --seed values, comma separated: 0,1,2")
    p.add_argument("--out", default="out/ablation", help="one folder per run (ROW-sSEED), ablation.md/.json")
    p.add_argument("--probe", default="shapes", choices=(*PROBES, "none"),
                   help="evaluate.py --probe (none: train only)")
    p.add_argument("--metric", default="", help="comma-separated keys of the probe's records in eval.json "
                   f"(dotted for nested; SECTION:key for another section); default: "
                   f"{'; '.join(f'{k}: {v[1]}' for k, v in PROBES.items())}")
    p.add_argument("--cfg", default="3", help="evaluate.py --cfg: CFG scale(s), comma separated")
    p.add_argument("--probe_n", type=int, default=4, help="evaluate.py --probe_n: images per caption")
    p.add_argument("--eval_steps", type=int, default=25, help="evaluate.py --steps: sampler steps")
    p.add_argument("--eval_args", default="", help='more evaluate.py arguments ("--batch 64 --sampler dpmpp_2m")')
    p.add_argument("--dry_run", action="store_true", help="print each row's plan (FLOPs/img, steps) and stop")
    return p


def glue_values(argv):
    """`--base "--vae none"`: argparse refuses an option value that starts with '-'; `--base=VALUE` it takes."""
    out, it = [], iter(argv)
    for a in it:
        value = next(it, None) if a in ("--base", "--row", "--eval_args") else None
        out.append(a if value is None else f"{a}={value}")
    return out


def parse_cli(argv):
    """-> (args, seeds, cfgs, columns); bad input exits 2 (argparse) or raises ToolError."""
    p = build_parser()
    args = p.parse_args(glue_values(argv))
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        cfgs = [float(c) for c in args.cfg.split(",") if c.strip()]
    except ValueError:
        p.error(f"--seeds and --cfg are comma-separated numbers, got {args.seeds!r} and {args.cfg!r}")
    if not seeds or len(set(seeds)) != len(seeds) or not cfgs:
        p.error(f"--seeds needs distinct seeds and --cfg at least one scale, got {args.seeds!r}, {args.cfg!r}")
    if (args.flops is not None and not args.flops > 0) or (args.steps is not None and args.steps < 1) or (
            args.hours is not None and not args.hours > 0):
        p.error("the budget (--flops, --steps or --hours) must be positive")
    args.out = os.path.normpath(args.out)
    columns = []
    if args.probe != "none":
        metrics = [m.strip() for m in (args.metric or PROBES[args.probe][1]).split(",") if m.strip()]
        columns = [dict(metric=m, cfg=c, label=m if len(cfgs) == 1 else f"{m} CFG {c:g}") for m in metrics
                   for c in cfgs]
    return args, seeds, cfgs, columns


def check_eval_args(runs):
    """evaluate.py's own argument checks on the first run's probe command (a bad --eval_args, a probe evaluate.py
    does not have yet), so that it fails now and not after the first training."""
    if not runs or runs[0]["eval_argv"] is None:
        return
    import evaluate
    try:
        evaluate.parse_settings(evaluate.build_parser(), runs[0]["eval_argv"])
    except SystemExit as e:
        if e.code:
            raise ToolError("evaluate.py refuses the probe arguments (its message above): "
                            + shlex.join(runs[0]["eval_argv"])) from None


def dry_run(plans, args):
    print("| row | args | GFLOP/img (train) | images/step | max_steps | training FLOPs |\n|---|---|---|---|---|---|")
    for p in plans:
        steps = p["max_steps"]
        total = sci(steps * p["images_per_step"] * p["flops_per_image"]) if steps else "(time budget)"
        print(f"| {p['name']} | {show_args(p['args'])} | {p['flops_per_image'] / 1e9:.4g} | {p['images_per_step']} "
              f"| {steps if steps else '-'} | {total} |")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, seeds, cfgs, columns = parse_cli(argv)
    try:
        base = shlex.split(args.base)
        if bad := [k for k in cli_keys(base) if k in TOOL_KEYS]:
            raise ToolError(f"--base: --{bad[0]} is set by this tool, per run")
        plans = [plan_row(name, row_argv, base, args) for name, row_argv in read_rows(args.rows, args.row)]
        if args.dry_run:
            return dry_run(plans, args)
        runs = make_runs(args, plans, seeds)
        check_eval_args(runs)
        check_resumable(runs)
    except (ToolError, ValueError) as e:
        config.fail(e, prog="ablate.py")
    mode = next(k for k in ("flops", "steps", "hours") if getattr(args, k) is not None)
    report = dict(command="python scripts/ablate.py " + shlex.join(argv), argv=argv, out=args.out,
                  date=datetime.date.today().isoformat(), budget=dict(mode=mode, value=getattr(args, mode)),
                  base=base, seeds=seeds, columns=columns,
                  eval=None if args.probe == "none" else dict(probe=args.probe, cfg=args.cfg, probe_n=args.probe_n,
                                                               steps=args.eval_steps, extra=args.eval_args),
                  rows=[])
    return run_all(args, report, plans, runs, columns)


def run_all(args, report, plans, runs, columns):
    """Every run in turn, the table rewritten after each. -> exit code: 0, or 1 when a run failed."""
    statuses = {}

    def interrupt(signum, frame):  # SIGTERM (a scheduler's stop) as Ctrl-C: the child checkpoints, the table is kept
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        for i, run in enumerate(runs, 1):
            statuses[run["dir"]] = execute(run, args, i, len(runs))
            tabulate(report, plans, runs, statuses, columns, args)
    except KeyboardInterrupt:
        tabulate(report, plans, runs, statuses, columns, args, quiet=False)
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    tabulate(report, plans, runs, statuses, columns, args, quiet=False)
    return 1 if any(r["status"] != "done" for row in report["rows"] for r in row["runs"]) else 0


def tabulate(report, plans, runs, statuses, columns, args, quiet=True):
    """Every run's numbers -> report["rows"], ablation.md and ablation.json. A run this invocation has not reached
    shows what an earlier one left (run.json), else 'not run'."""
    rows = []
    for plan in plans:
        mine = [r for r in runs if r["row"] == plan["name"]]
        recs = [collect(r, statuses.get(r["dir"]) or read_status(r), plan, columns, args.probe) for r in mine]
        rows.append(row_summary(plan, recs, columns))
    report["rows"] = rows
    write_outputs(args, report, columns, quiet)


if __name__ == "__main__":
    sys.exit(main())
