"""bench.py: `python bench.py --tiny` runs and reports every case (ours and the PixArt peer, loader, text encoder,
sampler) with positive finite numbers that agree with each other and with their references (model.estimate_flops,
parameter counts of the two networks built here). Never a speed assertion. On CUDA: a training step has no host sync."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    out.write_text('{"kind": "earlier run"}\n')  # --out appends
    r = subprocess.run([sys.executable, "bench.py", "--tiny", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == {"kind": "earlier run"}, "--out must append, not overwrite"
    return r.stdout, [json.loads(l) for l in lines[1:]]


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from intra-op threads (and lose 10x on a busy machine): as bench.py --tiny does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def positive(rec, *keys):
    for k in keys:
        v = rec[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{rec['model']}: {k} = {v!r}"


@pytest.mark.slow  # the `bench.py --tiny` subprocess (~10 s)
def test_tiny_run_reports_every_case(tiny_run):
    stdout, recs = tiny_run
    assert [r["kind"] for r in recs] == ["train", "train", "loader", "text_encoder", "sampling", "sampling"]
    for r in recs:  # every line says where and with what it was measured
        assert r["torch"] == torch.__version__ and r["card"] and r["date"] and r["cmd"].startswith("python bench.py")
    ours, peer, loader, text, sampling, peer_sampling = recs
    assert (ours["model"], peer["model"]) == ("ours tiny", "pixart tiny")
    for r in (ours, peer):
        assert "error" not in r, r
        positive(r, "params", "gflop_per_img", "gflop_counted", "step_ms", "img_s")
        assert (r["batch"], r["accum"], r["latent"], r["mode"]) == (ours["batch"], 1, ours["latent"], "alternating")
        assert r["img_s"] == pytest.approx(r["batch"] * r["accum"] / (r["step_ms"] / 1e3), rel=1e-9)
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
    positive(ours, "ratio_vs_peer")
    assert ours["ratio_vs_peer"] == pytest.approx(ours["img_s"] / peer["img_s"], rel=1e-9)
    positive(loader, "samples_per_s", "ms_per_batch")
    positive(text, "ms_per_step", "captions_per_s", "params")
    assert text["model"] == "tiny" and text["batch"] == ours["batch"] * ours["accum"]
    for r in (sampling, peer_sampling):
        positive(r, "s_per_batch", "img_s", "ms_per_step")
        assert (r["batch"], r["steps"], r["sampler"], r["compile"]) == (16, 50, "euler", False) and r["cfg"] > 1
    assert (sampling["model"], peer_sampling["model"]) == ("ours tiny", "pixart tiny")
    assert sampling["ratio_vs_peer"] == pytest.approx(sampling["img_s"] / peer_sampling["img_s"], rel=1e-9)
    assert (ours["fp8"], ours["grad_ckpt"], ours["ckpt_blocks"]) == (False, False, 0)
    # the printed report: header with card, date and torch version; a table row per case; the other sections
    assert torch.__version__ in stdout and recs[0]["date"] in stdout and recs[0]["card"] in stdout
    rows = [l for l in stdout.splitlines() if l.startswith("| ")]
    assert rows[0].split("|")[1].strip() == "model" and "ours/peer" in rows[0] and "peak GB" in rows[0]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["ours tiny", "pixart tiny"]
    for needle in ("loader:", "text encoder tiny", "sampling ours tiny", "sampling pixart tiny"):
        assert needle in stdout
    assert "target" not in stdout.lower()  # the ratio against the peer is a number, not a verdict
    assert sum(l.startswith("{") for l in stdout.splitlines()) == len(recs)  # the same JSON lines on stdout


@pytest.mark.slow  # the `bench.py --tiny` subprocess (~10 s)
def test_tiny_numbers_match_their_references(tiny_run):
    """FLOPs and parameter counts are those of the two networks at the tiny shape, rebuilt here independently."""
    import bench
    from diffusers import PixArtTransformer2DModel
    from model import DiT, make_config
    _, recs = tiny_run
    ours, peer = recs[0], recs[1]
    grid = ours["latent"][1]
    mine = DiT(make_config("DiT-S/2", **bench.TINY, in_channels=4, input_size=grid, text_dim=768, pooled_dim=768))
    assert ours["params"] == sum(p.numel() for p in mine.parameters())
    assert ours["gflop_per_img"] == pytest.approx(mine.estimate_flops() / 1e9, rel=1e-12)
    W, H = bench.TINY["width"], bench.TINY["heads"]
    theirs = PixArtTransformer2DModel(num_attention_heads=H, attention_head_dim=W // H, in_channels=4, out_channels=4,
                                      num_layers=bench.TINY["depth"], sample_size=grid, patch_size=bench.TINY["patch"],
                                      caption_channels=768, cross_attention_dim=W, use_additional_conditions=False,
                                      norm_type="ada_norm_single")
    assert peer["params"] == sum(p.numel() for p in theirs.parameters())
    # the two FLOP counts of our model agree to within the input-side weight gradients that estimate_flops
    # also counts (the latents and text states need no input gradient): a few percent at this tiny width
    assert ours["gflop_counted"] == pytest.approx(ours["gflop_per_img"], rel=0.25)


def test_oom_with_both_resident_falls_back_to_one_at_a_time(monkeypatch, one_thread):
    """The 5090 case: both XL/2 models with their AdamW state do not fit together. The first OOM reruns the shape one
    model at a time; an OOM alone becomes an error row that the report still prints."""
    import contextlib
    from types import SimpleNamespace
    import bench
    import config
    import train
    from diffusion import Diffusion
    C = SimpleNamespace(**config.parse_args(["--batch", "2", "--device", "cpu"], train.DEFAULTS))
    device, ctx, diffusion = torch.device("cpu"), contextlib.nullcontext(), Diffusion()
    real_build_case, calls = bench.build_case, []
    def build_case(impl, *a, **k):  # the peer "does not fit" beside ours; alone it does once, then never again
        calls.append(impl)
        if impl == "pixart" and calls.count("pixart") != 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_build_case(impl, *a, **k)
    monkeypatch.setattr(bench, "build_case", build_case)
    run = lambda: bench.bench_training("tiny", "DiT-S/2", bench.TINY, bench.TINY_GRID, C, device, ctx, diffusion,
                                       steps=1, rounds=1, warmup=1)
    (ours, peer), mode = run()
    assert calls == ["ours", "pixart", "ours", "pixart"] and mode == "sequential"
    assert not ours.error and not peer.error and ours.img_s > 0 and peer.img_s > 0
    assert ours.work is None and peer.work is None  # released: no model, optimizer or batch kept alive
    (ours, peer), mode = run()
    assert mode == "sequential" and not ours.error and peer.error.startswith("OOM alone")
    rows = [bench.train_record(c, p, "tiny", bench.TINY_GRID, C, device, mode) for c, p in ((ours, peer), (peer, None))]
    assert "ratio_vs_peer" not in rows[0] and rows[0]["img_s"] > 0 and rows[1]["error"].startswith("OOM alone")


def test_our_case_is_built_and_stepped_by_train_py(monkeypatch, one_thread):
    """Ours is train.build_model's model, optimizer and EMA, stepped by train.py's own step_noise, routed_tokens,
    train_step and ema_update (the EMA warm-up with the step), not copies of them: each is seen being called."""
    import contextlib
    from types import SimpleNamespace
    import bench
    import config
    import train
    from diffusion import Diffusion
    calls = []
    for name in ("build_model", "step_noise", "routed_tokens", "train_step", "ema_update"):
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, _real=real, _name=name, **k: calls.append((_name, a)) or
                            _real(*a, **k))
    C = SimpleNamespace(**config.parse_args(["--batch", "2", "--device", "cpu"], train.DEFAULTS))
    case = bench.build_case("ours", "tiny", "DiT-S/2", bench.TINY, bench.TINY_GRID, C, torch.device("cpu"),
                            Diffusion(), contextlib.nullcontext())
    [(_, (K, latent_shape, text))] = [c for c in calls if c[0] == "build_model"]
    assert (K.model, K.depth, K.width, K.device, latent_shape) == ("DiT-S/2", 2, 64, "cpu", (4, 8, 8))
    assert (text.dim, text.pooled_dim) == (768, 768)
    case.work(2)
    ema = [c[1] for c in calls if c[0] == "ema_update"]
    assert [c[0] for c in calls[1:]] == ["routed_tokens", "step_noise", "train_step", "ema_update"] * 2
    assert [a[2] for a in ema] == [0, 1] and ema[0][3] == C.ema_decay  # (ema_params, params, step, decay)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_in_a_training_step_on_cuda():
    """train.py's step (step_noise, train_step, ema_update), run through bench.py, should not synchronise the host."""
    from types import SimpleNamespace
    import bench
    import config
    import train
    from diffusion import Diffusion
    C = SimpleNamespace(**config.parse_args(["--batch", "4", "--compile", "false"], train.DEFAULTS))
    device, ctx = torch.device("cuda"), torch.autocast("cuda", dtype=torch.bfloat16)
    diffusion = Diffusion()
    case = bench.build_case("ours", "tiny", "DiT-S/2", bench.TINY, bench.TINY_GRID, C, device, diffusion, ctx)
    case.work(2)
    n, sites = bench.count_syncs(lambda: case.work(1))
    assert n == 0, f"{n} host syncs per step at {sites}"
    # the detector sees a real one
    assert bench.count_syncs(lambda: torch.ones(1, device=device).item())[0] == 1


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA card with FP8 tensor cores (compute capability 8.9+)")
def test_fp8_training_step_on_cuda_has_no_host_sync():
    """--fp8 on the card: torchao's dynamic tensorwise scales are computed on the device, so a step still has no
    host sync."""
    pytest.importorskip("torchao.float8")
    from types import SimpleNamespace
    import bench
    import config
    import train
    from diffusion import Diffusion
    C = SimpleNamespace(**config.parse_args(["--batch", "4", "--compile", "false", "--fp8", "true"], train.DEFAULTS))
    device, ctx = torch.device("cuda"), torch.autocast("cuda", dtype=torch.bfloat16)
    case = bench.build_case("ours", "tiny", "DiT-S/2", bench.TINY, bench.TINY_GRID, C, device, Diffusion(), ctx)
    case.work(2)
    n, sites = bench.count_syncs(lambda: case.work(1))
    assert n == 0, f"{n} host syncs per step at {sites}"


def test_count_syncs_counts_syncs_not_the_debug_mode_notice(monkeypatch):
    """set_sync_debug_mode warns once that the mode is a prototype; that notice is not a sync (it was counted as
    one on an H100, failing the CUDA test on its first call). Both warnings are emitted here as torch emits them."""
    import warnings
    import bench
    def set_mode(mode):
        if mode != "default":
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations")
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    def two_syncs():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")
    n, sites = bench.count_syncs(two_syncs)
    assert n == 2 and len(sites) == 1 and sites[0].startswith("test_bench.py:")
    assert bench.count_syncs(lambda: None) == (0, [])


def test_models_none_runs_only_the_loader_and_text_encoder_rows(one_thread, capsys):
    """docs/log.md's loader numbers (2026-11-26 13:57) come from
    `python bench.py --models none --batch 256 --text_encoder tiny`."""
    import bench
    recs = bench.main(["--models", "none", "--batch", "16", "--text_encoder", "tiny", "--device", "cpu"])
    assert [r["kind"] for r in recs] == ["loader", "text_encoder"]
    assert recs[0]["batch"] == 16 and recs[0]["latent"] == [3, 32, 32]
    positive(recs[0], "samples_per_s")
    assert "loader:" in capsys.readouterr().out


def test_sampling_rows_run_sample_latents_on_ours_and_the_peer(one_thread):
    """The sampling rows time sample.py's own path with the same sampler, steps and CFG for both networks: the latents
    of each timed call are those of sample.sample_latents for the same prompts and seeds, on a Pipeline built here
    around a DiT, and around the peer, with the same seeded weights."""
    from types import SimpleNamespace
    import bench
    import config
    import sample
    import train
    from diffusion import Diffusion
    from model import DiT
    C = SimpleNamespace(**config.parse_args(["--device", "cpu"], train.DEFAULTS))
    device, diffusion = torch.device("cpu"), Diffusion()
    cases, recs = bench.bench_sampling("tiny", "DiT-S/2", bench.TINY, bench.TINY_GRID, C, device, diffusion,
                                       batch=3, steps=4, cfg=3.0)
    builds = {"ours": lambda: DiT(bench.our_config("DiT-S/2", bench.TINY, bench.TINY_GRID, C)),
              "pixart": lambda: bench.PixArtPeer(**bench.TINY, grid=bench.TINY_GRID)}
    for case, rec, impl in zip(cases, recs, ("ours", "pixart")):
        torch.manual_seed(C.seed)
        net = builds[impl]().eval().requires_grad_(False)
        pipe = sample.Pipeline(net, diffusion, SimpleNamespace(factor=8, channels=4),
                               bench.stand_in_text_encoder(device), {"resolution": bench.TINY_GRID * 8}, 0, device, "")
        ref = sample.sample_latents(pipe, bench.captions(3), [C.seed + i for i in range(3)], cfg=3.0, steps=4)
        assert case.out.shape == (3, 4, bench.TINY_GRID, bench.TINY_GRID) and torch.equal(case.out, ref), impl
        assert case.work is None  # released
        assert (rec["impl"], rec["batch"], rec["steps"], rec["cfg"], rec["latent"]) == (
            impl, 3, 4, 3.0, [4, bench.TINY_GRID, bench.TINY_GRID])
        assert rec["s_per_batch"] == pytest.approx(rec["steps"] * rec["ms_per_step"] / 1e3, rel=1e-9)
        assert rec["img_s"] == pytest.approx(rec["batch"] / rec["s_per_batch"], rel=1e-9)
    assert not torch.equal(cases[0].out, cases[1].out)  # two networks, not one timed twice


def test_stand_in_text_encoder_is_a_function_of_the_caption():
    """Same caption, same states, in any batch position and any instance (crc32 seeds, not Python's salted hash);
    CLIP-L's shapes; another caption, other states."""
    import bench
    a, b = bench.stand_in_text_encoder(torch.device("cpu")), bench.stand_in_text_encoder(torch.device("cpu"))
    (s1, p1), (s2, p2) = a(["a red fox", ""]), b(["", "a red fox"])
    assert s1.shape == (2, 77, 768) and p1.shape == (2, 768)
    assert torch.equal(s1[0], s2[1]) and torch.equal(p1[1], p2[0]) and not torch.equal(s1[0], s1[1])


def test_command_lines_reach_the_train_config():
    """The docstring's command lines, parsed only (nothing built): presets with or without DiT-, --res, --batch, a
    config file first and any train.py key after it (--grad_ckpt, --compile)."""
    import bench
    args, C = bench.parse(["configs/shapes.py", "--models", "B/2,DiT-XL/2", "--res", "512", "--batch", "16",
                           "--grad_ckpt", "true", "--compile", "false"])
    assert [label for label, _, _ in args.presets] == ["B/2", "XL/2"] and args.grid == 64
    assert (C.batch, C.grad_ckpt, C.compile, C.text_len, args.text_encoder) == (16, True, False, 16, "tiny")
    args, C = bench.parse(["--models", "none"])
    assert args.presets == [] and args.text_encoder == "ViT-L-14"  # train.py's encoder architecture, random weights
    with pytest.raises(SystemExit):
        bench.parse(["--models", "Q/2"])


@pytest.mark.slow  # the `bench.py --tiny` subprocess (~10 s)
def test_report_prints_one_table_of_every_row(tiny_run, tmp_path, capsys):
    """--report: the train and sampling rows of a JSON-lines file that several runs appended to (scripts/gpu_check.sh)
    in one table, each with its settings, and the same rows in one JSON list; a bad file is one line, exit 2."""
    import bench
    _, recs = tiny_run
    fp8 = dict(recs[0], fp8=True, grad_ckpt=True, ckpt_blocks=14, qk_norm=False, rope=False, cross_norm=False)
    oom = {k: v for k, v in recs[1].items() if k not in ("step_ms", "img_s")} | {"error": "OOM alone: CUDA out"}
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*recs, fp8, oom]))
    rows = bench.main(["--report", str(path), "--out", str(tmp_path / "all.json")])
    assert [r["kind"] for r in rows] == ["train"] * 2 + ["sampling"] * 2 + ["train"] * 2
    assert json.loads((tmp_path / "all.json").read_text()) == rows
    table = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")][1:]
    cells = [[c.strip() for c in l.split("|")[1:-1]] for l in table]
    assert [c[0] for c in cells] == ["ours tiny", "pixart tiny"] * 3
    assert [c[2] for c in cells] == ["fp32 muon", "fp32", "sample euler 50 steps cfg 7.5", "sample euler 50 steps "
                                     "cfg 7.5", "fp8 muon ckpt 14 no qk_norm/rope/cross_norm", "fp32"]
    assert float(cells[0][6]) == pytest.approx(recs[0]["img_s"], abs=0.05) and cells[1][9] == "ref"
    assert cells[0][9] == f"{recs[0]['ratio_vs_peer']:.2f}x" and cells[5][-1].startswith("OOM alone")
    path.write_text("{not json\n")
    with pytest.raises(SystemExit) as e:
        bench.main(["--report", str(path)])
    assert e.value.code == 2


@pytest.mark.parametrize("argv,needle", [(["--fp8", "true", "--device", "cpu"], "--fp8 true: needs a CUDA GPU"),
                                         (["--ckpt_blocks", "3"], "only with --grad_ckpt true"),
                                         (["--parts", "train,speed"], "--parts train,speed"),
                                         (["--models", "B/2", "--grad_ckpt", "true", "--ckpt_blocks", "13"],
                                          "B/2: ckpt_blocks 13: must be in 0..depth 12")])
def test_bad_bench_settings_exit_2_with_one_line(argv, needle, capsys):
    import bench
    with pytest.raises(SystemExit) as e:
        bench.parse(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and needle in err[-1]


def test_no_peer_and_parts_run_only_those_rows(one_thread):
    """--no_peer --parts train,sampling: ours alone, training and sampling rows only (gpu_check.sh's memory and fp8
    rows); --grad_ckpt true --ckpt_blocks 1 reaches our model (the peer checkpoints every block)."""
    import bench
    recs = bench.main(["--tiny", "--no_peer", "--parts", "train,sampling", "--grad_ckpt", "true", "--ckpt_blocks", "1",
                       "--device", "cpu"])
    assert [(r["kind"], r["impl"]) for r in recs] == [("train", "ours"), ("sampling", "ours")]
    assert "ratio_vs_peer" not in recs[0] and "ratio_vs_peer" not in recs[1]
    assert (recs[0]["grad_ckpt"], recs[0]["ckpt_blocks"]) == (True, 1)


def test_fp8_swaps_the_same_block_linears_in_ours_and_the_peer(one_thread, monkeypatch):
    """--fp8: ours by model.fp8_linear_filter, the peer by the same rule (its transformer blocks' linears, none of
    its embedders or output). With torchao here, one fp8 training step of each runs on the CPU and moves the
    weights."""
    import contextlib
    from types import SimpleNamespace
    import bench
    import config
    import train
    from diffusion import Diffusion
    from model import fp8_linear_filter
    peer = bench.PixArtPeer(**bench.TINY, grid=bench.TINY_GRID)
    linears = {n: m for n, m in peer.named_modules() if isinstance(m, torch.nn.Linear)}
    picked = [n for n, m in linears.items() if bench.peer_fp8_filter(m, n)]
    assert picked == [n for n in linears if n.startswith("net.transformer_blocks.")] and len(picked) == 10 * 2
    assert len(linears) > len(picked)  # its caption projection, timestep embedder and output stay as they are
    pytest.importorskip("torchao.float8")
    C = SimpleNamespace(**config.parse_args(["--batch", "2", "--device", "cpu", "--fp8", "true"], train.DEFAULTS))
    converted, real = [], bench.convert_to_fp8  # ours converts in train.build_model, the peer in bench.build_case
    spy = lambda module, keep=fp8_linear_filter: converted.append(real(module, keep)) or module
    monkeypatch.setattr(bench, "convert_to_fp8", spy)
    monkeypatch.setattr(train, "convert_to_fp8", spy)
    for impl, n in (("ours", 7 * bench.TINY["depth"]), ("pixart", 10 * bench.TINY["depth"])):
        torch.manual_seed(0)
        case = bench.build_case(impl, "tiny", "DiT-S/2", bench.TINY, bench.TINY_GRID, C, torch.device("cpu"),
                                Diffusion(), contextlib.nullcontext())
        net = converted[-1]
        assert sum(type(m).__name__ == "Float8Linear" for m in net.modules()) == n, impl
        before = [p.detach().clone() for p in net.parameters()]
        case.work(1)
        assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters())), impl
