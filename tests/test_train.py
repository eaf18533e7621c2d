"""train.py: the loop learns, and it is exact: resume equals no resume, accumulation and DDP equal one big batch,
the same command gives today's checkpoint and images (tests/fixtures/behaviour); signals, NaN steps, time budgets,
routing."""
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

import config
import data as datalib
import optim
import train
from diffusion import Diffusion
from loader import Loader
from run_utils import ROOT, args, keep_checkpoints, load, log_records, old_layout, tensors_equal


def parse(argv):
    return config.parse_args(argv, train.DEFAULTS)


@pytest.mark.slow
def test_overfits_four_examples(tmp_path):
    c4 = datalib.ensure_cache("shapes:4", 16, "none", "tiny", cache_dir=str(tmp_path / "c4"), device="cpu")
    out = train.main(args(c4, tmp_path / "o", prediction="eps", optimizer="adamw", cond_drop=0, flip=False,
                          lr=2e-3, warmup=20, max_steps=300, log_every=20, lr_schedule="constant", width=96))
    recs = log_records(tmp_path / "o")
    assert out["step"] == 300 and out["skipped"] == 0
    first, last = recs[0]["loss"], min(r["loss"] for r in recs[-3:])
    assert last < first / 10, (first, last)


LEVERS = [dict(cfm_weight=0.3), dict(disp_weight=0.5, disp_block=0), dict(sra_weight=0.5, sra_gap=0.5)]


@pytest.mark.parametrize("over", [{}, dict(optimizer="adamw", prediction="v", t_logit_std=0.0, min_snr_gamma=5),
                                  dict(route_frac=0.5, route_from=0, route_to=1), *LEVERS])
def test_resume_is_exact(cache, tmp_path, monkeypatch, over):
    """12 steps in one run == 6 steps, a restart from that checkpoint, 6 more (weights, EMA, optimizer, loader; SRA's
    head); with a training lever on, its term is logged beside the loss."""
    saved = keep_checkpoints(monkeypatch)
    run = dict(max_steps=12, ckpt_every=6, noise_offset=0.1, input_perturbation=0.1, **over)
    train.main(args(cache, tmp_path / "a", **run))
    assert sorted(saved) == [("a", 6), ("a", 12)]
    os.makedirs(tmp_path / "b")
    shutil.copy(saved["a", 6], tmp_path / "b" / "ckpt.pt")  # as if the first run had been killed right after step 6
    out = train.main(args(cache, tmp_path / "b", **run))
    assert out["step"] == 12 and sorted(saved) == [("a", 6), ("a", 12), ("b", 12)]
    a, b = load(saved["a", 12]), load(saved["b", 12])
    assert ("sra_head" in a) == ("sra_weight" in over) and a.keys() == b.keys()
    for key in ("model", "ema", "optimizer", "loader_state", "step", *(["sra_head"] if "sra_head" in a else [])):
        assert tensors_equal(a[key], b[key]), key
    assert not tensors_equal(load(saved["a", 6])["model"], a["model"])  # and training did move the weights
    terms = {name for name in ("cfm", "disp", "sra") if f"{name}_weight" in over}
    assert all(terms <= rec.keys() and not {"cfm", "disp", "sra"} - terms & rec.keys() for rec in log_records(
        tmp_path / "b"))


def muon_tolerances(model):
    """{parameter name: atol} for comparing two runs of ONE step: 1e-6 (fp32 sums in another order), but Muon's
    Newton-Schulz runs in bfloat16 (torch.optim.Muon), so gradients equal to fp32 rounding give updates equal to
    a few bf16 ulps: 4e-4 = 2^-6 of the largest step (muon_lr 0.02 x sqrt(2) for the 2W x W kv, warmup 1/3)."""
    muon = {id(p) for p in optim.muon_params(model)}
    return {n: 4e-4 if id(p) in muon else 1e-6 for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer,steps,over", [("adamw", 3, {}), ("muon", 1, {}),
                                                  ("adamw", 3, dict(sra_weight=0.5, sra_gap=0.5))])
def test_accumulation_is_exact(cache, tmp_path, optimizer, steps, over):
    """micro-batch 8 x accum 1 == micro-batch 4 x accum 2 (fp32); SRA's term is a mean over samples, so with it too
    (CFM and the dispersive loss are per micro-batch: test_levers_per_micro_batch_ddp_equals_accumulation)."""
    one = train.main(args(cache, tmp_path / "a", batch=8, accum=1, max_steps=steps, grad_clip=0.5, optimizer=optimizer,
                          **over))
    two = train.main(args(cache, tmp_path / "b", batch=4, accum=2, max_steps=steps, grad_clip=0.5, optimizer=optimizer,
                          **over))
    atol = muon_tolerances(one["model"]) if optimizer == "muon" else {}
    for (name, p), q in zip(one["model"].named_parameters(), two["model"].parameters()):
        torch.testing.assert_close(p, q, atol=atol.get(name, 1e-6), rtol=0, msg=name)


@pytest.mark.slow
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


@pytest.mark.slow
def test_levers_per_micro_batch_ddp_equals_accumulation(cache, tmp_path):
    """CFM and the dispersive loss contrast the samples of one micro-batch, so their invariant is 1 process x accum 2
    == 2 gloo ranks x accum 1 at the same micro-batch (the same samples and draws in each); SRA on too: its head,
    outside DDP's module, has its gradients averaged over the ranks by hand. The logged terms agree as well."""
    over = dict(batch=4, max_steps=3, optimizer="adamw", cfm_weight=0.3, disp_weight=0.5, disp_block=0,
                sra_weight=0.5, sra_gap=0.5, log_every=1)
    train.main(args(cache, tmp_path / "one", accum=2, **over))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *args(cache, tmp_path / "two", accum=1, **over)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = load(tmp_path / "one" / "ckpt.pt"), load(tmp_path / "two" / "ckpt.pt")
    assert one["step"] == two["step"] == 3
    for key in ("model", "sra_head"):
        for name, p in one[key].items():
            torch.testing.assert_close(two[key][name], p, atol=1e-5, rtol=0, msg=f"{key}.{name}")
    for a, b in zip(log_records(tmp_path / "one"), log_records(tmp_path / "two"), strict=True):
        for key in ("loss", "cfm", "disp", "sra"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_lever_draws_come_after_todays_and_weight_0_draws_none():
    """step_noise with the levers on: today's t, noise, offset, perturbation and routing scores bitwise, then CFM's
    and SRA's U(0, 1) from the same generator; with them off, nothing more is drawn."""
    d = Diffusion(prediction="flow")
    base = SimpleNamespace(seed=3, t_logit_mean=0.0, t_logit_std=1.0, noise_offset=0.1, input_perturbation=0.1,
                           route_frac=0.5, cfm_weight=0.0, sra_weight=0.0)
    on = SimpleNamespace(**{**vars(base), "cfm_weight": 0.1, "sra_weight": 0.2})
    today = train.step_noise(5, 8, (3, 4, 4), "cpu", base, d, 16)
    levers = train.step_noise(5, 8, (3, 4, 4), "cpu", on, d, 16)
    assert today[5:] == (None, None) and all(torch.equal(a, b) for a, b in zip(today[:5], levers[:5]))
    g = torch.Generator().manual_seed(3 * 1_000_003 + 5)
    d.draw_t(8, g, "cpu", 0.0, 1.0)
    for shape in ((8, 3, 4, 4), (8, 3, 1, 1), (8, 3, 4, 4)):
        torch.randn(shape, generator=g)
    torch.rand((8, 16), generator=g)
    assert torch.equal(levers[5], torch.rand(8, generator=g)) and torch.equal(levers[6], torch.rand(8, generator=g))


@pytest.mark.parametrize("first,then", [(0.0, 0.5), (0.5, 0.0)])
def test_a_resume_that_switches_sra_on_or_off_is_refused(cache, tmp_path, capsys, first, then):
    train.main(args(cache, tmp_path / "o", max_steps=2, sra_weight=first))
    with pytest.raises(SystemExit) as e:
        train.main(args(cache, tmp_path / "o", max_steps=4, sra_weight=then))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"trained with SRA {'on' if first else 'off'}: a resume cannot switch it" in err


@pytest.mark.slow
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
    assert not os.path.exists(str(out / "ckpt.pt") + ".part")  # checkpoint.atomic_write's temporary name
    res = train.main(args(cache, out, max_steps=ck["step"] + 2))
    assert res["step"] == ck["step"] + 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_nan_step_is_skipped_and_counted(cache, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(cache, poisoned)
    lat = np.load(poisoned / "latents.npy", mmap_mode="r+")  # the cache's latents (N, 2, C, h, w)
    lat[5] = np.nan  # both flips of sample 5
    lat.flush()
    steps = 12
    # how many of the run's optimizer steps see the poisoned sample (the loader order is deterministic)
    loader = Loader(datalib.LatentCache(str(poisoned)), 4, seed=1, cond_drop=0.2)
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
        loss, t, norm, found_inf, terms = real_step(*a, **k)
        return loss, t, norm, torch.ones_like(found_inf) if len(calls) <= 3 else found_inf, terms

    monkeypatch.setattr(train, "train_step", flaky_step)
    with pytest.raises(SystemExit) as e:
        train.main(args(cache, tmp_path / "o", max_steps=20, log_every=5, max_bad_steps=3))
    assert e.value.code == 1 and len(calls) == 5
    assert "3 non-finite steps in a row by step 5" in capsys.readouterr().err
    calls.clear()  # the same 3 bad steps under max_bad_steps 4: the run goes on
    assert train.main(args(cache, tmp_path / "p", max_steps=6, log_every=5, max_bad_steps=4))["step"] == 6


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_an_fp8_model_trains_and_its_checkpoint_loads_without_torchao(tmp_path, monkeypatch):
    """build_model with fp8 swaps the blocks' linears (where torchao is installed; its float8 matmuls also run on the
    CPU), and one train_step moves the weights; the checkpoint holds nn.Linear's keys and plain tensors, so that
    sample.py's reader and a plain DiT load it in a process where torchao cannot be imported."""
    pytest.importorskip("torchao.float8")
    import itertools
    import contextlib
    import checkpoint
    import monitor
    from model import DiT, DiTConfig
    C = SimpleNamespace(**parse(args("shapes", tmp_path / "o", fp8=True, batch=2)))  # parsed, unchecked
    te = SimpleNamespace(dim=32, pooled_dim=24)
    model, ema, optimizer, diffusion, _ = train.build_model(C, (3, 16, 16), te)
    assert sum(type(m).__name__ == "Float8Linear" for m in model.modules()) == 7 * 2
    assert "14 block linears in fp8" in monitor.describe(C, model, (3, 16, 16), 16, 32, 2, 1)
    g = torch.Generator().manual_seed(0)
    loader = itertools.repeat({"latents": torch.randn(2, 3, 16, 16, generator=g),
                               "states": torch.randn(2, 77, 32, generator=g),
                               "pooled": torch.randn(2, 24, generator=g)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rand = train.step_noise(0, 2, (3, 16, 16), "cpu", C, diffusion, tokens=16)
    train.train_step(model, optimizer, diffusion, loader, None, rand, 1e-3, C, contextlib.nullcontext())
    train.ema_update(list(ema.parameters()), list(model.parameters()), 0, 0.5)
    state = checkpoint.checkpoint_state(C, model, ema, optimizer, SimpleNamespace(state_dict=lambda: {}), 1, 1.0, 6)
    checkpoint.save_checkpoint(str(tmp_path / "ckpt.pt"), state)
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    ck = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ck["model"].keys() == before.keys() == ck["ema"].keys()
    plain = DiT(DiTConfig(**ck["model_config"]))
    plain.load_state_dict(ck["model"])
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
    assert any(not torch.equal(ck["model"][k], before[k]) for k in before)  # the fp8 step moved the weights
    plain.load_state_dict(ck["ema"])


@pytest.mark.slow
def test_max_hours_ends_annealed_on_time_across_a_resume(cache, tmp_path, monkeypatch):
    """A virtual clock: every step takes 1 s, the first step of each process 120 s (a compile). The run is stopped by
    SIGTERM at a step between two log steps and resumed, so the resumed process's first interval is short and holds
    the compile. The LR must still reach ~0 with the budget used: ~(budget - 2 compiles) steps."""
    clock = {"t": 1e6, "steps": 0, "first": True}
    monkeypatch.setattr(time, "time", lambda: clock["t"])
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


@pytest.mark.slow
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
    C = SimpleNamespace(**parse(["--t_logit_mean", str(mean), "--t_logit_std", str(std), "--device", "cpu",
                                 "--prediction", "v"]))  # (flow's law: tests/test_diffusion.py)
    T, d = 1000, Diffusion.from_config(vars(C))
    t = torch.cat([train.step_noise(s, 4096, (1, 1, 1), "cpu", C, d)[0] for s in range(50)]).numpy()
    assert t.min() >= 0 and t.max() <= T - 1
    k = np.arange(T - 1, dtype=np.float64)
    edge = (k + 1) / T                                           # P(t <= k) = P(sigmoid(z) < (k + 1) / T)
    cdf = edge if std == 0 else norm.cdf((np.log(edge / (1 - edge)) - mean) / std)
    ecdf = np.searchsorted(np.sort(t), k, side="right") / len(t)
    assert np.abs(ecdf - cdf).max() < 0.01                       # KS distance; ~0.003 expected from 204,800 draws
    torch.testing.assert_close(train.step_noise(7, 64, (1, 1, 1), "cpu", C, d)[0],
                               train.step_noise(7, 64, (1, 1, 1), "cpu", C, d)[0], rtol=0, atol=0)


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


def test_same_command_same_checkpoint_and_images(tmp_path):
    """tests/fixtures/behaviour: a tiny run with every key given explicitly, and sample.py's images of it, written by
    the code before the one-concern-per-file move (commit 09d23ab). The same command today gives the same
    checkpoint (model, EMA, optimizer, loader, RNG, config) and the same images: bitwise against the fixture made
    with this torch on this CPU kind (capability and vendor: make_behaviour.KINDS), else close to the first one:
    other kernels sum in another order, and Muon's orthogonalisation lifts that rounding in the near-zero singular
    directions of the zero-initialised projections' first gradients to whole updates (4.3e-3 at most on an AMD
    EPYC against the Intel Xeon's fixture, weights ~0.2), while the images stay within one level."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
    import make_behaviour as fixture
    here = (torch.__version__, torch.backends.cpu.get_cpu_capability(), fixture.cpu_vendor())
    made = {d: json.load(open(os.path.join(d, "made_with.json"))) for d in fixture.KINDS}
    kind = [d for d, m in made.items() if (m["torch"], m["cpu_capability"], m["cpu_vendor"]) == here]
    same_kernels = bool(kind)
    out = kind[0] if kind else fixture.OUT
    atol = 0.0 if same_kernels else 1e-2
    train.main(fixture.argv(str(tmp_path)))
    ckpt = os.path.join(tmp_path, "run", "ckpt.pt")
    got, want = load(ckpt), load(os.path.join(out, "ckpt.pt"))
    assert got.keys() == want.keys()  # the training levers off: no SRA head, nothing new in the checkpoint
    for key in ("model", "ema", "optimizer", "step", "model_config", "loader_state", "rng"):
        assert tensors_equal(got[key], want[key], atol=atol if key != "rng" else 0.0), key
    new = set(got["config"]) - set(want["config"]) - {"out_dir", "cache_dir"}  # keys added since: at their defaults
    assert {k: got["config"][k] for k in want["config"]} == want["config"]
    assert {k: got["config"][k] for k in new} == {k: train.DEFAULTS[k] for k in new}
    images = fixture.images(ckpt)
    expected = torch.load(os.path.join(out, "images.pt"))
    assert torch.equal(images, expected) if same_kernels else (images.int() - expected.int()).abs().max() <= 1


def test_the_first_progress_line_of_a_time_budget_says_its_eta(cache, tmp_path, capsys):
    """A max_hours run plans its horizon from its second log step on; its first line's eta is already bounded by
    the budget (it said 2.89 h in a 0.155 h run)."""
    train.main(args(cache, tmp_path / "o", max_steps=100_000, max_hours=0.0005, log_every=2))
    recs = log_records(tmp_path / "o")
    assert recs[0]["eta_h"] <= 0.0005 and all(r["eta_h"] <= 0.0005 for r in recs)


@pytest.mark.slow
def test_the_demo_config_follows_prompts(tmp_path):
    """configs/shapes.py as it is, budgeted in steps instead of the README's 0.155 h (so a slow machine trains the
    same model): 1,200 steps (~3 min on 2 cores) -> sample.py -> evaluate.py's probe. The model must follow both
    colour and shape far above chance (1/6, 1/3): 0.96 / 0.56 here at CFG 3, 108 samples (+-0.05), 2026-12-04."""
    from evaluate import probe_shapes
    from sample import load_pipeline
    from toys import SHAPE_KINDS
    out = train.main([os.path.join(ROOT, "configs", "shapes.py"), f"--out_dir={tmp_path / 'run'}",
                      f"--cache_dir={tmp_path / 'cache'}", "--max_hours=0", "--max_steps=1200", "--log_every=100"])
    assert out["step"] == 1200 and out["skipped"] == 0
    result = probe_shapes(load_pipeline(str(tmp_path / "run" / "ckpt.pt"), device="cpu"), cfg=3.0, n_per_prompt=2,
                          steps=20, seed=0)
    assert result["color_acc"] >= 0.8 and result["shape_acc"] >= 1 / len(SHAPE_KINDS) + 0.12, result


##### aspect buckets, several captions, long captions through the command line

def test_a_bucketed_run_resumes_exactly_and_samples_any_size(mixed, tmp_path, monkeypatch, capsys):
    """A mixed-aspect imagefolder (1:1, 2:1, 1:2, odd sizes) in 5 buckets with several captions, accumulation,
    flips and routing: 12 steps == 6 + resume + 6 (weights, EMA, optimizer, loader); its EMA starts another bucketed
    run (init_from); sample.py --size writes non-square PNGs from it."""
    saved = keep_checkpoints(monkeypatch)
    run = dict(data=mixed, aspect_buckets=5, text_chunks=1, max_steps=12, ckpt_every=6, flip=True, accum=2,
               route_frac=0.5, route_from=0, route_to=1)
    train.main(args(mixed, tmp_path / "a", **run))
    assert "buckets: 12x24 (8), 12x20 (8), 16x16 (8), 20x12 (8), 24x12 (16)" in capsys.readouterr().out
    os.makedirs(tmp_path / "b")
    shutil.copy(saved["a", 6], tmp_path / "b" / "ckpt.pt")
    train.main(args(mixed, tmp_path / "b", **run))
    a, b = load(saved["a", 12]), load(saved["b", 12])
    for key in ("model", "ema", "optimizer", "loader_state", "step"):
        assert tensors_equal(a[key], b[key]), key
    stage = train.main(args(mixed, tmp_path / "c", aspect_buckets=5, init_from=str(tmp_path / "a" / "ckpt.pt"),
                            max_steps=2))
    assert stage["step"] == 2  # init_from: its EMA weights start a new bucketed run
    import sample
    out = tmp_path / "png"
    sample.main(["--ckpt", str(tmp_path / "a" / "ckpt.pt"), "--size", "24x12", "--steps", "2", "--n", "2",
                 "--device", "cpu", "--out", str(out), "a picture number 3"])
    from PIL import Image
    assert Image.open(out / "0000.png").size == (24, 12)
    with pytest.raises(SystemExit) as e:  # 22 is no multiple of the patch (4)
        sample.main(["--ckpt", str(tmp_path / "a" / "ckpt.pt"), "--size", "22x12", "--out", str(out), "x"])
    assert e.value.code == 2


def test_the_step_noise_of_a_bucket_is_the_largest_buckets_cut(mixed):
    """Unbucketed, fit_noise hands back the drawn noise bitwise; bucketed, each micro-batch's noise is the first
    h * w values of each channel of the noise drawn for the largest bucket (a function of (seed, step) alone)."""
    noise = torch.randn(4, 3, 16, 16)
    assert torch.equal(train.fit_noise(noise, torch.zeros(4, 3, 16, 16)), noise)
    wide = torch.randn(4, 3, 288)  # 24 x 12 latents: the largest bucket of `mixed`
    cut = train.fit_noise(wide, torch.zeros(4, 3, 20, 12))
    assert cut.shape == (4, 3, 20, 12) and torch.equal(cut.flatten(2), wide[..., :240])


@pytest.mark.slow
def test_bucketed_ddp_equals_one_process(mixed, tmp_path):
    """2 gloo ranks x micro-batch 4 == 1 process x micro-batch 8 on a bucketed cache: the ranks draw the same bucket
    at every micro-step (else a shape mismatch or a hang) and together the single process's global batch."""
    run = dict(aspect_buckets=5, max_steps=3, optimizer="adamw")
    single = train.main(args(mixed, tmp_path / "one", batch=8, **run))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *args(mixed, tmp_path / "two", batch=4, **run)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = load(tmp_path / "two" / "ckpt.pt")
    for name, p in single["model"].state_dict().items():
        torch.testing.assert_close(ddp["model"][name], p, atol=1e-5, rtol=0, msg=name)


def test_text_chunks_train_and_sample_with_long_captions(tmp_path):
    """text_chunks 2 through the command line: a cache of 154-token rows, the DiT cross-attends to all 154 states
    (text_len 0), and sample.py encodes a prompt the same way from the checkpoint's config."""
    from encoders import load_text_encoder
    c2 = datalib.ensure_cache("scenes_wide2:16", 40, "none", "tiny", cache_dir=str(tmp_path / "c"), text_chunks=2)
    assert datalib.LatentCache(c2).tokens.shape == (32, 154)
    out = train.main(args(c2, tmp_path / "o", resolution=40, text_chunks=2, max_steps=2))
    assert out["model"].config.text_len == 154
    ckpt = load(tmp_path / "o" / "ckpt.pt")
    assert ckpt["config"]["text_chunks"] == 2 and ckpt["model_config"]["text_len"] == 154
    import sample
    pipe = sample.load_pipeline(str(tmp_path / "o" / "ckpt.pt"))
    te = load_text_encoder("tiny", chunks=2)
    states, _ = sample.encode_text(pipe, ["a red circle " * 40])
    assert torch.equal(states, te(["a red circle " * 40])[0])
    with pytest.raises(SystemExit):  # the cache's chunks must be the run's
        train.main(args(c2, tmp_path / "p", resolution=40, text_chunks=1, max_steps=1))


def test_bucketed_accumulation_is_exact(mixed, tmp_path):
    """With buckets an optimizer step's images come from one bucket, so micro-batch 8 x accum 1 == micro-batch 4 x
    accum 2 as without buckets (fp32, AdamW)."""
    run = dict(aspect_buckets=5, max_steps=3, grad_clip=0.5, optimizer="adamw")
    one = train.main(args(mixed, tmp_path / "a", batch=8, accum=1, **run))
    two = train.main(args(mixed, tmp_path / "b", batch=4, accum=2, **run))
    for (name, p), q in zip(one["model"].named_parameters(), two["model"].parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_a_cache_from_before_buckets_trains_as_the_same_cache_today(cache, tmp_path):
    """A cache without bucket.npy / ncaptions.npy and the manifest keys of buckets and captions (every cache built
    before them) trains bitwise as the same cache with them: one square bucket, one caption an image."""
    old = str(tmp_path / "old")
    shutil.copytree(cache, old)
    old_layout(old)
    a = train.main(args(cache, tmp_path / "a", max_steps=3, flip=True))
    b = train.main(args(old, tmp_path / "b", max_steps=3, flip=True))
    assert tensors_equal(a["model"].state_dict(), b["model"].state_dict())
    assert tensors_equal(a["optimizer"].state_dict(), b["optimizer"].state_dict())
