"""Tiny train.py-layout checkpoints for the sample.py / evaluate.py tests (pixel space, the "tiny" text tower),
and a tiny random CLIP scorer for the CLIP score tests."""
import dataclasses

import open_clip
import torch

import encoders
from model import DiT, DiTConfig
from checkpoint import save_checkpoint


def make_tiny_checkpoint(path, resolution=16, prediction="v", schedule="scaled_linear", zero_terminal_snr=False,
                         seed=0, step=7):
    """A 2-block DiT with random non-zero weights everywhere (an untrained DiT outputs zeros, which would make
    every sampler test trivial); "ema" and "model" differ so a test can tell which one was loaded."""
    text_encoder = encoders.load_text_encoder("tiny")
    config = DiTConfig(in_channels=3, input_size=resolution, patch=2, depth=2, width=32, heads=2,
                       text_dim=text_encoder.dim, pooled_dim=text_encoder.pooled_dim,
                       text_len=text_encoder.context_length)
    g = torch.Generator().manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
           for k, v in raw.items()}
    train_config = dict(data="shapes", out_dir=str(path.parent) if hasattr(path, "parent") else ".",
                        resolution=resolution, vae="none", text_encoder="tiny", model="DiT-S/2", prediction=prediction,
                        schedule=schedule, zero_terminal_snr=zero_terminal_snr, beta_start=0.00085, beta_end=0.012,
                        seed=seed)
    save_checkpoint(str(path), {"model": raw, "ema": ema, "optimizer": {}, "step": step, "config": train_config,
                                "model_config": dataclasses.asdict(config), "loader_state": {}, "rng": {},
                                "progress": {}})
    return path


def tiny_clip_scorer():
    """A random 16-d CLIP (ViT-B-32's tokenizer) as encoders.ClipScorer: cosines of both signs on the tests' images."""
    torch.manual_seed(1)  # a seed whose cosines on these tests' pictures have both signs
    model = open_clip.CLIP(embed_dim=16,
                           vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    preprocess = open_clip.image_transform(32, is_train=False)
    return encoders.ClipScorer(model, preprocess, open_clip.get_tokenizer("ViT-B-32"), name="tiny-random-clip")
