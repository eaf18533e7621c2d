"""monitor.py: curves.png read as the weights went, the loggers mirror log.jsonl, the preview and the in-run eval
equal sample.py's and evaluate.py's, and a failing one only warns; log.jsonl opens with the environment."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import monitor
import sample
import train
from ckpt_utils import make_tiny_checkpoint
from run_utils import ROOT, args, load, log_records


def parse(argv):
    import config
    return config.parse_args(argv, train.DEFAULTS)


def test_curves_read_the_log_as_the_weights_went(tmp_path):
    """A restart from an earlier checkpoint logs steps again: the later records win; a cut-off line is skipped."""
    recs = [{"event": "start", "step": 0}, {"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.9},
            {"step": 30, "loss": 0.8}, {"event": "start", "step": 20}, {"step": 30, "loss": 0.7},
            {"step": 40, "loss": 0.6}, {"event": "eval", "step": 40, "shape_acc": 0.5}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 50, "lo')
    steps, evals = monitor.read_log(str(log))
    assert [(r["step"], r["loss"]) for r in steps] == [(10, 1.0), (20, 0.9), (30, 0.7), (40, 0.6)]
    assert evals == [{"event": "eval", "step": 40, "shape_acc": 0.5}]
    monitor.plot_curves({"run": str(log)}, str(tmp_path / "c.png"))
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


@pytest.mark.slow
def test_eval_every_logs_probe_records_and_a_failing_eval_only_warns(cache, tmp_path, capsys, monkeypatch):
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
    # an eval that fails (here: the probe raises) is one warning and no more evals; training goes on
    import evaluate
    calls = []
    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(evaluate, "probe_shapes", broken)
    out = train.main(args(cache, tmp_path / "p", max_steps=4, ckpt_every=2, eval_every=2, sample_cfg=3.0))
    assert out["step"] == 4 and len(calls) == 1 and "eval at step 2 failed" in capsys.readouterr().err
    assert not [r for r in log_records(tmp_path / "p") if r.get("event") == "eval"]


def test_the_clip_eval_of_the_tiny_tower_only_warns(cache, tmp_path, capsys):
    """Data other than the built-in sets is scored by CLIP score, with the image tower of the text tower's own
    open_clip model (one load: encoders.ClipScorer.load(text_encoder=...), tests/test_encoders.py); the tiny tower's
    image tower is random, so its score would say nothing: one warning, and no more evals."""
    C = SimpleNamespace(**parse(args(cache, tmp_path / "x", eval_every=2, sample_prompts="a", sample_cfg=3.0)))
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt.pt")
    pipe = sample.load_pipeline(str(ckpt))
    watcher = monitor.Watcher(C, "folder", pipe.model, pipe.diffusion, pipe.text_encoder, str(ckpt))
    assert watcher.evaluate(2) is None and not watcher.evaluating
    assert "no trained image tower" in capsys.readouterr().err


def test_a_failing_sample_grid_costs_no_checkpoint(cache, tmp_path, monkeypatch, capsys):
    """The checkpoint of a step is written before its sample grid, and a grid that fails warns and training goes on."""
    def fail(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(monitor, "generate", fail)
    out = train.main(args(cache, tmp_path / "o", max_steps=6, ckpt_every=2, sample_every=2))
    assert out["step"] == 6 and load(tmp_path / "o" / "ckpt.pt")["step"] == 6
    assert "sample grid at step 2 failed" in capsys.readouterr().err


def test_preview_equals_sample_py_bit_for_bit(cache, tmp_path):
    """The preview at the last step, cell k, is `sample.py --seed k` of prompt k on that step's checkpoint."""
    prompts = ["a red circle on a white background", "a blue square on a black background", "a green triangle"]
    out = tmp_path / "o"
    train.main(args(cache, out, max_steps=3, sample_every=3, sample_cfg=3.0, sample_prompts="|".join(prompts)))
    grid = np.asarray(Image.open(out / "samples" / "0000003.png"))
    cols, cell = 2, 256 + 2  # ceil(sqrt(3)) columns; 16 px images enlarged 16x, 2 px padding
    assert grid.shape == (2 * cell + 2, 2 * cell + 2, 3)
    for k, prompt in enumerate(prompts):
        sample.main(["--ckpt", str(out / "ckpt.pt"), "--device", "cpu", "--seed", str(k), "--n", "1", "--cfg", "3",
                     "--steps", str(sample.STEPS), "--out", str(tmp_path / f"s{k}"), prompt])
        want = np.asarray(Image.open(tmp_path / f"s{k}" / "0000.png"))
        r, c = divmod(k, cols)
        got = grid[2 + r * cell: 2 + r * cell + 256, 2 + c * cell: 2 + c * cell + 256]
        assert np.array_equal(got, np.kron(want, np.ones((16, 16, 1), np.uint8))), k


def test_log_opens_with_the_environment(cache, tmp_path):
    out = tmp_path / "o"
    train.main(args(cache, out, max_steps=2, warmup=1, log_every=1))
    train.main(args(cache, out, max_steps=4, warmup=1, log_every=1))  # a resume appends its own
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    starts = [r for r in recs if r.get("event") == "start"]
    assert recs[0]["event"] == "start" and [r["step"] for r in starts] == [0, 2]
    env = recs[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert env["git_commit"] == (head or "unknown")
    assert env["versions"]["torch"] == torch.__version__  # with its build tag (2.14.1+cu130): it matters to a rerun
    assert set(env["versions"]) == {"python", "torch", "cuda", "diffusers", "open_clip_torch"}
    assert env["command"][0] == "train.py" and "--max_steps=2" in env["command"]
    assert env["config"] == load(out / "ckpt.pt")["config"] | {"max_steps": 2}
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
