"""sample.py: reproducible per-image seeds, batch independence, CFG wiring, checkpoint errors, the CLI's files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from checkpoint import save_checkpoint
from ckpt_utils import make_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle on a white background", "a blue square on a black background", "a green triangle"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")


@pytest.fixture(scope="module")
def pipe(ckpt):
    return sample.load_pipeline(str(ckpt), "cpu")


def reference_sample(pipe, prompts, seeds, uncond_caption=None, cfg=1.0, **kw):
    """diffusion.sample driven directly with the model (no sample.py code): the oracle for the wiring."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x_T = torch.stack([torch.randn(pipe.latent_shape(), generator=g) for g in gens])
    cond = pipe.text_encoder(prompts)
    uncond = None if uncond_caption is None else pipe.text_encoder([uncond_caption] * len(prompts))
    model_fn = lambda x, t, c: pipe.model(x, t, c[0], c[1])
    return pipe.diffusion.sample(model_fn, x_T, cond, uncond=uncond, cfg=cfg, generator=gens, **kw)


def test_loads_ema_weights_and_config(ckpt, pipe):
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    for k, v in pipe.model.state_dict().items():
        torch.testing.assert_close(v, saved["ema"][k], rtol=0, atol=0)
    assert not pipe.model.training and pipe.step == 7 and pipe.latent_shape() == (3, 16, 16)
    assert pipe.diffusion.prediction == saved["config"]["prediction"]


def test_same_seed_same_image(pipe):
    kw = dict(cfg=3.0, steps=4, sampler="ddpm")
    a = sample.generate(pipe, PROMPTS[:2], [5, 6], **kw)
    b = sample.generate(pipe, PROMPTS[:2], [5, 6], **kw)
    c = sample.generate(pipe, PROMPTS[:2], [7, 6], **kw)
    assert a.dtype == torch.uint8 and a.shape == (2, 16, 16, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])  # image 1 does not depend on image 0's seed
    assert a.float().std() > 5  # the tiny random model gives non-trivial pictures


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp_2m", 0.0)])
def test_image_in_batch_equals_image_alone(pipe, sampler, eta):
    kw = dict(cfg=4.0, steps=4, sampler=sampler, eta=eta, guidance_rescale=0.5)
    batch = sample.sample_latents(pipe, PROMPTS, [10, 11, 12], **kw)
    for i in range(3):
        alone = sample.sample_latents(pipe, PROMPTS[i:i + 1], [10 + i], **kw)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    # and through generate() with different batch sizes, down to the uint8 pixels
    a = sample.generate(pipe, PROMPTS, [10, 11, 12], batch_size=3, **kw)
    b = sample.generate(pipe, PROMPTS, [10, 11, 12], batch_size=2, **kw)
    assert (a.int() - b.int()).abs().max() <= 1


def test_cfg_one_is_the_conditional_sampler(pipe):
    kw = dict(steps=5, sampler="ddim")
    got = sample.sample_latents(pipe, PROMPTS, [1, 2, 3], cfg=1.0, **kw)
    torch.testing.assert_close(got, reference_sample(pipe, PROMPTS, [1, 2, 3], **kw), rtol=0, atol=1e-6)
    # the CFG path at scale 1 gives the same samples (invariant: uncond + 1 * (cond - uncond) = cond)
    cfg_path = reference_sample(pipe, PROMPTS, [1, 2, 3], uncond_caption="", cfg=1.0, **kw)
    torch.testing.assert_close(got, cfg_path, rtol=1e-4, atol=1e-4)


def test_negative_prompt_is_the_unconditional_caption(pipe):
    kw = dict(steps=4, sampler="dpmpp_2m")
    got = sample.sample_latents(pipe, PROMPTS, [4, 5, 6], cfg=5.0, negative="a purple square", **kw)
    ref = reference_sample(pipe, PROMPTS, [4, 5, 6], uncond_caption="a purple square", cfg=5.0, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    plain = sample.sample_latents(pipe, PROMPTS, [4, 5, 6], cfg=5.0, **kw)
    torch.testing.assert_close(plain, reference_sample(pipe, PROMPTS, [4, 5, 6], uncond_caption="", cfg=5.0, **kw),
                               rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_truncated_checkpoint_exits_2(ckpt, tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(bad), "--device", "cpu", "a red circle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "truncated" in lines[0] and str(bad) in lines[0], r.stderr


@pytest.mark.parametrize("case", ["missing", "foreign"])
def test_missing_or_foreign_checkpoint_exits_2(tmp_path, capsys, case):
    path = tmp_path / "ckpt.pt"
    if case == "foreign":  # a readable file without train.py's keys
        torch.save({"model": {}, "config": {}}, path)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(path), "a red circle"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = "not found" if case == "missing" else "not a train.py checkpoint: missing ema, model_config"
    assert len(err) == 1 and want in err[0], err


def test_cli_writes_pngs_and_grid(ckpt, pipe, tmp_path):
    out = tmp_path / "samples"
    sample.main(["--ckpt", str(ckpt), "--device", "cpu", "--n", "2", "--seed", "3", "--steps", "3", "--cfg", "2.5",
                 "--batch", "3", "--out", str(out), PROMPTS[0], PROMPTS[1]])
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    want = sample.generate(pipe, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, [3, 4, 5, 6], cfg=2.5, steps=3)
    for k in range(4):
        im = Image.open(out / f"{k:04d}.png")
        assert im.text["prompt"] == PROMPTS[k // 2] and im.text["seed"] == str(3 + k)
        assert '"cfg": 2.5' in im.text["parameters"] and '"sampler": "ddim"' in im.text["parameters"]
        assert np.abs(np.asarray(im).astype(int) - want[k].numpy().astype(int)).max() <= 1
    assert Image.open(out / "grid.png").size == (2 * 258 + 2, 2 * 258 + 2)  # 2 x 2 tiles of 16 px enlarged 16x, pad 2


def test_size_writes_non_square_pngs(ckpt, pipe, tmp_path):
    """--size 64x32 on a checkpoint trained at 16 x 16: 64 px wide, 32 high PNGs (grid too) that are generate()'s
    size=(64, 32) images, with the size in their settings; the DiT runs on the 16 x 32 grid of patches."""
    out = tmp_path / "wide"
    sample.main(["--ckpt", str(ckpt), "--device", "cpu", "--n", "2", "--seed", "3", "--steps", "3", "--cfg", "2.5",
                 "--size", "64x32", "--out", str(out), PROMPTS[0]])
    want = sample.generate(pipe, [PROMPTS[0]] * 2, [3, 4], cfg=2.5, steps=3, size=(64, 32))
    assert want.shape == (2, 32, 64, 3) and want.float().std() > 5
    for k in range(2):
        im = Image.open(out / f"{k:04d}.png")
        assert im.size == (64, 32) and '"size": "64x32"' in im.text["parameters"]
        assert np.abs(np.asarray(im).astype(int) - want[k].numpy().astype(int)).max() <= 1
    assert Image.open(out / "grid.png").size == (2 * (512 + 2) + 2, 256 + 2 + 2)  # 2 tiles enlarged 8x, pad 2
    # a tall image is its own picture, not the wide one turned: positions are per axis
    assert pipe.latent_shape((32, 64)) == (3, 64, 32) and pipe.latent_shape((64, 32)) == (3, 32, 64)
    tall = sample.sample_latents(pipe, [PROMPTS[0]], [3], cfg=2.5, steps=3, size=(32, 64))
    assert tall.shape == (1, 3, 64, 32) and torch.isfinite(tall).all()
    # batch independence holds on the non-square grid too
    wide = sample.sample_latents(pipe, PROMPTS, [1, 2, 3], cfg=2.5, steps=3, size=(64, 32))
    alone = sample.sample_latents(pipe, PROMPTS[1:2], [2], cfg=2.5, steps=3, size=(64, 32))
    torch.testing.assert_close(wide[1:2], alone, rtol=1e-5, atol=1e-5)


def test_default_size_is_the_square_resolution_bitwise(ckpt, pipe, tmp_path):
    """No size, and size = the training resolution, give the latents of the square sampler as it was (x_T drawn in
    the shape (C, R/f, R/f) directly) bit for bit, and the CLI's PNGs byte for byte."""
    kw = dict(cfg=3.0, steps=4, sampler="ddim")
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    x_T = torch.stack([torch.randn((3, 16, 16), generator=g) for g in gens])
    states, pooled = pipe.text_encoder([""])  # the empty caption encoded once, as sample_latents does
    uncond = (states.expand(2, -1, -1), pooled.expand(2, -1))
    before = pipe.diffusion.sample(lambda x, t, c: pipe.model(x, t, c[0], c[1]).float(), x_T,
                                   pipe.text_encoder(PROMPTS[:2]), uncond=uncond, generator=gens, **kw)
    assert torch.equal(sample.sample_latents(pipe, PROMPTS[:2], [5, 6], **kw), before)
    assert torch.equal(sample.sample_latents(pipe, PROMPTS[:2], [5, 6], size=(16, 16), **kw), before)
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--n", "1", "--steps", "2", "--seed", "5"]
    sample.main(argv + ["--out", str(tmp_path / "a"), PROMPTS[0]])
    sample.main(argv + ["--size", "16x16", "--out", str(tmp_path / "b"), PROMPTS[0]])
    assert (tmp_path / "a" / "0000.png").read_bytes() == (tmp_path / "b" / "0000.png").read_bytes()
    assert '"size": "16x16"' in Image.open(tmp_path / "a" / "0000.png").text["parameters"]


def with_config(ckpt, path, **changes):
    """A copy of the tiny checkpoint with its train config changed (e.g. text_chunks), and model_config's text_len
    following text_chunks as train.py's text_len 0 does."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["config"].update(changes)
    saved["model_config"]["text_len"] = 77 * changes.get("text_chunks", 1)
    save_checkpoint(str(path), saved)
    return path


def test_text_chunks_in_the_checkpoint_encode_prompts_as_in_training(ckpt, pipe, tmp_path):
    """text_chunks=2 in a checkpoint's config: prompts become 154 token states (each chunk the tower's own, see
    test_encoders.py), the model cross-attends to all of them and samples; a prompt's second chunk changes the
    picture. A checkpoint without the key (before it existed) keeps 77 tokens; a bad value exits 2."""
    assert pipe.text_encoder.chunks == 1 and sample.encode_text(pipe, PROMPTS)[0].shape == (3, 77, 64)
    two = sample.load_pipeline(str(with_config(ckpt, tmp_path / "two.pt", text_chunks=2)), "cpu")
    assert two.text_encoder.chunks == 2 and two.model.config.text_len == 154
    head = " ".join(["red circle"] * 37)  # 74 BPE tokens: the first chunk alone
    prompts = [head, head + " on a blue background"]  # the second runs into a second chunk
    states, pooled = sample.encode_text(two, prompts)
    assert states.shape == (2, 154, 64) and pooled.shape == (2, 64)
    plain_states, plain_pooled = sample.encode_text(pipe, prompts)  # the first chunk is the 77-token tower's
    assert torch.equal(states[:, :77], plain_states) and torch.equal(pooled, plain_pooled)
    empty = two.text_encoder(["", ""])[0][0, :77]  # a batch of 2 too: a matmul's rounding depends on the batch size
    assert torch.equal(states[0, 77:], empty)  # the chunk a caption does not reach is the empty caption's
    assert (states[0, 77:] - states[1, 77:]).abs().max() > 1e-2
    kw = dict(cfg=3.0, steps=3, sampler="ddim")
    a = sample.sample_latents(two, prompts, [1, 1], **kw)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all() and (a[0] - a[1]).abs().max() > 1e-3
    with pytest.raises(sample.CheckpointError, match="text_chunks must be 1..3"):
        sample.load_pipeline(str(with_config(ckpt, tmp_path / "bad.pt", text_chunks=4)), "cpu")


def test_a_second_run_never_overwrites_the_first(ckpt, tmp_path):
    """Same --out twice: the first run's files stay byte for byte, the second goes to OUT-2; a user's folder of
    other files is left alone too (OUT-3), and no temporary .part file is left anywhere."""
    out = tmp_path / "samples"
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--n", "1", "--steps", "2", "--out", str(out)]
    sample.main(argv + [PROMPTS[0]])
    first = {f: (out / f).read_bytes() for f in os.listdir(out)}
    sample.main(argv + [PROMPTS[1]])
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == first
    assert sorted(os.listdir(tmp_path / "samples-2")) == ["0000.png", "grid.png"]
    assert Image.open(tmp_path / "samples-2" / "0000.png").text["prompt"] == PROMPTS[1]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "0000.png").write_bytes(b"a user's file")
    sample.main(argv[:-1] + [str(tmp_path / "mine"), PROMPTS[1]])
    assert (tmp_path / "mine" / "0000.png").read_bytes() == b"a user's file"
    assert sorted(os.listdir(tmp_path / "mine-2")) == ["0000.png", "grid.png"]
    assert not [p for p in tmp_path.rglob("*.part")]


@pytest.mark.parametrize("args, want", [
    (["--eta", "-1"], "--eta must be >= 0"),
    (["--steps", "0"], "--steps and --batch must be >= 1"),
    (["--steps", "1001"], "--steps must be <= the 1000 training timesteps"),
    (["--device", "bogus"], "--device 'bogus'"),
    (["--size", "31x32"], "--size 31x32: width and height must be positive multiples of 2 (the VAE's factor 1 x"),
    (["--size", "32x0"], "--size 32x0: width and height must be positive multiples of 2"),
    (["--size", "wide"], "argument --size: expects WIDTHxHEIGHT in pixels (e.g. 512x256), got 'wide'"),
    (["--weights", "model", "STRIP"], "has no 'model' weights (try --weights ema)"),
    (["--cfg_interval", "0.5,0.2"], "cfg_interval (0.5, 0.2): needs 0 <= LO <= HI <= 1"),
    (["--cfg_interval", "0,1.5"], "needs 0 <= LO <= HI <= 1"),
    (["--cfg_interval", "0.5"], "argument --cfg_interval: cfg_interval must be LO,HI"),
    (["--apg", "0", "--cfg_zero_star", "true"], "APG and CFG-Zero* each replace the CFG update: choose one"),
    (["--apg", "0", "--guidance_rescale", "0.5"], "APG with guidance_rescale > 0 is refused"),
    (["--apg", "0", "--apg_norm", "0"], "apg_norm (r, the norm threshold) must be > 0"),
    (["--apg", "-1"], "apg (eta, the weight of the parallel component) must be >= 0"),
    (["--apg_momentum", "-0.5"], "--apg_norm and --apg_momentum set APG, which is off: give --apg ETA too"),
    (["--cfg_zero_star", "true"], "CFG-Zero* is for flow models"),  # the tiny checkpoint predicts v
    (["--cfg_zero_star", "maybe"], "argument --cfg_zero_star: expects a boolean"),
])
def test_bad_settings_exit_2_with_one_line(ckpt, tmp_path, capsys, args, want):
    if "STRIP" in args:  # a release checkpoint that ships only the EMA weights
        stripped = {k: v for k, v in torch.load(ckpt, weights_only=True).items() if k != "model"}
        torch.save(stripped, tmp_path / "ema_only.pt")
        args = [a for a in args if a != "STRIP"] + ["--ckpt", str(tmp_path / "ema_only.pt")]
    else:
        args = args + ["--ckpt", str(ckpt)]
    with pytest.raises(SystemExit) as e:
        device = ["--device", "cpu"] * ("--device" not in args)
        sample.main(args + device + ["--out", str(tmp_path / "o"), "a red circle"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert want in err[-1], err
    assert not (tmp_path / "o").exists()  # nothing was sampled or written


@pytest.mark.parametrize("flag,compiled", [([], False), (["--compile", "false"], False), (["--compile", "TRUE"], True),
                                          (["--compile", "1"], True)])
def test_compile_flag_compiles_the_denoiser_generate_uses(ckpt, tmp_path, monkeypatch, flag, compiled):
    """--compile (default: on for CUDA, off on the CPU) hands the model generate calls to torch.compile; the images
    are those of the eager model (torch.compile is replaced by a recorder here: the wiring, not Inductor, is tested;
    test_model.py checks compiled against eager numbers)."""
    calls = []

    class Compiled:  # a recorder that, like torch.compile's OptimizedModule, forwards attributes to the module
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return getattr(self.module, name)

        def __call__(self, *a, **k):
            calls.append("called")
            return self.module(*a, **k)

    def fake_compile(module, **kw):
        calls.append(module)
        return Compiled(module)
    monkeypatch.setattr(torch, "compile", fake_compile)
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--n", "1", "--steps", "2", "--seed", "5"]
    sample.main(argv + flag + ["--out", str(tmp_path / "a"), PROMPTS[0]])
    assert (len(calls) > 0) == compiled and (not compiled or (type(calls[0]).__name__ == "DiT" and "called" in calls))
    sample.main(argv + ["--out", str(tmp_path / "b"), PROMPTS[0]])
    assert (tmp_path / "a" / "0000.png").read_bytes() == (tmp_path / "b" / "0000.png").read_bytes()


def test_compile_flag_takes_only_booleans(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--device", "cpu", "--compile", "maybe", "--out", str(tmp_path / "o"), "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--compile: expects a boolean (true/false/1/0), got 'maybe'" in err[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--device", "cuda", "a red circle"])
    assert e.value.code == 2 and "sees no CUDA device" in capsys.readouterr().err


def test_fresh_path_reserves_what_it_returns(tmp_path):
    """The name is created when it is chosen, so two runs choosing at once get different files; a folder stays free
    while it is empty (a run that died before writing leaves nothing to protect)."""
    a, b = sample.fresh_path(str(tmp_path / "s"), folder=True), sample.fresh_path(str(tmp_path / "s"), folder=True)
    assert a == b == str(tmp_path / "s") and (tmp_path / "s").is_dir()  # created at once; empty, so still free
    (tmp_path / "s" / "0000.png").write_bytes(b"x")
    assert sample.fresh_path(str(tmp_path / "s"), folder=True) == str(tmp_path / "s-2")
    assert sample.fresh_path(str(tmp_path / "s"), folder=True) == str(tmp_path / "s-2")  # still empty: reused
    assert sample.fresh_path(str(tmp_path / "s") + os.sep, folder=True) == str(tmp_path / "s-2")  # a trailing slash
    files = [sample.fresh_path(str(tmp_path / "eval.json")) for _ in range(3)]
    assert files == [str(tmp_path / n) for n in ("eval.json", "eval-2.json", "eval-3.json")]


def test_grid_enlarges_small_images_by_an_integer_factor():
    """Nearest-neighbour by an integer factor (numpy's kron as the reference) to >= 256 px a cell; 256 px stays."""
    rng = np.random.default_rng(0)
    small = torch.from_numpy(rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    grid = np.asarray(sample.make_grid(small, cols=2, pad=2))
    assert grid.shape == (2 * (256 + 2) + 2, 2 * (256 + 2) + 2, 3)
    for k in range(3):
        r, c = divmod(k, 2)
        cell = grid[2 + r * 258: 2 + r * 258 + 256, 2 + c * 258: 2 + c * 258 + 256]
        assert np.array_equal(cell, np.kron(small[k].numpy(), np.ones((16, 16, 1), np.uint8)))
    assert (grid[2 + 258:, 2 + 258:] == 255).all()  # the empty fourth cell is padding colour
    big = torch.from_numpy(rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(sample.make_grid(big, cols=1, pad=0)), big[0].numpy())


# ----------------------------------------------------------------------------- guidance at sampling

@pytest.fixture(scope="module")
def flow_pipe(tmp_path_factory):
    return sample.load_pipeline(str(make_tiny_checkpoint(tmp_path_factory.mktemp("flow") / "ckpt.pt",
                                                         prediction="flow")), "cpu")


@pytest.mark.parametrize("kind,guidance", [
    ("v", dict(cfg_interval=(0.2, 0.7))), ("v", dict(apg=0.0, apg_norm=1.5, apg_momentum=-0.5)),
    ("flow", dict(cfg_zero_star=True, cfg_interval=(0.0, 0.8))), ("flow", dict(apg=0.5))])
def test_guidance_reaches_the_sampler(pipe, flow_pipe, kind, guidance):
    """sample_latents / generate pass the guidance options to diffusion.sample as they are (the oracle: the sampler
    driven directly), with the same batch independence as plain CFG; each option changes the samples."""
    p = pipe if kind == "v" else flow_pipe
    kw = dict(cfg=4.0, steps=5)
    got = sample.sample_latents(p, PROMPTS, [1, 2, 3], **kw, **guidance)
    torch.testing.assert_close(got, reference_sample(p, PROMPTS, [1, 2, 3], uncond_caption="", **kw, **guidance),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:2], sample.sample_latents(p, PROMPTS[1:2], [2], **kw, **guidance),
                               rtol=1e-5, atol=1e-5)
    assert (got - sample.sample_latents(p, PROMPTS, [1, 2, 3], **kw)).abs().max() > 1e-3
    images = sample.generate(p, PROMPTS, [1, 2, 3], batch_size=2, **kw, **guidance)
    assert (images.int() - sample.generate(p, PROMPTS, [1, 2, 3], **kw, **guidance).int()).abs().max() <= 1


def test_cli_guidance_flags_reach_the_images_and_their_settings(ckpt, pipe, tmp_path):
    out = tmp_path / "g"
    sample.main(["--ckpt", str(ckpt), "--device", "cpu", "--n", "1", "--steps", "3", "--cfg", "4", "--cfg_interval",
                 "0.1,0.9", "--apg", "0.5", "--apg_momentum", "-0.5", "--out", str(out), PROMPTS[0]])
    im = Image.open(out / "0000.png")
    settings = json.loads(im.text["parameters"])
    assert {k: settings[k] for k in ("cfg_interval", "apg", "apg_norm", "apg_momentum", "cfg_zero_star")} == dict(
        cfg_interval=[0.1, 0.9], apg=0.5, apg_norm=2.5, apg_momentum=-0.5, cfg_zero_star=False)
    want = sample.generate(pipe, [PROMPTS[0]], [0], cfg=4.0, steps=3, cfg_interval=(0.1, 0.9), apg=0.5,
                           apg_momentum=-0.5)
    assert np.abs(np.asarray(im).astype(int) - want[0].numpy().astype(int)).max() <= 1


def test_guidance_errors_exit_before_the_heavy_loads(ckpt, tmp_path, monkeypatch, capsys):
    """Flag-only errors before the checkpoint is read; CFG-Zero* on a v checkpoint before the VAE and text encoder."""
    def never(*a, **k):
        raise AssertionError("loaded")
    monkeypatch.setattr(sample, "load_checkpoint", never)
    for bad in (["--cfg_interval", "0.9,0.1"], ["--apg", "0", "--cfg_zero_star", "1"]):
        with pytest.raises(SystemExit) as e:
            sample.main(bad + ["--ckpt", str(ckpt), "--device", "cpu", "x"])
        assert e.value.code == 2
    monkeypatch.undo()
    monkeypatch.setattr(sample, "load_vae", never)
    monkeypatch.setattr(sample, "load_text_encoder", never)
    with pytest.raises(SystemExit) as e:
        sample.main(["--cfg_zero_star", "true", "--ckpt", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "o"),
                     "x"])
    assert e.value.code == 2 and "CFG-Zero* is for flow models" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
