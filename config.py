"""
Reading train.py's keys: `python train.py [configs/NAME.py] [--key value | --key=value ...]` (nanoGPT's
configurator.py role, without exec'ing into train.py's globals). Types come from the defaults, choices and ranges
are checked here before any work, an unknown key gets a did-you-mean, `--help` lists every key with its comment.
Also the project's one exit-2 error path, boolean parser and device default.
"""
import builtins
import difflib
import math
import os
import re
import sys

import torch

from diffusion import PREDICTIONS, SCHEDULES, Diffusion, check_guidance, parse_cfg_interval
from encoders import CONTEXT_LENGTH, check_chunks
from model import CHOICES as MODEL_CHOICES
from model import PRESETS, config_from_keys


class ConfigError(Exception):
    pass


def fail(message, prog="train.py", code=2):
    """The one error exit of the command lines: one line on stderr, exit 2 (argparse's convention) for bad input."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def boolean(text):
    """true/false/1/0 in any case (train.py's booleans, and an argparse type for sample.py and evaluate.py)."""
    if text.lower() in ("true", "1", "false", "0"):
        return text.lower() in ("true", "1")
    raise ValueError(f"expects a boolean (true/false/1/0), got {text!r}")


def resolve_device(name="auto"):
    """The one device default: "auto" is the first CUDA device when there is one, else the CPU."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def keys_of(scope):
    """A module's globals that are keys: the public ints, floats, bools and strings, in the order they appear."""
    return {k: v for k, v in scope.items() if not k.startswith("_") and type(v) in (int, float, bool, str)}


def convert(key, value, default):
    """Parse a command-line string (or check a config-file value) against the default's type."""
    kind = type(default)
    if not isinstance(value, str):
        if kind is float and type(value) is int:
            return float(value)
        if type(value) is not kind:
            raise ConfigError(f"--{key} expects {kind.__name__}, got {value!r}")
        return value
    try:
        return boolean(value) if kind is bool else kind(value)
    except ValueError as e:
        message = str(e) if kind is bool else f"expects {kind.__name__}, got {value!r}"
        raise ConfigError(f"--{key} {message}") from None


def check_key(key, defaults):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown key {key!r}{hint}")


def read_config_file(path, defaults):
    """A config file: Python that assigns some keys (and nothing else that is not a module). -> {key: value}"""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    scope = {"__file__": os.path.abspath(path)}  # a config may read another beside it (configs/rtx5090_week_512.py)
    try:
        exec(builtins.compile(open(path).read(), path, "exec"), scope)
    except Exception as e:  # a syntax error, a NameError: one line, not a traceback
        raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from None
    keys = [k for k, v in scope.items() if not k.startswith("_") and type(v).__name__ != "module"]
    if not keys:  # e.g. JSON, or `batch: 8` (a bare annotation binds nothing)
        raise ConfigError(f"config file {path} assigns no keys: it is Python, one `key = value` per line")
    for key in keys:
        check_key(key, defaults)
    return {key: convert(key, scope[key], defaults[key]) for key in keys}


def parse_args(argv, defaults):
    """[configs/NAME.py] [--key value | --key=value ...] -> a full config dict. Raises ConfigError."""
    config, args = dict(defaults), list(argv)
    if args and not args[0].startswith("--"):
        config.update(read_config_file(args.pop(0), defaults))
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        check_key(key, defaults)
        if not eq:
            if not args:
                raise ConfigError(f"--{key} needs a value")
            value = args.pop(0)
        config[key] = convert(key, value, defaults[key])
    return config


def given_keys(argv, defaults):
    """The keys that argv sets (in its config file or as --key), whatever their values; argv already parsed."""
    args = list(argv)
    given = set(read_config_file(args.pop(0), defaults)) if args and not args[0].startswith("--") else set()
    return given | {a[2:].partition("=")[0] for a in args if a.startswith("--")}


def usage(doc, path, defaults):
    """The script's docstring, then every key with its default and the comment it has at the top of `path`."""
    notes, key = {}, None
    for line in open(path).read().splitlines():  # a key's comment, with its continuation lines (only a comment)
        m = re.match(r"^(\w+) = .*?#\s*(.*)$", line)
        if m:
            key, notes[m[1]] = m[1], m[2]
        elif key and re.match(r"^\s+#\s*(.*)$", line):
            notes[key] += " " + line.split("#", 1)[1].strip()
        else:
            key = None
    width = max(map(len, defaults))
    lines = [f"  --{k:<{width}}  {v!r:<12}  {notes.get(k, '')}" for k, v in defaults.items()]
    return doc.strip() + "\n\nkeys (--key value or --key=value; defaults shown):\n" + "\n".join(lines)


def prompt_list(text):
    """sample_prompts: '|'-separated prompts -> the non-empty ones."""
    return [q for q in text.split("|") if q.strip()]

#################################################################################
#                     Values that would fail later: fail now                    #
#################################################################################

# checked here with a did-you-mean; the model's own (model.CHOICES) are the lists DiTConfig checks too
CHOICES = dict(lr_schedule=("constant", "cosine", "wsd"), optimizer=("adamw", "muon"), dtype=("bfloat16", "float32"),
               prediction=PREDICTIONS, schedule=SCHEDULES, model=tuple(PRESETS), **MODEL_CHOICES)
AT_LEAST = dict(batch=1, accum=1, max_steps=1, log_every=1, ckpt_every=1, sample_every=0, eval_every=0, warmup=0,
                max_hours=0, depth=0, width=0, heads=0, patch=0, max_bad_steps=1, grad_clip=0, weight_decay=0,
                min_snr_gamma=0, t_logit_std=0, noise_offset=0, input_perturbation=0, resolution=8, ckpt_blocks=0,
                cfm_weight=0, disp_weight=0, sra_weight=0)
UNIT = ("cond_drop", "decay_frac", "ema_decay", "route_until")  # in [0, 1]


def check(C, architecture=True):
    """Values that would fail later (after an hours-long cache build, or after the first step): ConfigError now.
    architecture=False: before --init_from's architecture is inherited; what depends on it (the model's own checks,
    the levers' blocks, route_from / route_to) waits for the check after it (train.stage_start)."""
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
        if architecture:
            config_from_keys(C)
        Diffusion.from_config(vars(C)).check_min_snr(C.min_snr_gamma)
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
    check_layout(C.aspect_buckets, C.max_aspect, C.text_chunks)
    try:  # the grids' and evals' guidance: sample.py's checks
        check_guidance(parse_cfg_interval(C.sample_cfg_interval), None if C.sample_apg < 0 else C.sample_apg,
                       cfg_zero_star=C.sample_cfg_zero_star, prediction=C.prediction)
    except ValueError as e:
        raise ConfigError(f"--sample_*: {e}") from None
    if not 0 <= C.text_len <= CONTEXT_LENGTH * C.text_chunks:
        raise ConfigError(f"--text_len {C.text_len}: must be 0 (all) .. {CONTEXT_LENGTH * C.text_chunks} (the "
                          f"encoder's 77 tokens x text_chunks {C.text_chunks})")
    if C.sample_every > 0 and not prompt_list(C.sample_prompts):
        raise ConfigError("--sample_prompts has no prompt ('|'-separated); or --sample_every 0")
    if C.device != "auto":
        try:
            dev = torch.device(C.device)
        except RuntimeError as e:
            raise ConfigError(f"--device {C.device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {C.device}: torch sees no CUDA device here (use --device cpu)")
    check_speed_keys(C)
    check_trackers(C)
    check_levers(C, architecture)


def check_levers(C, architecture=True):
    """The training levers (diffusion.Levers; their weights >= 0 by AT_LEAST): ConfigError for what they cannot do.
    Their blocks are checked only where their weight is > 0, so the defaults hold at any depth."""
    if not C.cfm_weight < 1:
        raise ConfigError(f"--cfm_weight {C.cfm_weight}: must be in [0, 1) (lambda; 1 would reward any prediction as "
                          "far from another sample's target as from its own)")
    if C.cfm_weight > 0 and C.prediction != "flow":
        raise ConfigError(f"--cfm_weight {C.cfm_weight}: contrastive flow matching is for --prediction flow, not "
                          f"{C.prediction}")
    for key in ("cfm_weight", "disp_weight"):
        if getattr(C, key) > 0 and C.batch < 2:
            raise ConfigError(f"--{key} {getattr(C, key)}: contrasts the samples of a micro-batch, and --batch is 1")
    for key in ("cfm_weight", "disp_weight", "sra_weight"):
        if not math.isfinite(getattr(C, key)):
            raise ConfigError(f"--{key} {getattr(C, key)}: must be a finite number")
    if not 0 < C.sra_gap <= 1:
        raise ConfigError(f"--sra_gap {C.sra_gap}: must be in (0, 1] (a fraction of the time range)")
    if not architecture:
        return
    mcfg = config_from_keys(C)
    try:
        if C.disp_weight > 0:
            mcfg.block_index(C.disp_block, "--disp_block")
        if C.sra_weight > 0 and (mcfg.block_index(C.sra_target_block, "--sra_target_block")
                                 <= mcfg.block_index(C.sra_block, "--sra_block")):
            raise ValueError(f"--sra_target_block {C.sra_target_block}: must be a later block than --sra_block "
                             f"{C.sra_block} (depth {mcfg.depth})")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_layout(aspect_buckets, max_aspect, text_chunks):
    """The data layout keys (train.py's and data.py's): ConfigError."""
    if aspect_buckets < 0 or aspect_buckets == 1:
        raise ConfigError(f"--aspect_buckets {aspect_buckets}: 0 (square centre crops) or N >= 2 buckets")
    if not 1 <= max_aspect < math.inf:
        raise ConfigError(f"--max_aspect {max_aspect}: must be >= 1 (the widest bucket's width / height)")
    try:
        check_chunks(text_chunks)
    except ValueError as e:
        raise ConfigError(f"--{e}") from None


def check_speed_keys(C):
    """The memory and precision keys (train.py and bench.py): ckpt_blocks only with grad_ckpt; fp8 (torchao's float8
    training) needs a CUDA card with FP8 tensor cores, compute capability 8.9+ (Ada, Hopper, Blackwell), and the
    torchao package. ConfigError otherwise, before any work."""
    if C.ckpt_blocks > 0 and not C.grad_ckpt:
        raise ConfigError(f"--ckpt_blocks {C.ckpt_blocks}: only with --grad_ckpt true")
    if not C.fp8:
        return
    device = torch.device(resolve_device(C.device))
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
