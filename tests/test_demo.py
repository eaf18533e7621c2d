"""The whole chain of the offline demo, shortened: shapes data -> cache -> train.py -> sample.py -> the probe.
The model must follow its prompts' colours far better than chance (1/6) after a minute of CPU training."""
import os

import pytest

import train
from evaluate import probe_shapes
from sample import load_pipeline
from toys import SHAPE_COLORS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_shortened_demo_follows_prompts(tmp_path):
    out = train.main([os.path.join(ROOT, "configs", "shapes.py"), f"--out_dir={tmp_path / 'run'}",
                      f"--cache_dir={tmp_path / 'cache'}", "--data=shapes:2000", "--resolution=16", "--patch=2",
                      "--width=128", "--depth=4", "--heads=4", "--max_hours=0", "--max_steps=250", "--warmup=50",
                      "--decay_frac=0.3", "--ema_decay=0.99", "--log_every=50"])
    assert out["step"] == 250 and out["skipped"] == 0
    pipe = load_pipeline(str(tmp_path / "run" / "ckpt.pt"), device="cpu")
    result = probe_shapes(pipe, cfg=4.0, n_per_prompt=1, steps=20, seed=0)
    chance = 1 / len(SHAPE_COLORS)
    print(result)
    assert result["color_acc"] >= 3 * chance, result
