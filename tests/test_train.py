"""train.py: CLI, overfitting, exact resume, exact accumulation, DDP == one process, SIGTERM, NaN skipping.
Small models on the CPU: pixel space (vae none), the tiny text tower, 16 px shapes."""
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data as datalib
import train
from model import DiT, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "shapes16")
    return datalib.ensure_cache("shapes:32", 16, "none", "tiny", cache_dir=out, device="cpu")


def args(cache, out_dir, **over):
    base = dict(data=cache, out_dir=str(out_dir), vae="none", text_encoder="tiny", resolution=16,
                model="DiT-S/2", depth=2, width=64, heads=4, patch=4, batch=4, accum=1, lr=1e-3, warmup=3,
                max_steps=6, log_every=2, ckpt_every=1000, sample_every=0, compile=False, device="cpu",
                ema_decay=0.9, cond_drop=0.2, seed=1)
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


# ----------------------------------------------------------------------------- CLI

def test_cli_parses_both_forms_and_config_files(tmp_path):
    c = train.parse_args(["--batch", "64", "--accum", "12"])
    assert (c["batch"], c["accum"]) == (64, 12)
    assert train.parse_args(["--batch=64"])["batch"] == 64
    assert train.parse_args(["--lr", "3"])["lr"] == 3.0 and isinstance(train.parse_args(["--lr", "3"])["lr"], float)
    assert train.parse_args(["--compile", "FALSE"])["compile"] is False
    assert train.parse_args(["--compile=1"])["compile"] is True
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nbatch = 8\nlr = 2  # an int for a float key is fine\n")
    c = train.parse_args([str(cfg), "--accum", "3"])
    assert (c["batch"], c["lr"], c["accum"]) == (8, 2.0, 3)
    assert set(c) >= {"data", "out_dir", "resolution", "vae", "text_encoder", "model", "depth", "width", "heads",
                      "patch", "prediction", "batch", "accum", "lr", "warmup", "max_steps", "max_hours",
                      "min_snr_gamma", "noise_offset", "input_perturbation", "cond_drop", "ema_decay", "compile",
                      "device", "dtype", "seed", "log_every", "ckpt_every", "sample_every", "resume"}
    cfg.write_text("bacth = 8\n")
    with pytest.raises(train.ConfigError, match="--batch"):
        train.parse_args([str(cfg)])


@pytest.mark.parametrize("argv,needle", [(["--bacth", "64"], "did you mean --batch"),
                                         (["--batch", "x"], "--batch expects int"),
                                         (["--compile", "maybe"], "boolean"),
                                         (["--text_len", "0"], "must be 1..77"),
                                         (["--text_len", "78"], "must be 1..77")])
def test_cli_errors_exit_2_before_work(argv, needle, tmp_path):
    r = subprocess.run([sys.executable, "train.py", *argv, "--out_dir", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert not os.path.exists(tmp_path / "o")  # nothing was started


@pytest.mark.parametrize("over,needle", [
    (dict(lr_schedule="cosin"), "did you mean 'cosine'"), (dict(batch=0), "--batch 0: must be >= 1"),
    (dict(accum=0), "--accum 0"), (dict(log_every=0), "--log_every 0"), (dict(ckpt_every=0), "--ckpt_every 0"),
    (dict(dtype="float16"), "--dtype 'float16'"), (dict(prediction="epsilon"), "did you mean 'eps'"),
    (dict(model="DiT-Q/2"), "--model 'DiT-Q/2'"), (dict(device="bogus"), "--device 'bogus'"),
    (dict(ema_decay=1.5), "--ema_decay 1.5: must be in [0, 1]"), (dict(lr="nan"), "--lr nan"),
    (dict(t_logit_std=-1), "--t_logit_std -1.0: must be >= 0"), (dict(adam_beta2=1), "must be in [0, 1)"),
    (dict(width=64, heads=3), "head size must be a whole multiple of 4"),
    (dict(sample_every=5, sample_prompts="|"), "no prompt"),
    (dict(batch=64), "lower --batch"), (dict(resolution=18, patch=4), "not divisible by patch 4"),
    (dict(optimizer="adam"), "--optimizer 'adam'"), (dict(muon_lr=0), "--muon_lr 0.0: must be a positive number"),
    (dict(prediction="flow", min_snr_gamma=5), "set min_snr_gamma 0"), (dict(prediction="flow", min_snr_gamma=0, zero_terminal_snr=True),
                                                      "zero_terminal_snr does not apply to flow"),
    (dict(prediction="flow", min_snr_gamma=0, flow_shift=0), "flow_shift must be a positive number"),
    (dict(route_frac=0.5), "route_from 2, route_to -2: the routed blocks"), (dict(route_frac=1), "route_frac"),
    (dict(route_until=1.5), "--route_until 1.5: must be in [0, 1]"),
    (dict(route_frac=0.5, route_from=0, route_to=1, route_until=0.9, max_hours=0.1), "needs a step budget"),
])
def test_bad_values_exit_2_before_training(cache, tmp_path, capsys, over, needle):
    """Every value that would otherwise fail later (after the cache build, after a step) or silently do something
    else exits 2 with one message, and no training step runs (no checkpoint, no log)."""
    with pytest.raises(SystemExit) as e:
        train.main(args(cache if "resolution" not in over else "shapes:8", tmp_path / "o", **over,
                        **({"cache_dir": str(tmp_path / "c")} if "resolution" in over else {})))
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt") and not os.path.exists(tmp_path / "o" / "log.jsonl")


@pytest.mark.parametrize("text,needle", [('{"batch": 8}', "assigns no keys"), ("batch: 8\n", "assigns no keys"),
                                         ("batch = = 8\n", "SyntaxError"), ("batch = eight\n", "NameError")])
def test_config_files_that_set_nothing_or_do_not_parse_are_errors(tmp_path, text, needle):
    cfg = tmp_path / "c.py"
    cfg.write_text(text)
    with pytest.raises(train.ConfigError, match=needle):
        train.parse_args([str(cfg)])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    printed = capsys.readouterr().out
    assert e.value.code == 0 and all(f"--{k} " in printed for k in train.CONFIG_KEYS)


# ----------------------------------------------------------------------------- learning

def test_overfits_four_examples(tmp_path):
    c4 = datalib.ensure_cache("shapes:4", 16, "none", "tiny", cache_dir=str(tmp_path / "c4"), device="cpu")
    out = train.main(args(c4, tmp_path / "o", prediction="eps", min_snr_gamma=0, cond_drop=0, flip=False,
                          lr=2e-3, warmup=20, max_steps=300, log_every=20, lr_schedule="constant", width=96))
    recs = log_records(tmp_path / "o")
    assert out["step"] == 300 and out["skipped"] == 0
    first, last = recs[0]["loss"], min(r["loss"] for r in recs[-3:])
    assert last < first / 10, (first, last)


# ----------------------------------------------------------------------------- exactness

def keep_checkpoints(monkeypatch):
    """Every checkpoint train.py writes is also copied to ckpt.pt.STEP. -> {(run folder name, step): that copy},
    keyed by run and step: a resumed run b is compared with run a, not with itself."""
    saved = {}
    real_save = train.save_checkpoint
    def save_and_keep(path, state):
        real_save(path, state)
        saved[os.path.basename(os.path.dirname(path)), state["step"]] = path + f".{state['step']}"
        shutil.copy(path, path + f".{state['step']}")
    monkeypatch.setattr(train, "save_checkpoint", save_and_keep)
    return saved


@pytest.mark.parametrize("over", [{}, dict(optimizer="muon", prediction="flow", min_snr_gamma=0, t_logit_std=1.0),
                                  dict(route_frac=0.5, route_from=0, route_to=1)])
def test_resume_is_exact(cache, tmp_path, monkeypatch, over):
    """12 steps in one run == 6 steps, a restart from that checkpoint, 6 more (weights, EMA, optimizer, loader)."""
    saved = keep_checkpoints(monkeypatch)
    run = dict(max_steps=12, ckpt_every=6, noise_offset=0.1, input_perturbation=0.1, **over)
    train.main(args(cache, tmp_path / "a", **run))
    assert sorted(saved) == [("a", 6), ("a", 12)]
    os.makedirs(tmp_path / "b")
    shutil.copy(saved["a", 6], tmp_path / "b" / "ckpt.pt")  # as if the first run had been killed right after step 6
    out = train.main(args(cache, tmp_path / "b", **run))
    assert out["step"] == 12 and sorted(saved) == [("a", 6), ("a", 12), ("b", 12)]
    a, b = load(saved["a", 12]), load(saved["b", 12])
    for key in ("model", "ema", "optimizer", "loader_state", "step"):
        assert tensors_equal(a[key], b[key]), key
    assert not tensors_equal(load(saved["a", 6])["model"], a["model"])  # and training did move the weights


def muon_tolerances(model):
    """{parameter name: atol} for comparing two runs of ONE step: 1e-6 (fp32 sums in another order), but Muon's
    Newton-Schulz runs in bfloat16 (torch.optim.Muon), so gradients equal to fp32 rounding give updates equal to
    a few bf16 ulps: 4e-4 = 2^-6 of the largest step (muon_lr 0.02 x sqrt(2) for the 2W x W kv, warmup 1/3)."""
    muon = {id(p) for p in train.muon_params(model)}
    return {n: 4e-4 if id(p) in muon else 1e-6 for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer,steps", [("adamw", 3), ("muon", 1)])
def test_accumulation_is_exact(cache, tmp_path, optimizer, steps):
    """micro-batch 8 x accum 1 == micro-batch 4 x accum 2 (fp32)."""
    one = train.main(args(cache, tmp_path / "a", batch=8, accum=1, max_steps=steps, grad_clip=0.5, optimizer=optimizer))
    two = train.main(args(cache, tmp_path / "b", batch=4, accum=2, max_steps=steps, grad_clip=0.5, optimizer=optimizer))
    atol = muon_tolerances(one["model"]) if optimizer == "muon" else {}
    for (name, p), q in zip(one["model"].named_parameters(), two["model"].parameters()):
        torch.testing.assert_close(p, q, atol=atol.get(name, 1e-6), rtol=0, msg=name)


@pytest.mark.parametrize("optimizer,steps", [("adamw", 3), ("muon", 1)])
def test_ddp_equals_one_process(cache, tmp_path, optimizer, steps):
    """2 gloo ranks x micro-batch 4 give the weights of 1 process x micro-batch 8."""
    single = train.main(args(cache, tmp_path / "one", batch=8, max_steps=steps, optimizer=optimizer))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *args(cache, tmp_path / "two", batch=4, max_steps=steps, optimizer=optimizer)],
                       cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = load(tmp_path / "two" / "ckpt.pt")
    assert ddp["step"] == steps
    atol = muon_tolerances(single["model"]) if optimizer == "muon" else {}
    for name, p in single["model"].state_dict().items():
        torch.testing.assert_close(ddp["model"][name], p, atol=max(atol.get(name, 0), 1e-5), rtol=0, msg=name)


# ----------------------------------------------------------------------------- robustness

def test_sigterm_saves_a_checkpoint_that_resumes(cache, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "train.py", *args(cache, out, max_steps=100000, log_every=1)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 4):  # env + 3 steps
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    ck = load(out / "ckpt.pt")  # weights_only=True
    assert 3 <= ck["step"] < 100000
    assert not os.path.exists(str(out / "ckpt.pt") + ".tmp")
    res = train.main(args(cache, out, max_steps=ck["step"] + 2))
    assert res["step"] == ck["step"] + 2


def test_sigterm_under_torchrun_saves_between_log_steps(cache, tmp_path):
    """torchrun SIGKILLs its workers 30 s after SIGTERM: the ranks must agree on the stop at the next optimizer step,
    not at the next log step (here never: log_every is huge), and rank 0 must save that step."""
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *args(cache, out, batch=4, max_steps=10**6, log_every=10**6, ckpt_every=25)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "ckpt.pt").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    stdout, err = p.communicate(timeout=120)
    saved = re.findall(r"checkpoint saved at step (\d+)", stdout)
    assert len(saved) == 1, (stdout[-2000:], err[-2000:])
    assert load(out / "ckpt.pt")["step"] == int(saved[0]) > 25
    assert "forcefully exiting via 9" not in err


def test_nan_step_is_skipped_and_counted(cache, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(cache, poisoned)
    lat = np.load(poisoned / "latents.npy", mmap_mode="r+")  # the cache's latents (N, 2, C, h, w)
    lat[5] = np.nan  # both flips of sample 5
    lat.flush()
    steps = 12
    # how many of the run's optimizer steps see the poisoned sample (the loader order is deterministic)
    loader = datalib.Loader(datalib.LatentCache(str(poisoned)), 4, seed=1, cond_drop=0.2)
    expected = sum(bool(torch.isnan(next(loader)["latents"]).any()) for _ in range(steps))
    assert expected >= 1
    out = train.main(args(str(poisoned), tmp_path / "o", max_steps=steps))
    assert out["step"] == steps and out["skipped"] == expected
    assert all(torch.isfinite(p).all() for p in out["model"].parameters())
    assert all(torch.isfinite(p).all() for p in out["ema"].parameters())
    recs = log_records(tmp_path / "o")
    assert recs[-1]["skipped"] == expected and all(np.isfinite(r["loss"]) for r in recs)


def test_a_streak_of_bad_steps_stops_the_run_even_if_it_ends_before_the_log_step(cache, tmp_path, monkeypatch, capsys):
    """Steps 1-3 non-finite (found_inf forced), step 4 fine, log at step 5: max_bad_steps 3 must stop the run there."""
    real_step, calls = train.train_step, []

    def flaky_step(*a, **k):
        calls.append(1)
        loss, t, norm, found_inf = real_step(*a, **k)
        return loss, t, norm, torch.ones_like(found_inf) if len(calls) <= 3 else found_inf

    monkeypatch.setattr(train, "train_step", flaky_step)
    with pytest.raises(SystemExit) as e:
        train.main(args(cache, tmp_path / "o", max_steps=20, log_every=5, max_bad_steps=3))
    assert e.value.code == 1 and len(calls) == 5
    assert "3 non-finite steps in a row by step 5" in capsys.readouterr().err
    calls.clear()  # the same 3 bad steps under max_bad_steps 4: the run goes on
    assert train.main(args(cache, tmp_path / "p", max_steps=6, log_every=5, max_bad_steps=4))["step"] == 6


def test_existing_checkpoint_is_never_overwritten_and_a_truncated_one_is_a_clear_error(cache, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    junk = b"PK\x03\x04 a truncated checkpoint"
    (out / "ckpt.pt").write_bytes(junk)
    for extra, needle in ((["--resume", "never"], "would overwrite"), ([], "truncated")):
        r = subprocess.run([sys.executable, "train.py", *args(cache, out), *extra], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]
    assert (out / "ckpt.pt").read_bytes() == junk


def test_foreign_checkpoints_are_clear_errors_and_the_older_layout_resumes(cache, tmp_path, capsys):
    """A bare state dict or a list in out_dir/ckpt.pt: exit 2 before any work. A checkpoint of the older layout
    (no `progress`, no `rng`) resumes."""
    out = tmp_path / "o"
    out.mkdir()
    for foreign in ({"weight": torch.zeros(2)}, [1, 2]):
        torch.save(foreign, out / "ckpt.pt")
        with pytest.raises(SystemExit) as e:
            train.main(args(cache, out))
        assert e.value.code == 2 and "not a train.py checkpoint" in capsys.readouterr().err
    (out / "ckpt.pt").unlink()
    train.main(args(cache, out, max_steps=2))
    ck = load(out / "ckpt.pt")
    torch.save({k: v for k, v in ck.items() if k not in ("progress", "rng")}, out / "ckpt.pt")
    assert train.main(args(cache, out, max_steps=4))["step"] == 4


def test_resume_takes_this_runs_optimizer_settings(cache, tmp_path):
    """optimizer.load_state_dict restores the saved betas and weight decay: the resumed run's own settings win."""
    train.main(args(cache, tmp_path / "o", max_steps=2))
    out = train.main(args(cache, tmp_path / "o", max_steps=4, weight_decay=0.1, adam_beta2=0.95))
    decay, no_decay = out["optimizer"].param_groups
    assert decay["betas"] == (0.9, 0.95) and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_a_failing_sample_grid_costs_no_checkpoint(cache, tmp_path, monkeypatch, capsys):
    """The checkpoint of a step is written before its sample grid, and a grid that fails warns and training goes on."""
    def fail(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(train, "sample_grid", fail)
    out = train.main(args(cache, tmp_path / "o", max_steps=6, ckpt_every=2, sample_every=2))
    assert out["step"] == 6 and load(tmp_path / "o" / "ckpt.pt")["step"] == 6
    assert "sample grid at step 2 failed" in capsys.readouterr().err


def test_ddp_ranks_follow_rank_0s_clock_under_max_hours(cache, tmp_path):
    """max_hours plans the horizon from measured time; rank 1's clock here runs 1.5x fast. The ranks must still take
    the same horizon, LR and stop step (else they hang in a collective or diverge), and the run must end with a
    checkpoint of its final step."""
    wrapper = tmp_path / "skewed.py"
    wrapper.write_text(f"""import json, os, sys, time
sys.path.insert(0, {ROOT!r})
if os.environ["RANK"] == "1":
    real, t0 = time.time, time.time()
    time.time = lambda: t0 + 1.5 * (real() - t0)
import train
from model import DiT, make_config
out = train.main(sys.argv[1:])
with open(os.path.join({str(tmp_path)!r}, "final" + os.environ["RANK"]), "w") as f:
    json.dump([out["step"], out["optimizer"].param_groups[0]["lr"]], f)
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run([*torchrun, str(wrapper),
                        *args(cache, tmp_path / "o", batch=4, max_steps=100000, max_hours=0.0015, log_every=3,
                              warmup=2)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    finals = [json.loads((tmp_path / f"final{rank}").read_text()) for rank in (0, 1)]  # [step, last LR] per rank
    assert finals[0] == finals[1], finals  # the same final step and LR on both ranks
    assert load(tmp_path / "o" / "ckpt.pt")["step"] == finals[0][0] > 3


def test_ddp_cache_error_on_rank_0_reaches_every_rank(cache, tmp_path):
    """Only rank 0 builds the cache; when it refuses (here: a cache_dir holding a cache of other settings), every rank
    exits 2 with its message instead of the others dying on a closed connection."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *args("shapes:32", tmp_path / "o", cache_dir=cache, resolution=8)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("train.py: error:") == 2 and r.stderr.count("other settings") >= 2, r.stderr[-3000:]
    assert "Connection closed" not in r.stderr and "Connection reset" not in r.stderr


def test_warmup_warning_only_where_warmup_eats_the_decay(cache, tmp_path, capsys):
    train.main(args(cache, tmp_path / "a", lr_schedule="cosine", warmup=3, max_steps=6))
    train.main(args(cache, tmp_path / "b", lr_schedule="wsd", warmup=3, max_steps=6, decay_frac=0.5))
    assert "warning: warmup" not in capsys.readouterr().out
    train.main(args(cache, tmp_path / "c", lr_schedule="wsd", warmup=5, max_steps=6, decay_frac=0.5))
    assert "warning: warmup 5 runs past step 3 of 6" in capsys.readouterr().out


def test_resume_with_activation_checkpointing_switched_on(cache, tmp_path):
    """grad_ckpt changes memory, not weights: a run may be resumed with it (the week config's advice on OOM), and
    the resumed steps equal those of a resume without it (recomputation gives the same gradients)."""
    train.main(args(cache, tmp_path / "o", max_steps=2))
    shutil.copytree(tmp_path / "o", tmp_path / "p")
    with_ckpt = train.main(args(cache, tmp_path / "o", max_steps=4, grad_ckpt=True))
    assert with_ckpt["step"] == 4
    without = train.main(args(cache, tmp_path / "p", max_steps=4))
    for (name, a), b in zip(with_ckpt["model"].named_parameters(), without["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_resume_with_some_blocks_checkpointed(cache, tmp_path):
    """ckpt_blocks, like grad_ckpt, changes memory, not weights: a run resumes with it, equal to one without."""
    train.main(args(cache, tmp_path / "o", max_steps=2))
    shutil.copytree(tmp_path / "o", tmp_path / "p")
    some = train.main(args(cache, tmp_path / "o", max_steps=3, grad_ckpt=True, ckpt_blocks=1))
    none = train.main(args(cache, tmp_path / "p", max_steps=3))
    assert some["step"] == 3 and some["model"].config.ckpt_blocks == 1
    for (name, a), b in zip(some["model"].named_parameters(), none["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("case,over,needle", [
    ("cpu", dict(fp8=True), "--fp8 true: needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+), not the"),
    ("A100", dict(fp8=True, device="cuda"), "NVIDIA A100-SXM4-80GB (compute capability 8.0) has no FP8 tensor cores"),
    ("no torchao", dict(fp8=True, device="cuda"), "(pip install torchao)"),
    ("cpu", dict(ckpt_blocks=1), "--ckpt_blocks 1: only with --grad_ckpt true"),
    ("cpu", dict(grad_ckpt=True, ckpt_blocks=3), "ckpt_blocks 3: must be in 0..depth 2 (0 = every block)")])
def test_fp8_and_ckpt_blocks_refusals_exit_2_with_one_line(tmp_path, capsys, monkeypatch, case, over, needle):
    """fp8 needs CUDA, compute capability 8.9+ and torchao: each lack is one line and exit 2 before any work (a card
    and a missing package simulated here); so is a ckpt_blocks without grad_ckpt or beyond the depth."""
    if case != "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0) if case == "A100" else (9, 0))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB" if case == "A100"
                            else "NVIDIA H100 80GB HBM3")
        monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao.float8` fails as without the package
        monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(SystemExit) as e:
        train.main(args("shapes", tmp_path / "o", **over))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


def test_an_fp8_model_trains_and_its_checkpoint_loads_without_torchao(tmp_path, monkeypatch):
    """build_model with fp8 swaps the blocks' linears (where torchao is installed; its float8 matmuls also run on the
    CPU), and one train_step moves the weights; the checkpoint holds nn.Linear's keys and plain tensors, so that
    sample.py's reader and a plain DiT load it in a process where torchao cannot be imported."""
    pytest.importorskip("torchao.float8")
    import itertools
    import contextlib
    import sample
    from model import DiTConfig
    C = SimpleNamespace(**train.parse_args(args("shapes", tmp_path / "o", fp8=True, batch=2)))  # parsed, unchecked
    te = SimpleNamespace(dim=32, pooled_dim=24)
    model, ema, optimizer, diffusion = train.build_model(C, (3, 16, 16), te)
    assert sum(type(m).__name__ == "Float8Linear" for m in model.modules()) == 7 * 2
    assert "14 block linears in fp8" in train.describe(C, model, (3, 16, 16), 32, 2, 1)
    g = torch.Generator().manual_seed(0)
    loader = itertools.repeat({"latents": torch.randn(2, 3, 16, 16, generator=g),
                               "states": torch.randn(2, 77, 32, generator=g),
                               "pooled": torch.randn(2, 24, generator=g)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rand = train.step_noise(0, 2, (3, 16, 16), "cpu", C, diffusion, tokens=16)
    train.train_step(model, optimizer, diffusion, loader, None, rand, 1e-3, C, contextlib.nullcontext())
    train.ema_update(list(ema.parameters()), list(model.parameters()), 0.5)
    state = train.checkpoint_state(C, model, ema, optimizer, SimpleNamespace(state_dict=lambda: {}), 1, 1.0, 6)
    sample.save_checkpoint(str(tmp_path / "ckpt.pt"), state)
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    ck = sample.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ck["model"].keys() == before.keys() == ck["ema"].keys()
    plain = DiT(DiTConfig(**ck["model_config"]))
    plain.load_state_dict(ck["model"])
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
    assert any(not torch.equal(ck["model"][k], before[k]) for k in before)  # the fp8 step moved the weights
    plain.load_state_dict(ck["ema"])


def test_max_hours_ends_annealed_on_time_across_a_resume(cache, tmp_path, monkeypatch):
    """A virtual clock: every step takes 1 s, the first step of each process 120 s (a compile). The run is stopped by
    SIGTERM at a step between two log steps and resumed, so the resumed process's first interval is short and holds
    the compile. The LR must still reach ~0 with the budget used: ~(budget - 2 compiles) steps."""
    clock = {"t": 1e6, "steps": 0, "first": True}
    monkeypatch.setattr(train.time, "time", lambda: clock["t"])
    real_step = train.train_step

    def timed_step(*a, **k):
        clock["t"] += 120.0 if clock["first"] else 1.0
        clock["first"] = False
        clock["steps"] += 1
        if clock["steps"] == 301:
            os.kill(os.getpid(), signal.SIGTERM)  # train.main's handler: checkpoint after this step, then return
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", timed_step)
    over = dict(max_steps=100000, max_hours=(600 + 240) / 3600, log_every=10, warmup=5, decay_frac=0.2,
                lr_schedule="wsd", ckpt_every=100000)
    first = train.main(args(cache, tmp_path / "o", **over))
    assert first["step"] == 301
    clock["first"] = True
    out = train.main(args(cache, tmp_path / "o", **over))
    assert 580 <= out["step"] <= 602, out["step"]                  # the budget is used, not cut at the first plan
    assert out["optimizer"].param_groups[0]["lr"] < 0.05 * 1e-3     # and the LR ends annealed


def test_an_encoder_that_cannot_be_loaded_is_a_clear_error(tmp_path):
    (tmp_path / "empty_vae").mkdir()
    r = subprocess.run([sys.executable, "train.py", "--data=shapes:8", f"--cache_dir={tmp_path / 'c'}",
                        f"--vae={tmp_path / 'empty_vae'}", "--text_encoder=tiny", "--resolution=16",
                        f"--out_dir={tmp_path / 'o'}", "--device=cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "cannot load the VAE" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("mean,std", [(0.0, 0.0), (0.5, 1.0), (-1.0, 0.5)])
def test_timesteps_follow_uniform_or_logit_normal(mean, std):
    """step_noise's t against the exact CDF in float64: uniform on 0..T-1, or floor(T * sigmoid(N(mean, std)))."""
    from scipy.stats import norm
    C = SimpleNamespace(**train.parse_args(["--t_logit_mean", str(mean), "--t_logit_std", str(std), "--device", "cpu"]))
    T, d = 1000, train.make_diffusion(C)
    t = torch.cat([train.step_noise(s, 4096, (1, 1, 1), "cpu", C, d)[0] for s in range(50)]).numpy()
    assert t.min() >= 0 and t.max() <= T - 1
    k = np.arange(T - 1, dtype=np.float64)
    edge = (k + 1) / T                                           # P(t <= k) = P(sigmoid(z) < (k + 1) / T)
    cdf = edge if std == 0 else norm.cdf((np.log(edge / (1 - edge)) - mean) / std)
    ecdf = np.searchsorted(np.sort(t), k, side="right") / len(t)
    assert np.abs(ecdf - cdf).max() < 0.01                       # KS distance; ~0.003 expected from 204,800 draws
    torch.testing.assert_close(train.step_noise(7, 64, (1, 1, 1), "cpu", C, d)[0],
                               train.step_noise(7, 64, (1, 1, 1), "cpu", C, d)[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------- Muon

def muon_setup(seed=0):
    torch.manual_seed(seed)
    model = DiT(make_config("DiT-S/2", depth=2, width=64, heads=4, in_channels=3, input_size=8, text_dim=32,
                            pooled_dim=32, text_len=4))
    return model, train.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.999), "muon", 0.02)


def set_grads(model, seed, poison=False):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    if poison:
        train.muon_params(model)[0].grad[0, 0] = float("nan")
        model.final_layer.linear.bias.grad[0] = float("inf")


def test_muon_split_and_one_step_equal_torch_optimizers():
    """Muon gets exactly the blocks' attention/MLP weight matrices; a step of MuonAdamW (found_inf 0) equals
    torch.optim.Muon + fused AdamW stepped on their own over the same split."""
    model, opt = muon_setup()
    muon_ids = {id(p) for p in train.muon_params(model)}
    names = [n for n, p in model.named_parameters() if id(p) in muon_ids]
    assert names and all(n.startswith("blocks.") and n.endswith("weight") and "adaLN" not in n for n in names)
    assert {n.split(".", 2)[2] for n in names} == {"attn.qkv.weight", "attn.proj.weight", "cross_attn.q.weight",
                                                   "cross_attn.kv.weight", "cross_attn.proj.weight", "mlp.0.weight",
                                                   "mlp.2.weight"}
    ref, _ = muon_setup()
    rest = [p for p in ref.parameters() if id(p) not in {id(q) for q in train.muon_params(ref)}]
    ref_muon = torch.optim.Muon(train.muon_params(ref), lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    ref_adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], lr=1e-3)
    for step in range(2):
        set_grads(model, step)
        set_grads(ref, step)
        opt.found_inf = torch.zeros(())
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_muon_non_finite_step_changes_nothing():
    """found_inf = 1 with a NaN gradient: weights, Muon's momentum and AdamW's state and step count stay bitwise."""
    model, opt = muon_setup()
    set_grads(model, 0)
    opt.found_inf = torch.zeros(())
    opt.step()
    before = ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()))
    set_grads(model, 1, poison=True)
    opt.found_inf = torch.ones(())
    opt.step()
    assert tensors_equal(model.state_dict(), before[0])
    assert tensors_equal(opt.state_dict(), before[1])
    set_grads(model, 1)  # and the next good step moves them again
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not tensors_equal(opt.state_dict()["muon"]["state"], before[1]["muon"]["state"])


def test_resume_with_another_optimizer_is_a_clear_error(cache, tmp_path, capsys):
    train.main(args(cache, tmp_path / "o", max_steps=2))
    with pytest.raises(SystemExit) as e:
        train.main(args(cache, tmp_path / "o", max_steps=4, optimizer="muon"))
    assert e.value.code == 2 and "trained with --optimizer adamw" in capsys.readouterr().err


def test_muon_needs_a_torch_that_has_it(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(SystemExit) as e:
        train.main(args(cache, tmp_path / "o", optimizer="muon"))
    assert e.value.code == 2 and "has no torch.optim.Muon" in capsys.readouterr().err


def test_a_routed_run_resumes_unrouted(cache, tmp_path, capsys):
    """TREAD's unrouted finish: the same weights, resumed with route_frac 0 (routing is no part of the model)."""
    train.main(args(cache, tmp_path / "o", max_steps=3, route_frac=0.5, route_from=0, route_to=1))
    assert "8 in blocks 0..0: routing" in capsys.readouterr().out  # 16 tokens, 8 kept
    assert train.main(args(cache, tmp_path / "o", max_steps=5))["step"] == 5


def test_route_until_is_a_routed_run_resumed_unrouted(cache, tmp_path, monkeypatch):
    """route_until 0.5 of 6 steps == 3 routed steps, then a resume with route_frac 0 for the last 3 (bitwise)."""
    saved = keep_checkpoints(monkeypatch)
    routed = dict(max_steps=6, ckpt_every=3, route_frac=0.5, route_from=0, route_to=1)
    train.main(args(cache, tmp_path / "until", route_until=0.5, **routed))
    train.main(args(cache, tmp_path / "routed", **routed))  # routed all the way; its step-3 checkpoint ...
    os.makedirs(tmp_path / "finish")
    shutil.copy(saved["routed", 3], tmp_path / "finish" / "ckpt.pt")
    train.main(args(cache, tmp_path / "finish", **dict(routed, route_frac=0.0)))  # ... finished unrouted
    until, finish, all_routed = (load(saved[run, 6]) for run in ("until", "finish", "routed"))
    for key in ("model", "ema", "optimizer"):
        assert tensors_equal(until[key], finish[key]), key
    assert not tensors_equal(until["model"], all_routed["model"])  # the finish did change the last 3 steps
    assert tensors_equal(load(saved["until", 3])["model"], load(saved["routed", 3])["model"])


# ----------------------------------------------------------------------------- init_from (stages)

@pytest.fixture(scope="module")
def cache32(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "shapes32")
    return datalib.ensure_cache("shapes:32", 32, "none", "tiny", cache_dir=out, device="cpu")


def test_init_from_starts_a_new_run_from_another_resolutions_weights(cache, cache32, tmp_path):
    """A 16 px run, then a 32 px run --init_from it (architecture keys left at their defaults: taken from the
    checkpoint): its first loss is clearly below a from-scratch 32 px run's, it starts at step 0 with a fresh
    optimizer, its positions stay on the 16 px grid, and its checkpoint samples at 32 px."""
    stage1 = dict(max_steps=40, log_every=40, lr=2e-3, warmup=5)
    train.main(args(cache, tmp_path / "s1", **stage1))
    over = dict(resolution=32, max_steps=2, log_every=1, warmup=1000)  # a tiny LR: the first loss is the weights'
    scratch = train.main(args(cache32, tmp_path / "scratch", **over))
    init = train.main(args(cache32, tmp_path / "s2", init_from=tmp_path / "s1" / "ckpt.pt", **over))
    first = lambda d: log_records(tmp_path / d)[0]["loss"]
    assert first("s2") < 0.75 * first("scratch"), (first("s2"), first("scratch"))  # ~0.59 vs ~0.95
    assert init["step"] == 2 and scratch["step"] == 2
    ck = load(tmp_path / "s2" / "ckpt.pt")
    assert ck["config"]["resolution"] == 32 and ck["model_config"]["input_size"] == 16
    assert len(ck["optimizer"]["state"]) > 0 and all(s["step"] == 2 for s in ck["optimizer"]["state"].values())
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "s2" / "ckpt.pt"), "--n", "1",
                        "--steps", "2", "--out", str(tmp_path / "png"), "a red circle"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image
    assert Image.open(tmp_path / "png" / "0000.png").size == (32, 32)


def test_init_from_takes_the_architecture_and_refuses_another(cache, tmp_path, capsys):
    train.main(args(cache, tmp_path / "s1", max_steps=1, depth=3, qk_norm=False, text_len=8))
    ckpt = str(tmp_path / "s1" / "ckpt.pt")
    base = [a for a in args(cache, tmp_path / "s2", max_steps=1) if not a.startswith("--depth")]
    out = train.main(base + [f"--init_from={ckpt}"])  # depth and qk_norm left at their defaults: the checkpoint's
    assert out["model"].config.depth == 3 and out["model"].config.qk_norm is False and out["model"].config.text_len == 8
    for bad, needle in [(["--depth=2"], "--depth 2: the weights of"), (["--text_encoder=none"], "--text_encoder"),
                        (["--text_len=16"], "trained on 8 text tokens"), (["--width=32", "--heads=2"], "--width 32")]:
        with pytest.raises(SystemExit) as e:
            train.main(base + [f"--init_from={ckpt}", f"--out_dir={tmp_path / 'bad'}"] + bad)
        assert e.value.code == 2 and needle in capsys.readouterr().err, bad
    for path in (tmp_path / "missing.pt", tmp_path / "s1" / "log.jsonl"):
        with pytest.raises(SystemExit) as e:
            train.main(base + [f"--init_from={path}", f"--out_dir={tmp_path / 'bad'}"])
        assert e.value.code == 2 and "--init_from" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")


def test_resume_wins_over_init_from(cache, tmp_path, capsys):
    """A crashed stage 2 resumes stage 2; it does not restart from stage 1."""
    train.main(args(cache, tmp_path / "s1", max_steps=2))
    stage2 = args(cache, tmp_path / "s2", init_from=tmp_path / "s1" / "ckpt.pt", max_steps=3)
    train.main(stage2)
    capsys.readouterr()
    os.remove(tmp_path / "s1" / "ckpt.pt")  # stage 1's file is not needed to resume stage 2
    assert train.main(args(cache, tmp_path / "s2", init_from=tmp_path / "s1" / "ckpt.pt", max_steps=5))["step"] == 5
    assert "resumed from" in capsys.readouterr().out


# ----------------------------------------------------------------------------- watching a run

def test_curves_read_the_log_as_the_weights_went(tmp_path):
    """A restart from an earlier checkpoint logs steps again: the later records win; a cut-off line is skipped."""
    import curves
    recs = [{"event": "start", "step": 0}, {"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.9},
            {"step": 30, "loss": 0.8}, {"event": "start", "step": 20}, {"step": 30, "loss": 0.7},
            {"step": 40, "loss": 0.6}, {"event": "eval", "step": 40, "shape_acc": 0.5}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 50, "lo')
    steps, evals = curves.read_log(str(log))
    assert [(r["step"], r["loss"]) for r in steps] == [(10, 1.0), (20, 0.9), (30, 0.7), (40, 0.6)]
    assert evals == [{"event": "eval", "step": 40, "shape_acc": 0.5}]
    curves.plot_curves({"run": str(log)}, str(tmp_path / "c.png"))
    from PIL import Image
    assert Image.open(tmp_path / "c.png").size[0] > 500


def test_checkpoints_redraw_curves_and_loggers_mirror_the_log(cache, tmp_path, monkeypatch):
    """curves.png at every checkpoint; a W&B run (a stand-in module) gets log.jsonl's step records."""
    logged = []
    fake = SimpleNamespace(init=lambda **kw: SimpleNamespace(log=lambda d, step: logged.append((step, d)),
                                                             finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train.main(args(cache, tmp_path / "o", max_steps=4, ckpt_every=2, log_every=2, wandb_project="p"))
    assert os.path.getsize(tmp_path / "o" / "curves.png") > 0
    recs = log_records(tmp_path / "o")
    assert [s for s, _ in logged] == [r["step"] for r in recs] == [2, 4]
    for (_, d), r in zip(logged, recs):
        assert d["loss"] == r["loss"] and d["lr"] == r["lr"] and d["loss_by_t/0"] == r["loss_by_t"][0]


def test_a_missing_logger_package_is_a_clear_error_before_work(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    for over, needle in [(dict(tensorboard=True), "pip install tensorboard"),
                         (dict(wandb_project="p"), "pip install wandb")]:
        with pytest.raises(SystemExit) as e:
            train.main(args(cache, tmp_path / "o", **over))
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_eval_every_logs_probe_records_and_a_failing_eval_only_warns(cache, tmp_path, capsys):
    """Built-in data: the shapes probe on the EMA weights every eval_every steps (and at the end), into log.jsonl
    and curves.png; the record equals evaluate.py's probe on the checkpoint of that step."""
    train.main(args(cache, tmp_path / "o", max_steps=4, ckpt_every=2, eval_every=2, sample_cfg=3.0))
    recs = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["shape_acc"] <= 1 for r in evals)
    r = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(tmp_path / "o" / "ckpt.pt"), "--probe", "shapes",
                        "--probe_n", "1", "--cfg", "3", "--steps", "25", "--out", str(tmp_path / "e.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = json.load(open(tmp_path / "e.json"))["probe_shapes"][0]
    assert (probe["shape_acc"], probe["color_acc"]) == (evals[-1]["shape_acc"], evals[-1]["color_acc"])
    # another data kind with the tiny text tower has no CLIP image tower: one warning, training goes on
    ev = train.Evaluator(SimpleNamespace(eval_every=2, text_encoder="tiny", sample_prompts="a", sample_cfg=3.0,
                                         device="cpu"), SimpleNamespace(manifest={"source_kind": "folder"}))
    assert ev(lambda own: None, 2) is None and not ev.on and "no image tower" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_every_config_file_parses_and_checks(path):
    """configs/*.py (the week's second stage reads the first: `__file__` is set for config files)."""
    C = SimpleNamespace(**train.parse_args([os.path.join(ROOT, "configs", path)]))
    train.check_config(C)
    if path == "rtx5090_week_512.py":
        first = train.parse_args([os.path.join(ROOT, "configs", "rtx5090_week.py")])
        assert C.init_from == os.path.join(first["out_dir"], "ckpt.pt") and C.resolution == 2 * first["resolution"]
        assert C.batch * C.accum == first["batch"] * first["accum"] and C.max_hours + first["max_hours"] == 168
