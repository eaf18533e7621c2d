"""evaluate.py: FID / IS / CLIP score against references, the offline end-to-end run, the shapes probe."""
import json
import math
import pickle
import random

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
from PIL import Image
from scipy import linalg

import data
import evaluate
import sample
import scenes
from ckpt_utils import make_tiny_checkpoint

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

class PicklePayload:
    """Any class outside torch's weights-only allow-list stands for code a pickle could run."""


def test_inception_wrapper_feeds_torch_fidelity(tmp_path, monkeypatch):
    """The real extractor's wiring, offline: randomly initialised TF-Inception weights saved to a local file, loaded
    the way --inception_weights loads them, must give torch-fidelity's own outputs for the same images."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    with monkeypatch.context() as m:  # build one network without downloading: skip its weight loading
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
        net = tfi.FeatureExtractorInceptionV3("ref", ["2048", "logits_unbiased"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    extractor = evaluate.InceptionV3(str(tmp_path / "inception.pth"))
    (tmp_path / "inception.pth").unlink()  # 92 MB: pytest keeps the tmp dirs of its last 3 runs
    images = torch.randint(0, 256, (1, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool, logits = extractor(images)
    ref_pool, ref_logits = net(images.permute(0, 3, 1, 2).contiguous())  # torch-fidelity takes uint8 (B, 3, H, W)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    torch.testing.assert_close(pool, ref_pool, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError):
        evaluate.InceptionV3(str(tmp_path / "missing.pth"))
    # a weights file that is more than tensors (a pickle can run code) is refused, not unpickled
    torch.save({"fc.weight": torch.zeros(1), "payload": PicklePayload()}, tmp_path / "pickled.pth")
    with pytest.raises(pickle.UnpicklingError):
        evaluate.InceptionV3(str(tmp_path / "pickled.pth"))

#################################################################################
#                                  CLIP score                                   #
#################################################################################

@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(1)  # a seed whose cosines on these tests' pictures have both signs
    model = open_clip.CLIP(embed_dim=16,
                           vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    preprocess = open_clip.image_transform(32, is_train=False)
    return evaluate.ClipScorer(model, preprocess, open_clip.get_tokenizer("ViT-B-32"), name="tiny-random-clip")


def test_clip_score_equals_direct_cosine(tiny_clip):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 24, 40, 3), generator=g, dtype=torch.uint8)
    captions = [f"a {c} {k}" for c, k in zip(["red", "green", "blue", "gray"] * 2, ["fox", "car"] * 4)]
    got = tiny_clip(images, captions)
    model, tok = tiny_clip.model, open_clip.tokenize
    raw = []
    with torch.no_grad():
        for im, cap in zip(images, captions):  # one pair at a time, cosine from unnormalized embeddings
            x = tiny_clip.preprocess(Image.fromarray(im.numpy()))[None]
            raw.append(torch.nn.functional.cosine_similarity(model.encode_image(x), model.encode_text(tok([cap]))))
    raw = torch.cat(raw).double()
    torch.testing.assert_close(got, 100 * raw.clamp(min=0), rtol=1e-5, atol=1e-4)
    assert (raw < 0).any() and (raw > 0).any()  # both sides of the floor are exercised

@pytest.mark.parametrize("tag, oracle_arch, other_arch", [("openai", "ViT-B-32-quickgelu", "ViT-B-32"),
                                                          ("laion2b_s34b_b79k", "ViT-B-32", "ViT-B-32-quickgelu")])
def test_clip_load_takes_the_activation_from_the_tag(tmp_path, tag, oracle_arch, other_arch):
    """OpenAI's CLIP weights were trained with QuickGELU, LAION's with GELU. ClipScorer.load('ViT-B-32/TAG') with a
    local weights file must build what open_clip's own config for those weights builds (the oracle), not the
    bare ARCH's activation (open_clip's default, which only warns)."""
    torch.manual_seed(0)
    oracle = open_clip.create_model(oracle_arch).eval()
    path = tmp_path / "weights.pt"
    torch.save(oracle.state_dict(), path)
    got = evaluate.ClipScorer.load(f"ViT-B-32/{tag}", weights=str(path))
    other = open_clip.create_model(other_arch, pretrained=str(path)).eval()  # same weights, the wrong activation
    path.unlink()  # 600 MB: pytest keeps the tmp dirs of its last 3 runs
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = oracle.encode_image(x)
        torch.testing.assert_close(got.model.encode_image(x), want)
        assert (other.encode_image(x) - want).abs().max() > 1e-3  # the activation is visible in the output

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

def test_kind_fill_covers_every_shape_kind():
    assert set(evaluate.KIND_FILL) == set(data.SHAPE_KINDS)


def all_combos(copies):
    return [(c, k, b) for c in data.SHAPE_COLORS for k in data.SHAPE_KINDS for b in data.SHAPE_BACKGROUNDS
            for _ in range(copies)]


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_probe_scores_ground_truth_renders(resolution):
    combos = all_combos(4)
    rng = random.Random(resolution)
    images = np.stack([np.asarray(data.render_shape(c, k, b, resolution, rng)) for c, k, b in combos])
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
    assert acc["color_acc"] <= 1 / len(data.SHAPE_COLORS) + 0.1, acc
    assert acc["shape_acc"] <= 1 / len(data.SHAPE_KINDS) + 0.1, acc
    assert acc["both_acc"] <= 1 / (len(data.SHAPE_COLORS) * len(data.SHAPE_KINDS)) + 0.05, acc


def test_probe_shapes_on_a_pipeline(ckpt):
    pipe = sample.load_pipeline(str(ckpt), "cpu")
    got = evaluate.probe_shapes(pipe, cfg=2.0, n_per_prompt=1, steps=2, seed=3, batch_size=27)
    combos = all_combos(1)
    images = sample.generate(pipe, [data.shapes_caption(*c) for c in combos], [3 + i for i in range(len(combos))],
                             cfg=2.0, steps=2, batch_size=27)
    want = evaluate.probe_accuracy(images, [c for c, _, _ in combos], [k for _, k, _ in combos])
    assert got == dict(cfg=2.0, t_start=None, **want) and got["n"] == 54


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
    assert len(row) == 1 and row[0]["truth"] and row[0]["resolution"] == scenes.MIN_RESOLUTION
    seen, held = row[0]["in_distribution"], row[0]["held_out"]
    assert seen["overall"] >= 0.99 and held["overall"] >= 0.99
    assert seen["n"] == 2 * len(scenes.in_distribution_prompts()) and held["single_object"] is None
    assert f"| in-distribution | {seen['n']} | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in printed
    assert f"| held-out | {held['n']} | - | 1.000 | - | 1.000 | 1.000 | 1.000 | 1.000 |" in printed
    prompts = json.loads(out.read_text())["probe_scenes_prompts"]
    assert prompts["held_out"] == [p.text for p in scenes.held_out_prompts()]


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
    texts, specs, seeds = scenes.probe_plan(scenes.held_out_prompts(), 1, 4)
    images = sample.generate(sample.load_pipeline(str(ckpt), "cpu"), texts, seeds, cfg=1.0, steps=1, batch_size=64)
    assert row["held_out"] == scenes.evaluate_images(images.numpy(), specs)


@pytest.mark.parametrize("args, want", [
    (["--probe", "scenes", "--truth", "--resolution", "16"], "--resolution: scenes need >= 32 px"),
    (["--probe", "scenes", "--ckpt", "CKPT16"], "--probe scenes: the checkpoint's images are too small"),
    (["--probe", "shapes", "--truth"], "--truth scores true renders of the scenes probe"),
    (["--probe", "scenes", "--ckpt", "CKPT16", "--resolution", "64"], "--resolution is --truth's render size"),
    (["--probe", "scenes", "--ckpt", "CKPT16", "--probe_from", "10"], "--probe_from needs --probe shapes"),
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
