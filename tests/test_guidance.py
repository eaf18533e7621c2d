"""scripts/guidance.py: each cell is evaluate.py's probe at that setting and seed, and the table is the mean and
standard error over the seeds (numpy recomputation); bad input exits 2."""
import json
import os
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import evaluate
import guidance
from sample import load_pipeline

CKPT = os.path.join(ROOT, "tests", "fixtures", "behaviour", "ckpt.pt")  # a tiny flow model (tests/fixtures)


def test_cells_are_the_probe_and_the_table_their_mean_and_stderr(tmp_path):
    cells = guidance.main(["--ckpt", CKPT, "--cfg", "2,4", "--steps", "3", "--seeds", "0,1", "--probe_n", "1",
                           "--methods", "cfg,interval,zero_star", "--out", str(tmp_path)])
    assert [(c["method"], c["cfg"], c["seed"]) for c in cells] == [
        (m, cfg, s) for m in ("cfg", "interval", "zero_star") for cfg in (2.0, 4.0) for s in (0, 1)]
    assert {c["method"]: c["guidance"] for c in cells} == {"cfg": {}, "interval": {"cfg_interval": (0.2, 0.85)},
                                                           "zero_star": {"cfg_zero_star": True}}
    pipe = load_pipeline(CKPT, "cpu")
    for c in cells[::3]:  # the probe at that setting, seed s drawing from s x 10^6
        want = evaluate.probe_shapes(pipe, cfg=c["cfg"], n_per_prompt=1, steps=3, seed=c["seed"] * 10 ** 6,
                                     guidance=c["guidance"])
        assert (c["shape_acc"], c["color_acc"]) == (want["shape_acc"], want["color_acc"]), c
    md = (tmp_path / "guidance.md").read_text()
    for metric in ("shape_acc", "color_acc"):
        for m in ("cfg", "interval", "zero_star"):
            v = [np.array([c[metric] for c in cells if c["method"] == m and c["cfg"] == cfg]) for cfg in (2.0, 4.0)]
            row = f"| {m} | 3 | " + " | ".join(f"{x.mean():.3f} ± {x.std(ddof=1) / np.sqrt(2):.3f}" for x in v) + " |"
            assert row in md.split(f"{metric}:")[1].split(":\n")[0], (row, md)
    assert json.loads((tmp_path / "guidance.json").read_text())["cells"] == json.loads(json.dumps(cells))


V_CKPT = os.path.join(ROOT, "tests", "fixtures", "ckpt_35ae683.pt")  # a v-prediction model


@pytest.mark.parametrize("bad", [["--cfg", "1"], ["--steps", "1"], ["--methods", "cfg,pag"], ["--seeds", "a"],
                                 ["--seeds", "0,0"], ["--cfg", "3,3"], ["--apg", "-1"], ["--interval", "0.9,0.1"],
                                 ["--ckpt", V_CKPT, "--methods", "cfg,zero_star"], ["--ckpt", "missing.pt"]])
def test_bad_input_exits_2_before_any_sampling(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        guidance.main(["--ckpt", CKPT, "--out", str(tmp_path), *bad])
    assert e.value.code == 2 and not os.listdir(tmp_path)
    assert "Error" not in capsys.readouterr().err.splitlines()[-1]  # argparse's one line, not a traceback


@pytest.mark.parametrize("probe,wide,long", [("scenes", False, False), ("scenes_wide", True, False),
                                             ("scenes_wide_long", True, True)])
def test_a_scenes_probe_cell_calls_evaluates_probe_of_that_name(probe, wide, long, monkeypatch):
    """Each scenes probe name reaches evaluate.probe_scenes as evaluate.py's CLI sends it (run_scenes_probe)."""
    seen = {}
    monkeypatch.setattr(evaluate, "probe_scenes", lambda pipe, **kw: seen.update(kw) or {})
    args = types.SimpleNamespace(probe=probe, probe_n=2, batch=8)
    guidance.probe(None, args, 3.0, 5, 7, {})
    assert (seen["wide"], seen["long"], seen["cfg"], seen["steps"], seen["seed"]) == (wide, long, 3.0, 5, 7)
