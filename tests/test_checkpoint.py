"""One checkpoint layout, one sampling path: the train-time preview is sample.py's image, log.jsonl opens with the
run's environment, a checkpoint written by an earlier version resumes and samples, grids enlarge small images."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import data as datalib
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# written by train.py at commit 35ae683 (before one reader/writer): the args below with max_steps=2, data shapes:32
OLD_CKPT = os.path.join(ROOT, "tests", "fixtures", "ckpt_35ae683.pt")
OLD_ARGS = dict(vae="none", text_encoder="tiny", resolution=16, model="DiT-S/2", depth=1, width=16, heads=1,
                patch=4, batch=4, lr=1e-3, warmup=1, log_every=1, sample_every=0, compile=False, device="cpu",
                ema_decay=0.9, cond_drop=0.2, seed=1,
                flip=True, min_snr_gamma=5.0)  # the old code's defaults, which the fixture was trained with


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "shapes16")
    return datalib.ensure_cache("shapes:32", 16, "none", "tiny", cache_dir=out, device="cpu")


def argv(cache, out_dir, **over):
    return [f"--{k}={v}" for k, v in {**OLD_ARGS, "data": cache, "out_dir": str(out_dir), **over}.items()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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


def test_the_writer_refuses_a_layout_it_does_not_know(tmp_path):
    ck = {k: {} for k in sample.CHECKPOINT_KEYS}
    with pytest.raises(ValueError, match="missing \\['progress'\\]"):
        sample.save_checkpoint(str(tmp_path / "a.pt"), {k: v for k, v in ck.items() if k != "progress"})
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        sample.save_checkpoint(str(tmp_path / "b.pt"), {**ck, "extra": 1})
    assert not os.listdir(tmp_path)
    sample.save_checkpoint(str(tmp_path / "c.pt"), ck)
    assert load(tmp_path / "c.pt") == ck and os.listdir(tmp_path) == ["c.pt"]


def test_preview_equals_sample_py_bit_for_bit(cache, tmp_path):
    """The preview at the last step, cell k, is `sample.py --seed k` of prompt k on that step's checkpoint."""
    prompts = ["a red circle on a white background", "a blue square on a black background", "a green triangle"]
    out = tmp_path / "o"
    train.main(argv(cache, out, max_steps=3, sample_every=3, sample_cfg=3.0, sample_prompts="|".join(prompts)))
    grid = np.asarray(Image.open(out / "samples" / "0000003.png"))
    cols, cell = 2, 256 + 2  # ceil(sqrt(3)) columns; 16 px images enlarged 16x, 2 px padding
    assert grid.shape == (2 * cell + 2, 2 * cell + 2, 3)
    for k, prompt in enumerate(prompts):
        sample.main(["--ckpt", str(out / "ckpt.pt"), "--device", "cpu", "--seed", str(k), "--n", "1", "--cfg", "3",
                     "--steps", "50", "--out", str(tmp_path / f"s{k}"), prompt])
        want = np.asarray(Image.open(tmp_path / f"s{k}" / "0000.png"))
        r, c = divmod(k, cols)
        got = grid[2 + r * cell: 2 + r * cell + 256, 2 + c * cell: 2 + c * cell + 256]
        assert np.array_equal(got, np.kron(want, np.ones((16, 16, 1), np.uint8))), k


def test_log_opens_with_the_environment(cache, tmp_path):
    out = tmp_path / "o"
    train.main(argv(cache, out, max_steps=2))
    train.main(argv(cache, out, max_steps=4))  # a resume appends its own
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    starts = [r for r in recs if r.get("event") == "start"]
    assert recs[0]["event"] == "start" and [r["step"] for r in starts] == [0, 2]
    env = recs[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert env["git_commit"] == (head or "unknown")
    assert torch.__version__.startswith(env["versions"]["torch"])  # metadata has no local tag (+cu130)
    assert set(env["versions"]) == {"python", "torch", "diffusers", "open_clip_torch"}
    assert env["command"][0] == "train.py" and "--max_steps=2" in env["command"]
    assert env["config"] == load(out / "ckpt.pt")["config"] | {"max_steps": 2}
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]


def test_a_checkpoint_of_an_earlier_version_resumes_and_samples(cache, tmp_path):
    """The fixture (2 steps, old code) equals 2 steps of this code; resumed to 4 it equals 4 steps in one run; and
    it samples the images that this code's own 2-step checkpoint samples."""
    new = tmp_path / "new2"
    train.main(argv(cache, new, max_steps=2))
    old, mine = load(OLD_CKPT), load(new / "ckpt.pt")
    assert set(old) == set(sample.CHECKPOINT_KEYS) and old["step"] == 2
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
