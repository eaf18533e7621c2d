"""scripts/ablate.py: one real two-row, two-seed ablation at equal FLOPs (tiny pixel-space models on the CPU), its
table against a numpy recomputation, the FLOPs against train.py's, resuming, and bad input."""
import json
import math
import os
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import ablate
import train
from encoders import load_text_encoder
from model import DiT, DiTConfig, config_from_keys, train_flops

# square crops: one cache (--cache_dir below) serves every row's patch
TINY = ("--vae none --text_encoder tiny --resolution 16 --model DiT-S/2 --depth 1 --width 32 --heads 2 --patch 4 "
        "--batch 4 --compile false --device cpu --sample_every 0 --data shapes:32 --aspect_buckets 0")
LEARN = "--lr 3e-3 --warmup 1"  # the models move in their few steps: the seeds' probe numbers differ
ROWS = """# two widths at equal FLOPs, and a row whose training fails
narrow:                               # the base as it is
wide: --width 128 --patch 2           # ~28x the FLOPs per image: far fewer steps
broken: --data /nonexistent/folder    # passes train.py's argument checks, fails when it opens the data
"""
FLOPS = 1.05e9  # narrow: 56 steps of 4.7 MFLOP/img x 4; wide: 2 steps of 131 MFLOP/img x 4
PROBE = ["--cfg", "1", "--probe_n", "1", "--eval_steps", "2"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """The one real ablation of this file: 4 trainings + 4 probes (+ 2 trainings that fail at once)."""
    tmp = tmp_path_factory.mktemp("ablate")
    (tmp / "rows.txt").write_text(ROWS)
    argv = [str(tmp / "rows.txt"), "--base", f"{TINY} {LEARN} --cache_dir {tmp / 'cache'}", "--flops", "1.05e9",
            "--seeds", "0,1", *PROBE, "--out", str(tmp / "out")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # 2 shared cores: no thread oversubscription in the children
        rc = ablate.main(argv)
    out = tmp / "out"
    return dict(tmp=tmp, out=out, argv=argv, rc=rc, report=json.loads((out / "ablation.json").read_text()),
                md=(out / "ablation.md").read_text())


def row(report, name):
    return next(r for r in report["rows"] if r["name"] == name)


@pytest.mark.slow  # the ablation fixture: 4 trainings and 4 probes (~50 s)
def test_table_and_json_give_mean_and_stderr_over_seeds(ablation):
    report, md, out = ablation["report"], ablation["md"], ablation["out"]
    assert ablation["rc"] == 1  # a failed run: reported, the others went on
    assert md.splitlines()[2:4] == ["```bash", "python scripts/ablate.py " + shlex.join(ablation["argv"])]
    assert [c["label"] for c in report["columns"]] == ["shape_acc", "color_acc"]
    for name in ("narrow", "wide"):
        r = row(report, name)
        assert [run["seed"] for run in r["runs"]] == [0, 1] and all(run["status"] == "done" for run in r["runs"])
        line = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        for label in ("shape_acc", "color_acc"):
            # the per-run value is eval.json's, and the summary is numpy's mean and std(ddof=1) / sqrt(n)
            values = []
            for run in r["runs"]:
                probe = json.loads((out / f"{name}-s{run['seed']}" / "eval.json").read_text())["probe_shapes"]
                assert run["metrics"][label] == probe[0][label]
                values.append(probe[0][label])
            mean, stderr = np.mean(values), np.std(values, ddof=1) / np.sqrt(len(values))
            assert math.isclose(r["summary"][label]["mean"], mean, abs_tol=1e-12)
            assert math.isclose(r["summary"][label]["stderr"], stderr, abs_tol=1e-12)
            assert f"| {mean:.3f} ± {stderr:.3f} |" in line
        for run in r["runs"]:
            assert run["images"] == 4 * run["steps"]  # batch 4 x accum 1 x 1 rank
            assert run["steps"] == r["max_steps"] and run["wall_min"] > 0 and run["images_per_s"] > 0
            log = [json.loads(x) for x in (out / f"{name}-s{run['seed']}" / "log.jsonl").read_text().splitlines()]
            assert log[0]["event"] == "start" and log[-1]["step"] == run["steps"]
            assert math.isclose(run["wall_min"], log[-1]["elapsed_h"] * 60)
        assert f"| 2 | {r['max_steps']:,} | {4 * r['max_steps']:,} |" in line
    broken = row(report, "broken")
    assert [run["status"] for run in broken["runs"]] == ["failed", "failed"]
    line = next(line for line in md.splitlines() if line.startswith("| broken |"))
    assert "| failed | failed | 0 of 2 |" in line and "seeds 0, 1 failed: train.py exit 2:" in line
    assert str(out / "broken-s*" / "train.log") in line and "/nonexistent/folder" in line


@pytest.mark.slow  # the ablation fixture: 4 trainings and 4 probes (~50 s)
def test_equal_flops_rows_differ_in_steps_and_match_train_py(ablation):
    report, out = ablation["report"], ablation["out"]
    narrow, wide = row(report, "narrow"), row(report, "wide")
    assert narrow["max_steps"] > 10 * wide["max_steps"]
    step_flops = [r["flops_per_image"] * r["images_per_step"] for r in (narrow, wide)]
    flops = [r["runs"][0]["flops"] for r in (narrow, wide)]
    assert abs(flops[0] - flops[1]) <= max(step_flops)  # equal within one optimizer step
    for r, f, s in zip((narrow, wide), flops, step_flops):
        assert abs(f - FLOPS) <= s / 2 and math.isclose(f, r["flops_per_image"] * r["runs"][0]["images"])
        # the model train.py built (its checkpoint's config) has exactly the tool's FLOPs per image ...
        ck = torch.load(out / f"{r['name']}-s0" / "ckpt.pt", map_location="cpu", weights_only=True)
        with torch.device("meta"):
            assert DiT(DiTConfig(**ck["model_config"])).estimate_flops() == r["flops_per_image"]
        # ... and what train.py printed for it
        printed = re.findall(r"([\d.]+) GFLOP/img \(train\)", (out / f"{r['name']}-s0" / "train.log").read_text())
        assert printed == [f"{r['flops_per_image'] / 1e9:.1f}"]
    assert float(printed[0]) > 0  # the wide row prints a non-zero number: the comparison is not 0.0 == 0.0
    assert not any(run.get("note") for r in (narrow, wide) for run in r["runs"])


@pytest.mark.slow  # the ablation fixture: 4 trainings and 4 probes (~50 s)
def test_rerun_skips_finished_runs_and_refuses_changed_ones(ablation, capsys):
    out = ablation["out"]
    files = [out / f"{n}-s{s}" / f for n in ("narrow", "wide") for s in (0, 1)
             for f in ("ckpt.pt", "eval.json", "train.log", "log.jsonl")]
    before = {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in files}
    capsys.readouterr()
    assert ablate.main(ablation["argv"]) == 1  # the broken row is retried, and fails again
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == 4 and "narrow-s0: train.py" not in printed
    assert {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in files} == before  # no second training or probe
    again = json.loads((out / "ablation.json").read_text())
    for name in ("narrow", "wide"):
        assert row(again, name)["summary"] == row(ablation["report"], name)["summary"]
    # the same folder with another recipe for a row: an error before anything runs
    rows2 = ablation["tmp"] / "rows2.txt"
    rows2.write_text(ROWS.replace("--width 128 --patch 2", "--width 64"))
    with pytest.raises(SystemExit) as e:
        ablate.main([str(rows2), *ablation["argv"][1:]])
    assert e.value.code == 2 and "made with other train arguments" in capsys.readouterr().err
    assert {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in files} == before


def test_unknown_key_exits_2_before_any_run(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "scripts/ablate.py", "--base", TINY, "--steps", "1", "--row", "ok:",
                        "--row", "typo: --widht 64", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "row typo: unknown key 'widht'; did you mean --width?" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("rows,needle", [
    ("a: --seed 3", "--seed is set by this tool"), ("a: --max_steps 9", "--max_steps is set by this tool"),
    ("a:\na: --lr 1", "unique: a"), ("no colon here", "expected `name: --key value"),
    ("a: configs/shapes.py", "a config file goes in --base"),
    ("a: --adaln nope", "row a: --adaln 'nope': one of single, zero"),
    ("a: --patch 3", "not divisible by patch 3"),
])
def test_bad_rows_exit_2(tmp_path, capsys, rows, needle):
    (tmp_path / "rows.txt").write_text(rows)
    with pytest.raises(SystemExit) as e:
        ablate.main([str(tmp_path / "rows.txt"), "--base", TINY, "--steps", "1", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # the ablation fixture: 4 trainings and 4 probes (~50 s)
def test_rows_budgets_and_the_cache_path(ablation, tmp_path):
    (tmp_path / "r.txt").write_text("# comment\n\nx: --sample_prompts 'a # b|c'  # trailing comment\n")
    assert ablate.read_rows([str(tmp_path / "r.txt")], ["y:"]) == [("x", ["--sample_prompts", "a # b|c"]), ("y", [])]
    base = TINY.split()
    for budget, want in ((["--steps", "7"], ["--max_steps", "7", "--max_hours", "0"]),
                         (["--hours", "0.25"], ["--max_hours", "0.25"])):
        args = ablate.parse_cli(["--row", "x:", *budget])[0]
        plan = ablate.plan_row("x", [], base, args)
        assert plan["train_argv"] == base + want
    # --data pointing at a finished cache: the shape and text widths come from its manifest, same FLOPs
    cache = str(ablation["tmp"] / "cache")
    args = ablate.parse_cli(["--row", "x:", "--steps", "1"])[0]
    assert (ablate.plan_row("x", ["--data", cache], base, args)["flops_per_image"]
            == row(ablation["report"], "narrow")["flops_per_image"])


def test_an_unrouted_finish_is_planned_at_the_flops_train_py_spends():
    """route_until: the plan's steps times train.py's own split (train.routed_tokens) into routed steps, at the
    routed model's FLOPs per image, and unrouted ones, at the unrouted model's, is the budget to within one step."""
    base = TINY.split() + ["--route_frac", "0.5", "--route_from", "0", "--route_to", "1", "--route_until", "0.7"]
    budget = 3e11
    plan = ablate.plan_row("x", [], base, ablate.parse_cli(["--row", "x:", "--flops", str(budget)])[0])
    C = SimpleNamespace(**plan["config"])
    tiny = load_text_encoder("tiny")
    with torch.device("meta"):  # the model train.py builds for 16 px pixel space, routed and not
        data = dict(in_channels=3, input_size=16, text_dim=tiny.dim, pooled_dim=tiny.pooled_dim)
        routed = DiT(config_from_keys(C, **data)).estimate_flops()
        unrouted = DiT(config_from_keys(SimpleNamespace(**{**vars(C), "route_frac": 0.0}), **data)).estimate_flops()
    assert routed < unrouted
    assert (plan["routed_flops_per_image"], plan["unrouted_flops_per_image"]) == (routed, unrouted)
    steps = plan["max_steps"]
    spent = sum((routed if train.routed_tokens(s, steps, 16, C) else unrouted) * plan["images_per_step"]
                for s in range(steps))
    assert 0 < sum(train.routed_tokens(s, steps, 16, C) > 0 for s in range(steps)) < steps
    assert abs(spent - budget) <= unrouted * plan["images_per_step"]
    assert math.isclose(ablate.spent_flops(plan, steps), spent)  # the table's FLOPs column
    assert math.isclose(ablate.spent_flops(plan, 3), 3 * routed * plan["images_per_step"])  # a run stopped early


def test_a_lever_row_is_planned_at_train_flops():
    """SRA's EMA forward and head are training FLOPs (model.train_flops, what train.py's MFU and start-up line use):
    at equal FLOPs its row gets fewer steps; CFM and the dispersive loss cost nothing counted."""
    args = ablate.parse_cli(["--row", "x:", "--flops", "3e11"])[0]
    plain, sra, cfm = (ablate.plan_row("x", ["--depth", "2", *row], TINY.split(), args) for row in
                       ([], ["--sra_weight", "0.5"], ["--cfm_weight", "0.1", "--disp_weight", "0.5"]))
    C = SimpleNamespace(**sra["config"])
    tiny = load_text_encoder("tiny")
    with torch.device("meta"):
        model = DiT(config_from_keys(C, in_channels=3, input_size=16, text_dim=tiny.dim, pooled_dim=tiny.pooled_dim))
    assert sra["flops_per_image"] == train_flops(model, C) > plain["flops_per_image"] == cfm["flops_per_image"]
    assert sra["max_steps"] < plain["max_steps"] == cfm["max_steps"]


def test_metrics_are_read_generically():
    import evaluate
    import toys
    # evaluate.py's scenes record as it writes it (here from true renders: 1.0 by construction), at two CFG scales
    record = evaluate.probe_scenes(None, n_per_prompt=1, resolution=toys.MIN_RESOLUTION)
    report = {"probe_scenes": [dict(record, cfg=3.0, truth=False), dict(record, cfg=5.0, truth=False)]}
    metrics = ablate.PROBES["scenes"][1].split(",") + ["held_out.single_object", "held_out.counting"]
    cols = [dict(metric=m, cfg=c, label=f"{m} {c:g}") for m in metrics for c in (3.0, 5.0)]
    values, error = ablate.metric_values(report, cols, "scenes")
    assert error is None and values == {
        "in_distribution.overall 3": 1.0, "in_distribution.overall 5": 1.0, "held_out.overall 3": 1.0,
        "held_out.overall 5": 1.0, "held_out.single_object 3": None, "held_out.single_object 5": None,
        "held_out.counting 3": None, "held_out.counting 5": None}  # the held-out set has no such prompts
    assert ablate.summarize([None, None])["n"] == 0 and ablate.summarize([0.5, None, 0.7])["n"] == 2
    _, error = ablate.metric_values(report, [dict(metric="overall", cfg=3.0, label="o")], "scenes")
    assert "'overall' is ambiguous" in error and "held_out.overall" in error
    # shapes: the records started from a noised render (--probe_from) are left out; a dotted suffix finds a key
    shapes = {"probe_shapes": [dict(cfg=3.0, t_start=None, shape_acc=0.5), dict(cfg=3.0, t_start=200, shape_acc=0.9)],
              "results": [{"cfg": 3.0, "fid": 12.5, "n": 10}]}
    cols = [dict(metric="shape_acc", cfg=3.0, label="s"), dict(metric="results:fid", cfg=3.0, label="fid")]
    assert ablate.metric_values(shapes, cols, "shapes") == ({"s": 0.5, "fid": 12.5}, None)
    _, error = ablate.metric_values(shapes, [dict(metric="nope", cfg=3.0, label="n")], "shapes")
    assert "'nope' not found" in error and "shape_acc" in error


def test_a_run_stopped_by_a_signal_is_not_taken_for_a_finished_one(tmp_path):
    """train.py exits 0 after SIGINT/SIGTERM with a checkpoint short of its budget: the tool must not probe it."""
    def log(*records):
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ({"event": "start", "step": 0},
                                                                                  *records)))
    steps = dict(dir=str(tmp_path), max_steps=100, max_hours=None)
    hours = dict(dir=str(tmp_path), max_steps=None, max_hours=0.5)
    log()
    assert "before its first log step" in ablate.stopped_early(steps)
    log({"step": 50, "eta_h": 0.1, "elapsed_h": 0.1}, {"step": 100, "eta_h": 0.0, "elapsed_h": 0.2})
    assert ablate.stopped_early(steps) is None
    log({"step": 50, "eta_h": 0.1, "elapsed_h": 0.1})
    assert "last logged step 50" in ablate.stopped_early(steps) and "last logged step 50" in ablate.stopped_early(hours)
    log({"step": 80, "eta_h": 0.0, "elapsed_h": 0.45})  # --hours: the planned horizon reached a little early
    assert ablate.stopped_early(hours) is None
    log({"step": 90, "eta_h": 0.02, "elapsed_h": 0.5})  # --hours: the time is up at a log step
    assert ablate.stopped_early(hours) is None
