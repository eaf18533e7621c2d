"""
Where our training step loses to the PixArt peer: variants of our attention, timed in one process on a GPU.

    python scripts/attention_variants.py            # DiT-B/2, micro-batch 64, 256 px latents, bf16, compiled

Each row: the first (compiling) step, the step time (median of 3 rounds x 10 steps), img/s, MFU, peak memory,
for the PixArt peer and for our model as in model.py, with the older fp32 upcast around QK-norm and RoPE,
without QK-norm, and compiled per block ("regional") instead of whole. bench.py is the reference table; this is
the one-off attribution behind README "Speed notes" (~5 min on an H100). On a CPU it runs a tiny shape, eager.
"""
import contextlib
import os
import sys
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench
import model as M
import train
from diffusion import Diffusion

cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
torch.backends.cuda.matmul.allow_tf32 = True
diffusion = Diffusion()
T0 = time.time()
PRESET, SHAPE, GRID = ("DiT-B/2", M.PRESETS["DiT-B/2"], 32) if cuda else ("DiT-S/2", bench.TINY, bench.TINY_GRID)
C = SimpleNamespace(**train.parse_args(["--batch", "64" if cuda else "4", "--compile", "false", "--device", device.type]))
model_forward = M.Attention.forward


def fp32_forward(self, x, ctx=None, rope=None):
    """model.py's attention before 2026-11-26: q, k upcast to fp32 for QK-norm and RoPE, then cast back."""
    B, N, W = x.shape
    H, D = self.heads, W // self.heads
    if self.cross:
        q = self.q(x).view(B, N, H, D).transpose(1, 2)
        k, v = self.kv(ctx).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = self.qkv(x).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k = self.q_norm(q.float()), self.k_norm(k.float())
    if rope is not None:
        q, k = M.apply_rope(q, *rope), M.apply_rope(k, *rope)
    x = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v)
    return self.proj(x.transpose(1, 2).reshape(B, N, W))


def variant(name, impl="ours", compile="whole", forward=None, qk_norm=True):
    M.Attention.forward = forward or model_forward
    C.qk_norm = qk_norm
    try:
        torch._dynamo.reset()
        bench.free_memory(device)
        case = bench.build_case(impl, "B/2", PRESET, SHAPE, GRID, C, device)
        if cuda and compile == "whole":
            case.model = torch.compile(case.raw)
        elif cuda and compile == "regional":
            for block in (case.raw.blocks if impl == "ours" else case.raw.net.transformer_blocks):
                block.compile()
        t = time.time()
        bench.first_step(case, C, diffusion, ctx, device, lambda s: None)
        first = time.time() - t
        bench.run_steps(case, 2, C, diffusion, ctx, device)
        for _ in range(3):
            bench.timed_round(case, 10, C, diffusion, ctx, device)
        case.summarize(C, device)
        print(f"| {name} | {first:.1f} | {sorted(case.times)[1] * 1e3:.2f} | {case.img_s:.1f} | "
              f"{bench.fmt(case.mfu and case.mfu * 100, '.1f')} | {case.peak / 2**30:.2f} |", flush=True)
        case.release()
    except Exception:
        traceback.print_exc(limit=-6)
    finally:
        M.Attention.forward = model_forward


print(f"# {bench.card_name(device)} | torch {torch.__version__} | {PRESET} micro-batch {C.batch} | grid {GRID}")
print("| variant | first step s | step ms | img/s | MFU % | peak GB |\n|---|---|---|---|---|---|")
variant("pixart, compiled", impl="pixart")
variant("ours (model.py), compiled")
variant("ours, fp32 QK-norm + RoPE", forward=fp32_forward)
variant("ours, no QK-norm", qk_norm=False)
variant("ours, compiled per block", compile="regional")
variant("pixart, compiled per block", impl="pixart", compile="regional")
print(f"# {time.time() - T0:.0f} s")
