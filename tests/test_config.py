"""config.py: the command line and config files, the checks that fail before any work, --help; the configs hold
only what differs from train.py's defaults, and those defaults are the recipe."""
import ast
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import config
import train
from run_utils import ROOT, args


def parse(argv):
    return config.parse_args(argv, train.DEFAULTS)


def test_cli_parses_both_forms_and_config_files(tmp_path):
    c = parse(["--batch", "64", "--accum", "12"])
    assert (c["batch"], c["accum"]) == (64, 12)
    assert parse(["--batch=64"])["batch"] == 64
    assert parse(["--lr", "3"])["lr"] == 3.0 and isinstance(parse(["--lr", "3"])["lr"], float)
    assert parse(["--compile", "FALSE"])["compile"] is False
    assert parse(["--compile=1"])["compile"] is True
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nbatch = 8\nlr = 2  # an int for a float key is fine\n")
    c = parse([str(cfg), "--accum", "3"])
    assert (c["batch"], c["lr"], c["accum"]) == (8, 2.0, 3)
    assert set(c) >= {"data", "out_dir", "resolution", "vae", "text_encoder", "model", "depth", "width", "heads",
                      "patch", "prediction", "batch", "accum", "lr", "warmup", "max_steps", "max_hours",
                      "min_snr_gamma", "noise_offset", "input_perturbation", "cond_drop", "ema_decay", "compile",
                      "device", "dtype", "seed", "log_every", "ckpt_every", "sample_every", "resume"}
    cfg.write_text("bacth = 8\n")
    with pytest.raises(config.ConfigError, match="--batch"):
        parse([str(cfg)])


@pytest.mark.parametrize("argv,needle", [(["--bacth", "64"], "did you mean --batch"),
                                         (["--batch", "x"], "--batch expects int"),
                                         (["--compile", "maybe"], "boolean"),
                                         (["--text_len", "-1"], "must be 0 (all) .. 77"),
                                         (["--text_len", "78"], "must be 0 (all) .. 77"),
                                         (["--text_len", "155", "--text_chunks", "2"], "must be 0 (all) .. 154"),
                                         (["--text_chunks", "4"], "--text_chunks must be 1..3"),
                                         (["--aspect_buckets", "1"], "aspect_buckets 1: 0 (square"),
                                         (["--aspect_buckets", "-3"], "aspect_buckets -3"),
                                         (["--max_aspect", "0.9"], "max_aspect 0.9: must be >= 1"),
                                         (["--max_aspect", "inf"], "max_aspect inf: must be >= 1"),
                                         (["--sample_cfg_interval", "0.9,0.1"], "needs 0 <= LO <= HI <= 1"),
                                         (["--sample_cfg_interval", "half"], "--sample_*"),
                                         (["--sample_apg", "0", "--sample_cfg_zero_star", "true"], "choose one"),
                                         (["--sample_cfg_zero_star", "true", "--prediction", "v"], "flow")])
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
    (dict(prediction="flow", min_snr_gamma=5), "set min_snr_gamma 0"),
    (dict(prediction="flow", min_snr_gamma=0, zero_terminal_snr=True), "zero_terminal_snr does not apply to flow"),
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
    with pytest.raises(config.ConfigError, match=needle):
        parse([str(cfg)])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    printed = capsys.readouterr().out
    assert e.value.code == 0 and all(f"--{k} " in printed for k in train.DEFAULTS)


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


@pytest.mark.parametrize("over,needle", [
    (dict(cfm_weight=-0.1), "--cfm_weight -0.1: must be >= 0"), (dict(disp_weight=-1), "--disp_weight -1.0: must be"),
    (dict(sra_weight=-0.5), "--sra_weight -0.5: must be >= 0"), (dict(cfm_weight="nan"), "--cfm_weight nan"),
    (dict(cfm_weight=1), "--cfm_weight 1.0: must be in [0, 1)"), (dict(sra_weight="inf"), "--sra_weight inf: must"),
    (dict(cfm_weight=0.1, prediction="v", optimizer="adamw"), "for --prediction flow, not v"),
    (dict(cfm_weight=0.1, batch=1), "--cfm_weight 0.1: contrasts the samples of a micro-batch, and --batch is 1"),
    (dict(disp_weight=0.1, batch=1), "--disp_weight 0.1: contrasts"),
    (dict(disp_weight=0.5, disp_block=2), "--disp_block 2: beyond the depth 2"),
    (dict(disp_weight=0.5, disp_block=-3), "--disp_block -3: beyond the depth 2"),
    (dict(sra_weight=0.5, sra_block=1, sra_target_block=0), "--sra_target_block 0: must be a later block than"),
    (dict(sra_weight=0.5, sra_block=-1, sra_target_block=-1), "--sra_target_block -1: must be a later block"),
    (dict(sra_weight=0.5, sra_target_block=5), "--sra_target_block 5: beyond the depth 2"),
    (dict(sra_gap=0), "--sra_gap 0.0: must be in (0, 1]"), (dict(sra_gap=1.5), "--sra_gap 1.5: must be in (0, 1]"),
    (dict(disp_weight=0.5, disp_block=0, route_frac=0.5, route_from=0, route_to=1), "--disp_block 0: block 0 is "
     "routed"),
    (dict(sra_weight=0.5, route_frac=0.5, route_from=1, route_to=2), "--sra_target_block -1: block 1 is routed"),
])
def test_training_lever_refusals_exit_2_before_any_work(tmp_path, capsys, over, needle):
    """Issue 25's bad input: one line, exit 2, before the cache or anything else (the data is not even built)."""
    with pytest.raises(SystemExit) as e:
        train.main(args("shapes", tmp_path / "o", **over))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


def test_lever_blocks_are_checked_only_where_their_weight_is_on(tmp_path):
    """At weight 0 a block key is not read: the defaults hold at any depth (depth 1 here), and a routed block does
    not stop a run that does not use it."""
    for over in (dict(depth=1), dict(route_frac=0.5, route_from=0, route_to=1, disp_block=0, sra_block=0)):
        config.check(SimpleNamespace(**parse(args("shapes", tmp_path / "o", **over))))


def test_muon_needs_a_torch_that_has_it(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(SystemExit) as e:
        train.main(args(cache, tmp_path / "o", optimizer="muon"))
    assert e.value.code == 2 and "has no torch.optim.Muon" in capsys.readouterr().err


def test_a_missing_logger_package_is_a_clear_error_before_work(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    for over, needle in [(dict(tensorboard=True), "pip install tensorboard"),
                         (dict(wandb_project="p"), "pip install wandb")]:
        with pytest.raises(SystemExit) as e:
            train.main(args(cache, tmp_path / "o", **over))
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("path", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_every_config_file_parses_and_checks(path):
    """configs/*.py (the week's second stage reads the first: `__file__` is set for config files)."""
    C = SimpleNamespace(**parse([os.path.join(ROOT, "configs", path)]))
    config.check(C)
    if path == "rtx5090_week_512.py":
        first = parse([os.path.join(ROOT, "configs", "rtx5090_week.py")])
        assert C.init_from == os.path.join(first["out_dir"], "ckpt.pt") and C.resolution == 2 * first["resolution"]
        assert C.batch * C.accum == first["batch"] * first["accum"] and C.max_hours + first["max_hours"] == 168


def own_keys(path):
    """The keys a config file assigns, with their values once it has run (configs/rtx5090_week_512.py and
    configs/scenes.py run the config they build on first), and that base's keys (train.py's defaults for none)."""
    text = open(path).read()
    base = re.search(r'exec\(open\(.*"(\w+\.py)"', text)
    base = own_keys(os.path.join(os.path.dirname(path), base[1]))[0] if base else {}
    tree = ast.parse(text)
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
             for t in ast.walk(target) if isinstance(t, ast.Name) and not t.id.startswith("_")}
    values = config.read_config_file(path, train.DEFAULTS)
    return {k: values[k] for k in names}, {**train.DEFAULTS, **base}


RECIPE_BLOCK = re.search(r"^# the recipe:.*?\n(.*?)^# -{20}", open(os.path.join(ROOT, "train.py")).read(),
                         flags=re.M | re.S).group(1)
RECIPE_KEYS = re.findall(r"^(\w+) = ", RECIPE_BLOCK, flags=re.M)


@pytest.mark.parametrize("path", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_configs_hold_only_what_differs_from_the_defaults(path):
    """A config is a diff against train.py's defaults (or against the config it builds on): no line sets a key to
    the value it has already."""
    own, base = own_keys(os.path.join(ROOT, "configs", path))
    same = {k: v for k, v in own.items() if v == base[k]}
    assert own and not same, f"configs/{path} repeats what it builds on: {same}"


def test_the_weeks_recipe_is_the_defaults():
    """The week's run changes data, size, batch, hours and cadence, not the recipe; and the recipe is the measured
    one: rectified flow, logit-normal (0, 1) t, Muon, wsd, caption dropout, no min-SNR, no flips."""
    assert len(RECIPE_KEYS) >= 15 and "prediction" in RECIPE_KEYS and "optimizer" in RECIPE_KEYS
    week, _ = own_keys(os.path.join(ROOT, "configs", "rtx5090_week.py"))
    assert not set(week) & set(RECIPE_KEYS), set(week) & set(RECIPE_KEYS)
    D = train.DEFAULTS
    assert (D["prediction"], D["t_logit_mean"], D["t_logit_std"], D["optimizer"], D["lr_schedule"]) == \
        ("flow", 0.0, 1.0, "muon", "wsd")
    assert (D["min_snr_gamma"], D["flip"], D["cond_drop"], D["resolution"], D["model"]) == \
        (0.0, False, 0.1, 256, "DiT-B/2")


def test_help_shows_the_recipe_as_defaults(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    printed = capsys.readouterr().out
    for key, value in (("prediction", "'flow'"), ("optimizer", "'muon'"), ("t_logit_std", "1.0")):
        assert re.search(rf"--{key} +{re.escape(value)} ", printed), key


def test_given_keys_are_the_keys_that_parse_args_sets(tmp_path):
    """Every form parse_args takes (a config file, --key value, --key=value) counts, whatever the value (a default
    one too); the keys left out do not."""
    (tmp_path / "c.py").write_text("batch = 8\nlr = 3e-4\n")
    argv = [str(tmp_path / "c.py"), "--seed", "1", "--cond_drop=0.1", f"--warmup={train.DEFAULTS['warmup']}"]
    got = config.given_keys(argv, train.DEFAULTS)
    assert got == {"batch", "lr", "seed", "cond_drop", "warmup"}
    parsed = parse(argv)
    assert {k for k in parsed if parsed[k] != train.DEFAULTS[k]} <= got
    assert config.given_keys([], train.DEFAULTS) == set()
