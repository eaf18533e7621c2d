"""The training tests' run helpers: a tiny run's command line, nested state-dict equality, log.jsonl's records,
and a hook that keeps every checkpoint a run writes."""
import json
import os
import shutil

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(cache, out_dir, **over):
    """A tiny CPU run on `cache` (2 blocks, width 64, 16 tokens) with train.py's recipe, but for what `over` sets."""
    base = dict(data=cache, out_dir=str(out_dir), vae="none", text_encoder="tiny", resolution=16,
                model="DiT-S/2", depth=2, width=64, heads=4, patch=4, batch=4, accum=1, lr=1e-3, warmup=3,
                max_steps=6, log_every=2, ckpt_every=1000, sample_every=0, compile=False, device="cpu",
                ema_decay=0.9, cond_drop=0.2, seed=1, aspect_buckets=0)
    base.update(over)
    return [f"--{k}={v}" for k, v in base.items()]


def tensors_equal(a, b, atol=0.0):
    """Nested state dicts: same keys, tensors equal (bitwise for atol 0)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and (torch.equal(a, b) if atol == 0 else torch.allclose(a, b, atol=atol, rtol=0))
    return a == b


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def log_records(out_dir):
    """log.jsonl's step records (each process opens it with an environment record)."""
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return [r for r in recs if r.get("event") != "start"]


def keep_checkpoints(monkeypatch):
    """Every checkpoint train.py writes is also copied to ckpt.pt.STEP. -> {(run folder name, step): that copy},
    keyed by run and step: a resumed run b is compared with run a, not with itself."""
    import train
    saved = {}
    real_save = train.save_checkpoint

    def save_and_keep(path, state):
        real_save(path, state)
        saved[os.path.basename(os.path.dirname(path)), state["step"]] = path + f".{state['step']}"
        shutil.copy(path, path + f".{state['step']}")
    monkeypatch.setattr(train, "save_checkpoint", save_and_keep)
    return saved


def old_layout(cache):
    """Make a cache folder one built before aspect buckets and several captions: no bucket.npy / ncaptions.npy, no
    manifest keys of them."""
    for name in ("bucket.npy", "ncaptions.npy"):
        os.remove(os.path.join(cache, name))
    with open(os.path.join(cache, "manifest.json")) as f:
        m = json.load(f)
    for key in ("buckets", "merged", "captions", "min_bucket"):
        del m[key]
    with open(os.path.join(cache, "manifest.json"), "w") as f:
        json.dump(m, f)
