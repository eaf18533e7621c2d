"""checkpoint.py: one writer (atomic, the known layout) and one reader; a checkpoint is never overwritten by another
run, a foreign or truncated one is a clear error, an earlier version's resumes and samples; resume takes this run's
optimizer settings; init_from starts a new stage from another run's weights."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import sample
import train
from run_utils import ROOT, args, load, log_records, tensors_equal

# written by train.py at commit 35ae683 (before one reader/writer): the args below with max_steps=2, data shapes:32
OLD_CKPT = os.path.join(ROOT, "tests", "fixtures", "ckpt_35ae683.pt")
OLD_ARGS = dict(vae="none", text_encoder="tiny", resolution=16, model="DiT-S/2", depth=1, width=16, heads=1,
                patch=4, batch=4, lr=1e-3, warmup=1, log_every=1, sample_every=0, compile=False, device="cpu",
                ema_decay=0.9, cond_drop=0.2, seed=1, flip=True, min_snr_gamma=5.0, prediction="v", optimizer="adamw",
                t_logit_std=0.0, aspect_buckets=0)  # the old code's defaults, which the fixture was trained with


def argv(cache, out_dir, **over):
    return [f"--{k}={v}" for k, v in {**OLD_ARGS, "data": cache, "out_dir": str(out_dir), **over}.items()]


def test_the_writer_refuses_a_layout_it_does_not_know(tmp_path):
    ck = {k: {} for k in checkpoint.CHECKPOINT_KEYS}
    with pytest.raises(ValueError, match="missing \\['progress'\\]"):
        checkpoint.save_checkpoint(str(tmp_path / "a.pt"), {k: v for k, v in ck.items() if k != "progress"})
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        checkpoint.save_checkpoint(str(tmp_path / "b.pt"), {**ck, "extra": 1})
    assert not os.listdir(tmp_path)
    checkpoint.save_checkpoint(str(tmp_path / "c.pt"), ck)
    assert load(tmp_path / "c.pt") == ck and os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.slow
def test_a_checkpoint_of_an_earlier_version_resumes_and_samples(cache, tmp_path):
    """The fixture (2 steps, old code) equals 2 steps of this code; resumed to 4 it equals 4 steps in one run; and
    it samples the images that this code's own 2-step checkpoint samples."""
    new = tmp_path / "new2"
    train.main(argv(cache, new, max_steps=2))
    old, mine = load(OLD_CKPT), load(new / "ckpt.pt")
    assert set(old) == set(checkpoint.CHECKPOINT_KEYS) and old["step"] == 2
    for key in ("model", "ema"):
        for name, v in old[key].items():
            torch.testing.assert_close(mine[key][name], v, rtol=0, atol=1e-6)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "ckpt.pt").write_bytes(open(OLD_CKPT, "rb").read())
    assert train.main(argv(cache, resumed, max_steps=4))["step"] == 4
    one_run = train.main(argv(cache, tmp_path / "one", max_steps=4))
    got = load(resumed / "ckpt.pt")
    for name, v in one_run["model"].state_dict().items():
        torch.testing.assert_close(got["model"][name], v, rtol=0, atol=1e-5)
    prompts, seeds = ["a red circle on a white background", "a green triangle"], [0, 1]
    images = [sample.generate(sample.load_pipeline(p, "cpu"), prompts, seeds, cfg=3.0, steps=10)
              for p in (OLD_CKPT, str(new / "ckpt.pt"))]
    assert (images[0].int() - images[1].int()).abs().max() <= 1


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
    """optimizer.load_state_dict restores the saved betas, weight decay and Muon's LR share: the resumed run's own
    settings win."""
    train.main(args(cache, tmp_path / "o", max_steps=2))
    out = train.main(args(cache, tmp_path / "o", max_steps=4, weight_decay=0.1, adam_beta2=0.95, muon_lr=0.01))
    decay, no_decay, muon = out["optimizer"].param_groups
    assert muon["weight_decay"] == 0.1 and muon["lr_scale"] == 0.01 / 1e-3
    assert decay["betas"] == (0.9, 0.95) and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_resume_with_another_optimizer_is_a_clear_error(cache, tmp_path, capsys):
    train.main(args(cache, tmp_path / "o", max_steps=2, optimizer="adamw"))
    with pytest.raises(SystemExit) as e:
        train.main(args(cache, tmp_path / "o", max_steps=4, optimizer="muon"))
    assert e.value.code == 2 and "trained with --optimizer adamw" in capsys.readouterr().err


@pytest.mark.slow
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
    adamw = ck["optimizer"]["adamw"]  # Muon's state has no step count; AdamW's says the optimizer is fresh
    assert len(adamw["state"]) > 0 and all(s["step"] == 2 for s in adamw["state"].values())
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


def test_init_from_checks_lever_blocks_against_the_inherited_depth(cache, tmp_path, capsys):
    """A 13-block checkpoint (DiT-S's default is 12): blocks 12 are valid once its depth is inherited, and a block
    beyond it is refused with one line, exit 2, before any work."""
    train.main(args(cache, tmp_path / "s1", max_steps=1, depth=13))
    base = [a for a in args(cache, tmp_path / "s2", max_steps=1, disp_weight=0.5, sra_weight=0.5, sra_block=0)
            if not a.startswith("--depth")] + [f"--init_from={tmp_path / 's1' / 'ckpt.pt'}"]
    out = train.main(base + ["--disp_block=12", "--sra_target_block=12"])
    assert out["model"].config.depth == 13 and out["step"] == 1
    with pytest.raises(SystemExit) as e:
        train.main(base + ["--disp_block=13", f"--out_dir={tmp_path / 'bad'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--disp_block 13: beyond the depth 13" in err and len(err.splitlines()) == 1, err
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


def test_a_resume_keeps_the_keys_its_command_line_does_not_set(cache, tmp_path, capsys):
    """A run begun under other defaults (square crops, v, AdamW, uniform t: those before 2026-12) resumes as it
    began when its command line leaves those keys out, and equals the same run made in one go; a key the command
    line sets wins, and a --prediction other than the checkpoint's is refused."""
    began = dict(aspect_buckets=0, prediction="v", optimizer="adamw", t_logit_std=0.0, cond_drop=0.1)
    train.main(args(cache, tmp_path / "r", max_steps=2, **began))
    capsys.readouterr()
    plain = [a for a in args(cache, tmp_path / "r", max_steps=4) if not a.startswith(("--aspect_buckets", "--cond"))]
    with pytest.raises(SystemExit) as e:
        train.main(plain + ["--prediction=flow"])
    assert e.value.code == 2 and "trained with --prediction v: a resume cannot change it" in capsys.readouterr().err
    resumed = train.main(plain + ["--cond_drop=0.1"])
    out = capsys.readouterr().out
    for kept in ("--prediction v", "--optimizer adamw", "--aspect_buckets 0", "--t_logit_std 0.0"):
        assert kept in out.split("where the command line sets none: ")[1].splitlines()[0], out
    assert "--cond_drop" not in out  # set on the command line (to the checkpoint's value: nothing to say)
    one = train.main(args(cache, tmp_path / "one", max_steps=4, **began))
    assert resumed["step"] == 4 and tensors_equal(resumed["model"].state_dict(), one["model"].state_dict())
    train.main(plain + ["--cond_drop=0.3", "--max_steps=5"])
    starts = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl") if '"event": "start"' in line]
    assert [r["config"]["cond_drop"] for r in starts] == [0.1, 0.1, 0.3]  # the command line's key wins
    assert {r["config"]["prediction"] for r in starts} == {"v"}
