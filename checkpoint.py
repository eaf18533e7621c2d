"""
The one checkpoint reader and writer (out_dir/ckpt.pt), and what a run does with a checkpoint: find the one to
resume from, take init_from's architecture, restore a run's state. Also the project's one atomic file write.
"""
import dataclasses
import json
import os

import torch

from model import TRAINING_ONLY, DiTConfig, config_keys

# the layout: train.py writes it with save_checkpoint, every reader checks it with load_checkpoint
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "config", "model_config", "loader_state", "rng", "progress")
OPTIONAL_KEYS = ("sra_head",)  # SRA's head (train.py's sra_weight > 0), for resuming only
FOR_SAMPLING = ("ema", "config", "model_config")
FOR_RESUMING = ("model", "ema", "optimizer", "step", "model_config", "loader_state")  # rng, progress: optional
# the train.py keys sample.py rebuilds the pipeline from
SAMPLING_KEYS = ("resolution", "vae", "text_encoder", "prediction", "schedule", "zero_terminal_snr", "beta_start",
                 "beta_end")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable (truncated, corrupt) or not a train.py checkpoint."""


def atomic_write(path, write):
    """write(f) into a temporary file beside `path` (binary), fsync, then rename over `path`: a killed process or a
    full disk leaves the old file whole, never a truncated one. The project's one temp-and-rename write."""
    tmp = path + ".part"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj, indent=1):
    """A JSON file (a manifest, a report, a run's status), written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def save_checkpoint(path, state):
    """The one writer of the layout (atomic)."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    unknown = [k for k in state if k not in CHECKPOINT_KEYS + OPTIONAL_KEYS]
    if missing or unknown:
        raise ValueError(f"checkpoint layout: missing {missing}, unknown {unknown}")
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, need=FOR_SAMPLING):
    """The one reader: torch.load(weights_only=True) on the CPU, with one-line errors for a missing, truncated or
    foreign file, or one without the keys `need`s (sampling needs config keys too)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError depending on where the file ends
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {reason}") from None
    missing = [k for k in need if not (isinstance(ckpt, dict) and k in ckpt)]
    if not missing and "config" in need:
        missing = [f"config[{k!r}]" for k in SAMPLING_KEYS if k not in ckpt["config"]]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint: missing {', '.join(missing)}")
    return ckpt

#################################################################################
#                       A run and its checkpoints                               #
#################################################################################

def find_resume(C):
    """-> (out_dir/ckpt.pt, the checkpoint to resume from or None). A run never overwrites a checkpoint that is not
    its own: --resume never or a path with an existing out_dir/ckpt.pt is an error (ValueError)."""
    if C.resume not in ("auto", "never") and not os.path.isfile(C.resume):
        raise ValueError(f"--resume {C.resume!r}: no such checkpoint")
    ckpt_path = os.path.join(C.out_dir, "ckpt.pt")
    if C.resume != "auto" and os.path.exists(ckpt_path) and os.path.abspath(C.resume) != os.path.abspath(ckpt_path):
        raise ValueError(f"{ckpt_path} exists and --resume {C.resume} would overwrite it: "
                         "use another --out_dir, or move the checkpoint away")
    if C.resume == "auto":
        return ckpt_path, (ckpt_path if os.path.exists(ckpt_path) else None)
    return ckpt_path, (None if C.resume == "never" else C.resume)


def architecture_keys(C):
    """The keys that shape the weights: DiTConfig's fields among the run's keys, but for TRAINING_ONLY and text_len
    (a run may cross-attend to fewer tokens than its weights were trained on)."""
    return [k for k in config_keys(vars(C)) if k not in TRAINING_ONLY and k != "text_len"]


def inherit_architecture(C, init, path, defaults):
    """init_from: the model keys left at their defaults take the checkpoint's values; one set otherwise must agree.
    The encoders must be the checkpoint's (the weights were trained on their latents and states). ValueError."""
    saved, mc = init.get("config", {}), init["model_config"]
    for key in ("vae", "text_encoder"):
        if key in saved and getattr(C, key) != saved[key]:
            raise ValueError(f"{path} was trained with --{key} {saved[key]}, this run has {getattr(C, key)}")
    C.model = saved.get("model", C.model) if C.model == defaults["model"] else C.model
    for key in architecture_keys(C):
        have = mc.get(key, getattr(DiTConfig, key))  # checkpoints older than rope / cross_norm have them on
        if getattr(C, key) == defaults[key]:
            setattr(C, key, have)
        elif getattr(C, key) != have:
            raise ValueError(f"--{key} {getattr(C, key)}: the weights of {path} have {key} {have}")
    same_chunks = C.text_chunks == saved.get("text_chunks", 1)  # other chunks: a new text length (0 = all of it)
    if C.text_len == defaults["text_len"] and same_chunks:
        C.text_len = mc["text_len"]
    if C.text_len > mc["text_len"] and same_chunks:
        raise ValueError(f"--text_len {C.text_len}: {path} was trained on {mc['text_len']} text tokens")


# Keys of one invocation, not of the run: never taken from a checkpoint (device is resolved per rank).
PER_INVOCATION = ("device", "resume", "out_dir")
# Keys that checkpoints written before them lack, with their value then where it is not today's default.
BEFORE_KEY = {"aspect_buckets": 0}


def keep_run_keys(C, ck, given):
    """Resuming: each key that the command line does not set (`given`: the keys it sets) takes the checkpoint's
    value, so a rerun goes on as the run began even where train.py's defaults changed since (2026-12-04: the recipe;
    2026-12-05: aspect_buckets). The optimizer is read from its state, as restore() reads it. ValueError for a
    --prediction other than the checkpoint's. -> ["--key value", ...] taken."""
    saved = dict(ck.get("config") or {})
    if saved:
        saved = {**BEFORE_KEY, **saved}
    saved["optimizer"] = "muon" if "muon" in ck["optimizer"] else "adamw"
    if "prediction" in given and saved.get("prediction", C.prediction) != C.prediction:
        raise ValueError(f"the checkpoint was trained with --prediction {saved['prediction']}: a resume cannot "
                         f"change it to {C.prediction} (use another --out_dir, or --init_from for a new stage)")
    kept = []
    for key, have in saved.items():
        if key in vars(C) and key not in given and key not in PER_INVOCATION and have != getattr(C, key):
            setattr(C, key, have)
            kept.append(f"--{key} {have}")
    return kept


def same_model(saved_config, config):
    """Whether a checkpoint's model_config holds the weights of `config` (training-only fields aside; fields a
    checkpoint predates, such as rope, take DiTConfig's defaults: what it was trained with)."""
    try:
        saved = dataclasses.asdict(DiTConfig(**saved_config))
    except (TypeError, ValueError):
        saved = saved_config
    strip = lambda c: {k: v for k, v in c.items() if k not in TRAINING_ONLY}
    return strip(saved) == strip(dataclasses.asdict(config))


def restore(ck, path, C, model, ema, optimizer, loader, head=None):
    """Continue from a checkpoint: weights, EMA, SRA's head, optimizer state (this run's hyperparameters), loader
    position, RNG. -> (step, elapsed s, the planned horizon or None). ValueError for a checkpoint of another model or
    optimizer, or one that would switch SRA on or off (its head and the head's optimizer state)."""
    if not same_model(ck["model_config"], model.config):
        raise ValueError(f"{path} holds a different model ({ck['model_config']}); use another --out_dir or "
                         "--resume never")
    kind = "muon" if "muon" in ck["optimizer"] else "adamw"
    if kind != C.optimizer:
        raise ValueError(f"{path} was trained with --optimizer {kind}, not {C.optimizer}: use another --out_dir")
    if ("sra_head" in ck) != (head is not None):
        raise ValueError(f"{path} was trained with SRA {'on' if 'sra_head' in ck else 'off'}: a resume cannot switch "
                         f"it {'off' if 'sra_head' in ck else 'on'} (--sra_weight); use another --out_dir")
    model.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    if head is not None:
        head.load_state_dict(ck["sra_head"])
    optimizer.load_state_dict(ck["optimizer"])
    loader.load_state_dict(ck["loader_state"])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"]["cpu"])
    progress = ck.get("progress", {})
    return ck["step"], progress.get("elapsed_s", 0.0), progress.get("horizon")


def checkpoint_state(C, model, ema, optimizer, loader, step, elapsed_s, horizon, head=None):
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "config": dict(vars(C)), "model_config": dataclasses.asdict(model.config),
            "loader_state": loader.state_dict(), "rng": {"cpu": torch.get_rng_state()},
            "progress": {"elapsed_s": elapsed_s, "horizon": horizon},
            **({"sra_head": head.state_dict()} if head is not None else {})}
