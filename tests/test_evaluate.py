"""evaluate.py: FID / IS / CLIP score against references, the offline end-to-end run, the shapes and scenes
probes (the networks themselves: test_encoders.py)."""
import json
import math
import random
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from scipy import linalg

import evaluate
import sample
import toys
from ckpt_utils import make_tiny_checkpoint, tiny_clip_scorer

#################################################################################
#                                  FID / IS                                     #
#################################################################################

def random_stats(rng, d, n):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


def pytorch_fid_formula(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance, restated: scipy sqrtm of S1 S2, real part."""
    covmean = linalg.sqrtm(s1.dot(s2)).real
    return (mu1 - mu2).dot(mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def eigvals_fid(mu1, s1, mu2, s2):
    """Another algorithm for the same number: Tr (S1 S2)^1/2 = sum sqrt(eigenvalues(S1 S2)) (torch-fidelity's)."""
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr


def test_frechet_distance_matches_pytorch_fid_formula():
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = random_stats(rng, 32, 200), random_stats(rng, 32, 300)
    got = evaluate.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(pytorch_fid_formula(mu1, s1, mu2, s2), rel=1e-10)
    assert got == pytest.approx(eigvals_fid(mu1, s1, mu2, s2), rel=1e-6)
    # closed form for diagonal covariances: ||dmu||^2 + sum (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    want = ((mu1[:8] - mu2[:8]) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert evaluate.frechet_distance(mu1[:8], np.diag(a), mu2[:8], np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_is_zero_for_identical_stats():
    mu, s = random_stats(np.random.default_rng(1), 64, 500)
    assert abs(evaluate.frechet_distance(mu, s, mu, s)) < 1e-6


@pytest.mark.parametrize("failure", ["nan", "raise"])  # older scipy returns NaN, newer raises LinAlgError
def test_frechet_distance_singular_covariance(monkeypatch, failure):
    rng = np.random.default_rng(2)
    (mu1, s1), (mu2, s2) = random_stats(rng, 32, 6), random_stats(rng, 32, 9)  # rank 5 and 8 in 32 dims
    got = evaluate.frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(got) and got == pytest.approx(eigvals_fid(mu1, s1, mu2, s2), rel=1e-4)
    # when sqrtm fails on the singular product, the eps-offset fallback of pytorch-fid is taken
    calls, real_sqrtm = [], linalg.sqrtm

    def failing_first(m):
        calls.append(m)
        if len(calls) == 1 and failure == "raise":
            raise linalg.LinAlgError("Internal error in scipy.linalg.sqrtm: -102")
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(evaluate.linalg, "sqrtm", failing_first)
    eps, off = 1e-6, 1e-6 * np.eye(32)
    got = evaluate.frechet_distance(mu1, s1, mu2, s2, eps=eps)
    assert len(calls) == 2
    assert got == pytest.approx(pytorch_fid_formula(mu1, s1 + off, mu2, s2 + off) - 2 * 32 * eps, abs=1e-3)
    assert got == pytest.approx(eigvals_fid(mu1, s1, mu2, s2), rel=1e-3)


def test_inception_score_invariants():
    logits = torch.randn(1, 1008).repeat(100, 1)  # every image predicts the same distribution
    mean, std = evaluate.inception_score(logits)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    k = 7
    onehot = torch.full((10 * k * 3, 1008), -1e4, dtype=torch.float64)
    onehot[torch.arange(len(onehot)), torch.arange(len(onehot)) % k] = 0  # each split uses the k classes equally
    mean, std = evaluate.inception_score(onehot)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_too_few_images_are_refused_not_scored():
    """IS over 10 splits of < 10 images would have one-image splits (KL 0: IS exactly 1 whatever the images),
    and a covariance needs 2 images: both raise instead of returning a number."""
    with pytest.raises(ValueError, match="needs >= 10 images"):
        evaluate.inception_score(torch.randn(9, 1008))
    with pytest.raises(ValueError, match=">= 2 images"):
        evaluate.feature_stats(np.ones((1, 16)))


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = 3 * torch.randn(250, 1008, generator=torch.Generator().manual_seed(0))
    mean, std = evaluate.inception_score(logits)
    ref = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-8)

#################################################################################
#                    End to end, offline, injected feature networks             #
#################################################################################

class TinyFeatures(nn.Module):
    """A small random conv net standing in for Inception: uint8 images -> (16-d features, 10 logits)."""
    name = "tiny-random-net"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        self.head = nn.Linear(16, 10)
        self.calls = 0

    @torch.no_grad()
    def forward(self, images):
        self.calls += 1
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return f.double(), self.head(f).double()


@pytest.fixture(scope="module")
def tiny_clip():
    return tiny_clip_scorer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")


def test_evaluate_end_to_end(ckpt, tmp_path, tiny_clip, capsys):
    prompts = ["a red circle on a white background", "a blue square", "a yellow triangle", "a green thing"]
    (tmp_path / "prompts.jsonl").write_text("\n".join(
        json.dumps({"text": p} if i % 2 else {"caption": p}) for i, p in enumerate(prompts)))
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # other sizes than the model's 16 px: the loader crops and resizes them
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(ref_dir / f"{i:02d}.png")
    net = TinyFeatures()
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--prompts", str(tmp_path / "prompts.jsonl"), "--ref", str(ref_dir),
            "--n", "20", "--cfg", "1,3", "--steps", "3", "--batch", "10", "--seed", "5",
            "--stats_cache", str(tmp_path / "stats"), "--out", str(tmp_path / "eval.json")]
    evaluate.main(argv + ["--save_images", str(tmp_path / "samples")], extractor=net, clip_scorer=tiny_clip)
    printed = capsys.readouterr().out
    assert "| cfg | n | FID | IS | CLIP score |" in printed
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [r["cfg"] for r in report["results"]] == [1.0, 3.0] and report["feature_extractor"] == net.name
    assert report["step"] == 7 and report["reference"]["n"] == 12
    for r in report["results"]:
        assert r["n"] == 20 and f"| {r['cfg']:g} | 20 | {r['fid']:.2f} |" in printed and r["clip_score"] > 0

    # the numbers recomputed from the same images, outside evaluate(): captions cycle, seeds seed + k
    pipe = sample.load_pipeline(str(ckpt), "cpu")
    refs = torch.from_numpy(np.stack([evaluate.load_image(str(ref_dir / f"{i:02d}.png"), 16) for i in range(12)]))
    ref_mu, ref_sigma = evaluate.feature_stats(net(refs)[0].numpy())
    captions = [prompts[k % 4] for k in range(20)]
    for r in report["results"]:
        images = sample.generate(pipe, captions, [5 + k for k in range(20)], cfg=r["cfg"], steps=3)
        feats, logits = net(images)
        assert r["fid"] == pytest.approx(evaluate.frechet_distance(*evaluate.feature_stats(feats.numpy()),
                                                                   ref_mu, ref_sigma), rel=1e-6)
        is_mean, is_std = evaluate.inception_score(logits)  # 10 splits of 2 images
        assert r["is_mean"] == pytest.approx(is_mean, rel=1e-6) and r["is_std"] == pytest.approx(is_std, rel=1e-6)
        assert is_std > 0
        assert r["clip_score"] == pytest.approx(float(tiny_clip(images, captions).mean()), rel=1e-5)

    # second run: reference statistics come from the cache (the extractor sees only the 2 x 2 generated batches)
    cached = list((tmp_path / "stats").iterdir())
    assert len(cached) == 1
    net.calls = 0
    evaluate.main(argv, extractor=net, clip_scorer=tiny_clip)
    assert net.calls == 4
    again = json.loads((tmp_path / "eval-2.json").read_text())  # the first run's eval.json is kept, not overwritten
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    assert [r["fid"] for r in again["results"]] == [r["fid"] for r in report["results"]]
    # invariant: the saved cfg-1 samples as the reference set give FID 0 at cfg 1 (PNG round trip included)
    argv[argv.index("--ref") + 1] = str(tmp_path / "samples" / "cfg1")
    evaluate.main(argv, extractor=net, clip_scorer=tiny_clip)
    self_fid = json.loads((tmp_path / "eval-3.json").read_text())["results"]
    assert abs(self_fid[0]["fid"]) < 1e-6 and self_fid[1]["fid"] > 1e-3  # cfg 3 gives other pictures
    # a cached .npz works as --ref on its own
    stats = evaluate.reference_stats(str(cached[0]), net, 16)
    np.testing.assert_allclose(stats["mu"], ref_mu, rtol=1e-10)
    np.testing.assert_allclose(stats["sigma"], ref_sigma, rtol=1e-8, atol=1e-12)


def test_read_prompts_txt(tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\n\n  a blue car  \n")
    assert evaluate.read_prompts(str(tmp_path / "p.txt")) == ["a red fox", "a blue car"]

#################################################################################
#                                  Shapes probe                                 #
#################################################################################

def all_combos(copies):
    return [(c, k, b) for c in toys.SHAPE_COLORS for k in toys.SHAPE_KINDS for b in toys.SHAPE_BACKGROUNDS
            for _ in range(copies)]


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_probe_scores_ground_truth_renders(resolution):
    combos = all_combos(4)
    rng = random.Random(resolution)
    images = np.stack([np.asarray(toys.render_shape(c, k, b, resolution, rng)) for c, k, b in combos])
    acc = evaluate.probe_accuracy(images, [c for c, _, _ in combos], [k for _, k, _ in combos])
    assert acc["n"] == len(combos)
    assert acc["color_acc"] >= 0.95 and acc["shape_acc"] >= 0.95 and acc["both_acc"] >= 0.95, acc
    # and with sampling-like pixel noise (Gaussian, std 20 of 255) on top
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    acc = evaluate.probe_accuracy(noisy, [c for c, _, _ in combos], [k for _, k, _ in combos])
    assert acc["color_acc"] >= 0.95 and acc["shape_acc"] >= 0.95 and acc["both_acc"] >= 0.95, acc


def test_probe_scores_noise_near_chance():
    combos = all_combos(2)
    noise = np.random.default_rng(0).integers(0, 256, (len(combos), 32, 32, 3), dtype=np.uint8)
    acc = evaluate.probe_accuracy(noise, [c for c, _, _ in combos], [k for _, k, _ in combos])
    assert acc["color_acc"] <= 1 / len(toys.SHAPE_COLORS) + 0.1, acc
    assert acc["shape_acc"] <= 1 / len(toys.SHAPE_KINDS) + 0.1, acc
    assert acc["both_acc"] <= 1 / (len(toys.SHAPE_COLORS) * len(toys.SHAPE_KINDS)) + 0.05, acc


def test_probe_shapes_on_a_pipeline(ckpt):
    pipe = sample.load_pipeline(str(ckpt), "cpu")
    got = evaluate.probe_shapes(pipe, cfg=2.0, n_per_prompt=1, steps=2, seed=3, batch_size=27)
    combos = all_combos(1)
    images = sample.generate(pipe, [toys.shapes_caption(*c) for c in combos], [3 + i for i in range(len(combos))],
                             cfg=2.0, steps=2, batch_size=27)
    want = evaluate.probe_accuracy(images, [c for c, _, _ in combos], [k for _, k, _ in combos])
    assert got == dict(cfg=2.0, t_start=None, **want) and got["n"] == 54


GUIDANCE = dict(cfg_interval=(0.1, 0.8), apg=0.0, apg_norm=1.5, apg_momentum=-0.5, cfg_zero_star=False)
GUIDANCE_FLAGS = ["--cfg_interval", "0.1,0.8", "--apg", "0", "--apg_norm", "1.5", "--apg_momentum", "-0.5"]


def test_guidance_flags_reach_the_metrics_and_the_probes(ckpt, tmp_path, monkeypatch):
    """The guidance flags reach every generate() call of the metrics, the shapes probe and the scenes probe, and
    the report's settings; the shapes probe's numbers are the reader's on generate()'s guided images."""
    seen, real = [], evaluate.generate

    def recording(*a, **kw):
        seen.append({k: kw.get(k) for k in list(GUIDANCE) + ["eta", "guidance_rescale"]})
        return real(*a, **kw)

    monkeypatch.setattr(evaluate, "generate", recording)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    out = tmp_path / "eval.json"
    evaluate.main(["--ckpt", str(ckpt), "--device", "cpu", "--prompts", str(tmp_path / "prompts.txt"), "--n", "10",
                   "--clip", "none", "--probe", "shapes", "--probe_n", "1", "--cfg", "2", "--steps", "2",
                   "--batch", "54", "--eta", "0.5", "--out", str(out)] + GUIDANCE_FLAGS, extractor=TinyFeatures())
    report = json.loads(out.read_text())
    assert len(seen) == 2 and all(c == dict(GUIDANCE, eta=0.5, guidance_rescale=0.0) for c in seen), seen
    assert {k: report["settings"][k] for k in GUIDANCE} == dict(GUIDANCE, cfg_interval=[0.1, 0.8])
    combos = all_combos(1)
    images = sample.generate(sample.load_pipeline(str(ckpt), "cpu"), [toys.shapes_caption(*c) for c in combos],
                             list(range(len(combos))), cfg=2.0, steps=2, batch_size=54, eta=0.5, **GUIDANCE)
    want = evaluate.probe_accuracy(images, [c for c, _, _ in combos], [k for _, k, _ in combos])
    assert report["probe_shapes"] == [dict(cfg=2.0, t_start=None, **want)]
    seen.clear()
    ckpt32 = make_tiny_checkpoint(tmp_path / "ckpt32.pt", resolution=32)
    evaluate.main(["--ckpt", str(ckpt32), "--device", "cpu", "--probe", "scenes", "--probe_n", "1", "--cfg", "2",
                   "--steps", "1", "--batch", "64", "--out", str(tmp_path / "scenes.json")] + GUIDANCE_FLAGS)
    assert len(seen) == 2 and all(c == dict(GUIDANCE, eta=0.0, guidance_rescale=0.0) for c in seen), seen


def test_probe_from_a_noised_render(ckpt, tmp_path, capsys):
    """From t_start = 0 the sampler starts at the true render (noise std 0.03): even this untrained model hands it
    back, so colour and shape are read right; from pure noise it is near chance. The CLI reports both rows."""
    pipe = sample.load_pipeline(str(ckpt), "cpu")
    near = evaluate.probe_shapes(pipe, cfg=2.0, n_per_prompt=1, steps=2, seed=3, batch_size=27, t_start=0)
    assert near["t_start"] == 0 and near["color_acc"] >= 0.95 and near["shape_acc"] >= 0.95, near
    far = evaluate.probe_shapes(pipe, cfg=2.0, n_per_prompt=1, steps=2, seed=3, batch_size=27)
    assert far["shape_acc"] < 0.7 and far["color_acc"] < 0.7, far
    out = tmp_path / "eval.json"
    evaluate.main(["--ckpt", str(ckpt), "--device", "cpu", "--probe", "shapes", "--probe_from", "0", "--probe_n", "1",
                   "--cfg", "2", "--steps", "2", "--seed", "3", "--batch", "27", "--out", str(out)])
    rows = json.loads(out.read_text())["probe_shapes"]
    assert [r["t_start"] for r in rows] == [None, 0] and rows == [far, near]
    assert "| t=0 | 2 | 54 |" in capsys.readouterr().out
    for bad in (["--probe_from", "1000"], ["--probe_from", "x"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--ckpt", str(ckpt), "--device", "cpu", "--probe", "shapes", "--out", str(out)] + bad)
        assert e.value.code == 2


@pytest.mark.parametrize("args, want", [
    (["--cfg", ","], "--cfg needs at least one scale"),
    (["--batch", "0"], "--steps and --batch must be >= 1"),
    (["--eta", "-0.5"], "--eta must be >= 0"),
    (["--n", "5"], "5 samples per scale: the Inception Score over 10 splits needs >= 10"),
    (["--prompts", "MISSING"], "--prompts"),
    (["--steps", "5000"], "--steps must be <= the 1000 training timesteps"),
    (["--ref", "EMPTY"], "FID needs a reference set"),
    (["--cfg_interval", "0.8,0.2"], "needs 0 <= LO <= HI <= 1"),
    (["--apg", "0", "--cfg_zero_star", "true"], "choose one"),
    (["--apg", "0", "--apg_norm", "-1"], "apg_norm (r, the norm threshold) must be > 0"),
    (["--apg", "0.5", "--guidance_rescale", "0.7"], "APG with guidance_rescale > 0 is refused"),
    (["--cfg_zero_star", "true"], "CFG-Zero* is for flow models"),  # the tiny checkpoint predicts v
])
def test_bad_settings_exit_2_before_sampling(ckpt, tmp_path, capsys, args, want):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "empty").mkdir()
    args = [{"MISSING": str(tmp_path / "nope.txt"), "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in args]
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--prompts", str(tmp_path / "prompts.txt"), "--n", "20",
            "--clip", "none", "--out", str(tmp_path / "eval.json")]
    net = TinyFeatures()
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + args, extractor=net, clip_scorer=None)
    assert e.value.code == 2
    assert want in capsys.readouterr().err.strip().splitlines()[-1]
    assert net.calls == 0 and not (tmp_path / "eval.json").exists()  # nothing sampled, nothing written

#################################################################################
#                                  Scenes probe                                 #
#################################################################################

def test_scenes_truth_cli_scores_true_renders(tmp_path, capsys):
    """No checkpoint: true renders of both prompt sets, read back by the reader, are right (>= 0.99 required; 1.0
    by construction), and the tables and the JSON say so."""
    out = tmp_path / "truth.json"
    evaluate.main(["--probe", "scenes", "--truth", "--probe_n", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    row = json.loads(out.read_text())["probe_scenes"]
    assert len(row) == 1 and row[0]["truth"] and row[0]["resolution"] == toys.MIN_RESOLUTION
    seen, held = row[0]["in_distribution"], row[0]["held_out"]
    assert seen["overall"] >= 0.99 and held["overall"] >= 0.99
    assert seen["n"] == 2 * len(toys.in_distribution_prompts()) and held["single_object"] is None
    assert f"| in-distribution | {seen['n']} | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in printed
    assert f"| held-out | {held['n']} | - | 1.000 | - | 1.000 | 1.000 | 1.000 | 1.000 |" in printed
    prompts = json.loads(out.read_text())["probe_scenes_prompts"]
    assert prompts["held_out"] == [p.text for p in toys.held_out_prompts()]


def test_scenes_probe_on_a_checkpoint_of_another_set(tmp_path, capsys):
    """A checkpoint trained on shapes (here: an untrained 32-px one) runs through the probe and scores low; its
    numbers are the reader's on the same prompts and seeds sampled outside the probe."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt32.pt", resolution=32)
    out = tmp_path / "eval.json"
    evaluate.main(["--ckpt", str(ckpt), "--device", "cpu", "--probe", "scenes", "--probe_n", "1", "--cfg", "1",
                   "--steps", "1", "--seed", "4", "--batch", "64", "--out", str(out)])
    row = json.loads(out.read_text())["probe_scenes"][0]
    assert row["cfg"] == 1.0 and not row["truth"] and row["resolution"] == 32
    assert row["in_distribution"]["overall"] <= 0.1 and row["held_out"]["overall"] <= 0.1
    assert "scenes probe, cfg 1 at 32 px" in capsys.readouterr().out
    texts, specs, seeds = toys.probe_plan(toys.held_out_prompts(), 1, 4)
    images = sample.generate(sample.load_pipeline(str(ckpt), "cpu"), texts, seeds, cfg=1.0, steps=1, batch_size=64)
    assert row["held_out"] == toys.evaluate_images(images.numpy(), specs)


@pytest.mark.parametrize("args, want", [
    (["--probe", "scenes", "--truth", "--resolution", "16"], "--resolution: scenes need >= 32 px"),
    (["--probe", "scenes", "--ckpt", "CKPT16"], "--probe scenes: the checkpoint's images are too small"),
    (["--probe", "shapes", "--truth"], "--truth scores true renders of the scenes probe"),
    (["--probe", "scenes", "--ckpt", "CKPT16", "--resolution", "64"], "--resolution is --truth's render size"),
    (["--probe", "scenes", "--ckpt", "CKPT16", "--probe_from", "10"], "--probe_from needs --probe shapes"),
    (["--probe", "scenes_wide", "--truth", "--resolution", "32"], "--resolution: scenes_wide needs >= 40 px"),
    (["--probe", "scenes_wide", "--ckpt", "CKPT16"], "--probe scenes_wide: the checkpoint's images are too small"),
])
def test_scenes_probe_bad_settings_exit_2(ckpt, tmp_path, capsys, args, want):
    """A resolution the reader cannot read (asked for, or the checkpoint's 16 px) and misplaced options: one
    line, exit 2, nothing sampled or written."""
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(ckpt) if a == "CKPT16" else a for a in args] + ["--device", "cpu", "--out", str(out)])
    assert e.value.code == 2
    assert want in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


def test_scenes_wide_truth_cli_scores_true_renders_at_both_bucket_sizes(tmp_path, capsys):
    """--probe scenes_wide --truth: true renders at the 2:1 and 1:2 buckets of 40 px (56 x 28, 28 x 56), half the
    images each, all read right; the table has a row per set and size, then both sizes together."""
    out = tmp_path / "truth.json"
    evaluate.main(["--probe", "scenes_wide", "--truth", "--probe_n", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    row = json.loads(out.read_text())["probe_scenes_wide"][0]
    assert row["truth"] and row["resolution"] == toys.WIDE_MIN_RESOLUTION and row["sizes"] == ["56x28", "28x56"]
    for name, prompts in (("in_distribution", toys.in_distribution_prompts()), ("held_out", toys.held_out_prompts())):
        assert row[name]["overall"] == 1.0 and row[name]["n"] == 2 * len(prompts)
        assert [row["by_size"][s][name]["n"] for s in row["sizes"]] == [len(prompts)] * 2
    assert "scenes_wide probe, true renders at 56x28 and 28x56 px" in printed
    assert f"| held-out 28x56 | {len(toys.held_out_prompts())} | - | 1.000 | - | 1.000 | 1.000 | 1.000 | 1.000 |" \
        in printed


def test_scenes_wide_probe_samples_at_the_two_bucket_sizes(monkeypatch):
    """A stand-in pipeline whose generate draws a true render of each prompt at the size asked for (a perfect
    model): the probe asks for the 2:1 and 1:2 buckets of the checkpoint's resolution with sides multiples of the
    VAE factor x patch (data.bucket_size: issue 24's 368 x 176 for sd-vae-ft-mse at 256 px, patch 2), image k at
    the k % 2-th size, and reads every one right (an image scored against another's prompt would not be)."""
    calls = []

    def fake_generate(pipe, texts, seeds, size=None, **kw):
        calls.append((size, len(texts)))
        render = lambda text, seed: toys.render_spec(toys.parse_caption(text), seed, size or pipe.resolution)
        return torch.from_numpy(np.stack([np.asarray(render(t, s)) for t, s in zip(texts, seeds)]))

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    for resolution, factor, patch, want in ((40, 1, 4, [(56, 28), (28, 56)]), (256, 8, 2, [(368, 176), (176, 368)])):
        pipe = types.SimpleNamespace(resolution=resolution, vae=types.SimpleNamespace(factor=factor),
                                     model=types.SimpleNamespace(config=types.SimpleNamespace(patch=patch)))
        calls.clear()
        row = evaluate.probe_scenes(pipe, cfg=3.0, n_per_prompt=2, seed=1, wide=True)
        n_seen, n_held = 2 * len(toys.in_distribution_prompts()), 2 * len(toys.held_out_prompts())
        assert calls == [(want[0], n_seen // 2), (want[1], n_seen // 2), (want[0], n_held // 2), (want[1], n_held // 2)]
        assert row["sizes"] == ["%dx%d" % s for s in want] and row["cfg"] == 3.0 and not row["truth"]
        assert row["in_distribution"]["overall"] == row["held_out"]["overall"] == 1.0
    calls.clear()
    evaluate.probe_scenes(pipe, n_per_prompt=1)  # the square scenes probe: one call per set, the square size
    assert [size for size, _ in calls] == [None, None]


def test_scenes_wide_long_truth_prompts_describe_their_renders(tmp_path, capsys):
    """--probe scenes_wide_long --truth: each image's prompt is its short prompt, then every object of its true
    render with its place (it parses back to the spec and to the render's layout); in-distribution long prompts
    name no held-out pair; the true renders read right."""
    out = tmp_path / "truth.json"
    evaluate.main(["--probe", "scenes_wide_long", "--truth", "--probe_n", "2", "--seed", "3", "--out", str(out)])
    assert "scenes_wide_long probe, true renders at 56x28 and 28x56 px" in capsys.readouterr().out
    assert evaluate.LONG_PAIRS == {"in_distribution": toys.TRAIN_PAIRS, "held_out": toys.ALL_PAIRS}
    row = json.loads(out.read_text())["probe_scenes_wide_long"][0]
    sizes = [(56, 28), (28, 56)]
    for name, prompts in (("in_distribution", toys.in_distribution_prompts()), ("held_out", toys.held_out_prompts())):
        assert row[name]["overall"] == 1.0 and row[name]["n"] == 2 * len(prompts)
        texts, specs, seeds = toys.probe_plan(prompts, 2, 3)
        long = row["long_prompts"][name]
        assert len(long) == len(texts)
        for k, (short, spec, seed, text) in enumerate(zip(texts, specs, seeds, long)):
            grid = toys.grid_for(sizes[k % 2])
            parsed, objects = toys.parse_long_caption(text, grid)
            placed = toys.truth_layout(spec, seed, sizes[k % 2], evaluate.LONG_PAIRS[name])
            assert text.startswith(short + "; ") and parsed == spec
            assert objects == [(o.colour, o.kind, o.row, o.col) for o in placed]
            if name == "in_distribution":
                assert all((c, kind) in toys.TRAIN_PAIRS for c, kind, _, _ in objects), text


def test_scenes_wide_long_probe_prompts_the_model_with_the_long_text(monkeypatch):
    """A stand-in model that draws only what a long prompt says (each named object in its named cell, no jitter,
    nothing from the spec or the seed) is read right on every prompt: the probe hands generate the long texts at
    the size they were written for, and a long prompt carries all its spec asks (a position's cells included)."""
    calls = []

    def fake_generate(pipe, texts, seeds, size=None, **kw):
        calls.append(size)
        grid = toys.grid_for(size)
        draw = lambda text: toys.render([toys.Placed(kind, c, "small", r, q) for c, kind, r, q in
                                         toys.parse_long_caption(text, grid)[1]], size, grid)
        return torch.from_numpy(np.stack([np.asarray(draw(t)) for t in texts]))

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    pipe = types.SimpleNamespace(resolution=40, vae=types.SimpleNamespace(factor=1),
                                 model=types.SimpleNamespace(config=types.SimpleNamespace(patch=4)))
    row = evaluate.probe_scenes(pipe, cfg=3.0, n_per_prompt=2, seed=5, wide=True, long=True)
    assert calls == [(56, 28), (28, 56)] * 2
    assert row["in_distribution"]["overall"] == row["held_out"]["overall"] == 1.0
    with pytest.raises(ValueError, match="long needs wide"):
        evaluate.probe_scenes(pipe, long=True)


@pytest.mark.parametrize("probe", ["scenes_wide", "scenes_wide_long"])
def test_scenes_wide_probe_on_a_checkpoint(tmp_path, capsys, probe):
    """An untrained 40-px checkpoint through the CLI: samples at 56 x 28 and 28 x 56, scored low, and the numbers
    are the reader's on the same prompts (long: each image's long prompt at its size) and seeds sampled outside
    the probe at each size."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt40.pt", resolution=40)
    out = tmp_path / "eval.json"
    evaluate.main(["--ckpt", str(ckpt), "--device", "cpu", "--probe", probe, "--probe_n", "1", "--cfg", "1",
                   "--steps", "1", "--seed", "4", "--batch", "64", "--out", str(out)])
    row = json.loads(out.read_text())[f"probe_{probe}"][0]
    assert row["sizes"] == ["56x28", "28x56"] and row["held_out"]["overall"] <= 0.1
    assert f"{probe} probe, cfg 1 at 56x28 and 28x56 px" in capsys.readouterr().out
    texts, specs, seeds = toys.probe_plan(toys.held_out_prompts(), 1, 4)
    if probe == "scenes_wide_long":
        texts = [toys.long_prompt(spec, seed, [(56, 28), (28, 56)][k % 2], toys.ALL_PAIRS)
                 for k, (spec, seed) in enumerate(zip(specs, seeds))]
        assert row["long_prompts"]["held_out"] == texts
    pipe = sample.load_pipeline(str(ckpt), "cpu")
    for j, size in enumerate([(56, 28), (28, 56)]):  # prompt k at size k % 2
        images = sample.generate(pipe, texts[j::2], seeds[j::2], cfg=1.0, steps=1, batch_size=64, size=size)
        assert images.shape[1:3] == (size[1], size[0])
        assert row["by_size"]["%dx%d" % size]["held_out"] == toys.evaluate_images(images.numpy(), specs[j::2], 2)
