"""model.py: presets, shapes, zero init, live conditioning paths, batch independence, FLOPs, compile, grad ckpt."""
import dataclasses
import re
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import model as M
from model import DiT, DiTConfig, PRESETS, make_config

TINY = dict(depth=2, width=64, heads=2, text_dim=32, pooled_dim=24, text_len=7)


def inputs(cfg, B=2, grid=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, grid, grid, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    text = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    pooled = torch.randn(B, cfg.pooled_dim, generator=g)
    return [a.to(device) for a in (x, t, text, pooled)]


def randomized(cfg, seed=0):
    """A model whose zero-initialised parts are perturbed, so that its output is not trivially zero."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def expected_params(cfg):
    """Independent parameter count from the architecture description (weights + biases)."""
    W, C, p, hid = cfg.width, cfg.in_channels, cfg.patch, int(cfg.width * cfg.mlp_ratio)
    lin = lambda i, o: i * o + o
    hd = W // cfg.heads
    block = (lin(W, 3 * W) + lin(W, W) + 2 * hd                  # self-attn: qkv, proj, q/k RMSNorm
             + 2 * W                                                # cross-attn pre-norm (affine)
             + lin(W, W) + lin(W, 2 * W) + lin(W, W) + 2 * hd    # cross-attn: q, kv, proj, q/k RMSNorm
             + lin(W, hid) + lin(hid, W)                            # MLP
             + (lin(W, 6 * W) if cfg.adaln == "zero" else 6 * W))  # adaLN-Zero MLP | adaLN-single table
    embed = (C * p * p * W + W + lin(256, W) + lin(W, W) + lin(cfg.pooled_dim, W) + lin(W, W)
             + lin(cfg.text_dim, W) + lin(W, W) + (lin(W, 6 * W) if cfg.adaln == "single" else 0))
    final = 2 * W + lin(W, p * p * C)
    return cfg.depth * block + embed + final


#################################################################################
#                                  Presets                                      #
#################################################################################

def test_presets_build_on_meta_with_expected_params():
    assert len(PRESETS) == 12
    print("\n| preset | adaln | params (M) | train GFLOP/img @32 |")
    for name in PRESETS:
        for adaln in ("single", "zero"):
            cfg = make_config(name, adaln=adaln)
            with torch.device("meta"):
                model = DiT(cfg)
            n = sum(q.numel() for q in model.parameters())
            assert n == expected_params(cfg), name
            print(f"| {name} | {adaln} | {n / 1e6:.1f} | {model.estimate_flops() / 1e9:.1f} |")
    # the DiT paper's sizes (Table 1)
    xl = make_config("DiT-XL/2")
    assert (xl.depth, xl.width, xl.heads) == (28, 1152, 16)
    assert make_config("DiT-S/8").patch == 8 and make_config("DiT-L/4").width == 1024


def test_make_config_overrides_and_roundtrip():
    cfg = make_config("DiT-B/2", depth=0, width=None, heads=4, patch=4, in_channels=3)
    assert (cfg.depth, cfg.width, cfg.heads, cfg.patch, cfg.in_channels) == (12, 768, 4, 4, 3)
    with pytest.raises(ValueError):
        make_config("DiT-XXL/2")
    cfg = DiTConfig(**TINY)
    model = randomized(cfg)
    rebuilt = DiT(DiTConfig(**dataclasses.asdict(cfg)))   # what a checkpoint stores
    rebuilt.load_state_dict(model.state_dict())
    args = inputs(cfg)
    torch.testing.assert_close(rebuilt(*args), model(*args), rtol=0, atol=0)


#################################################################################
#                              Shapes and init                                  #
#################################################################################

@pytest.mark.parametrize("C", [3, 4])
@pytest.mark.parametrize("grid", [16, 32, 64])
def test_output_shapes(C, grid):
    for patch in (2, 8):
        cfg = DiTConfig(**{**TINY, "depth": 1}, in_channels=C, patch=patch)
        model = randomized(cfg)
        with torch.no_grad():
            out = model(*inputs(cfg, grid=grid))
        assert out.shape == (2, C, grid, grid) and torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("adaln", ["single", "zero"])
def test_untrained_outputs_exact_zero(adaln):
    cfg = DiTConfig(**TINY, adaln=adaln)
    out = DiT(cfg)(*inputs(cfg))
    assert torch.equal(out, torch.zeros_like(out))


def test_unpatchify_inverts_patch_layout():
    """unpatchify must put token (i, j)'s channel-c pixel (a, b) at (c, i*p+a, j*p+b): check with an identity
    final layer on patchified input built by hand."""
    cfg = DiTConfig(**TINY, patch=2, in_channels=3)
    model = DiT(cfg)
    x = torch.randn(2, 3, 8, 6)
    tokens = x.view(2, 3, 4, 2, 3, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 12, 2 * 2 * 3)  # (B, N, p*p*C), (p,p,C)
    assert torch.equal(model.unpatchify(tokens, 4, 3), x)


#################################################################################
#                       Conditioning paths are live                             #
#################################################################################

@pytest.mark.parametrize("adaln", ["single", "zero"])
def test_one_adam_step_makes_text_and_t_live(adaln):
    torch.manual_seed(0)
    cfg = DiTConfig(**TINY, adaln=adaln)
    model = DiT(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, text, pooled = inputs(cfg, B=4)
    target = torch.randn_like(x)
    for step in range(3):
        opt.zero_grad()
        loss = (model(x, t, text, pooled) - target).pow(2).mean()
        loss.backward()
        if step == 2:   # adaLN-Zero: gates open on step 2, so by step 3 every parameter has a gradient
            dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert not dead, dead
            break
        opt.step()
        if step == 0:   # after exactly one step
            model.eval()
            with torch.no_grad():
                out = model(x, t, text, pooled)
                assert out.abs().sum() > 0
                text2 = torch.randn_like(text)
                assert (model(x, t, text2, pooled) - out).abs().amax() > 1e-4, "caption states do not reach the output"
                assert (model(x, (t + 300) % 1000, text, pooled) - out).abs().amax() > 1e-4, "timestep is dead"
                assert (model(x, t.float() + 0.5, text, pooled) - out).abs().amax() > 0, "float t not used"
                assert (model(x, t, text, torch.randn_like(pooled)) - out).abs().amax() > 1e-4, "pooled is dead"
            model.train()


def test_sample_independent_of_batch():
    cfg = DiTConfig(**TINY)
    model = randomized(cfg).eval()
    x, t, text, pooled = inputs(cfg, B=4)
    with torch.no_grad():
        full = model(x, t, text, pooled)
        x2, text2, pooled2 = x.clone(), text.clone(), pooled.clone()
        x2[1:], text2[1:], pooled2[1:] = torch.randn_like(x2[1:]), torch.randn_like(text2[1:]), 0
        changed = model(x2, t.flip(0).clone().index_fill_(0, torch.tensor([0]), t[0].item()), text2, pooled2)
        for i in range(4):
            alone = model(x[i:i + 1], t[i:i + 1], text[i:i + 1], pooled[i:i + 1])
            torch.testing.assert_close(alone, full[i:i + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(changed[0], full[0], rtol=1e-5, atol=1e-6)   # others changed, sample 0 did not
    assert (changed[1:] - full[1:]).abs().amax() > 1e-3


def test_text_len_keeps_the_first_tokens_and_ignores_the_rest():
    """text_len = k: the output is that of the first k text states alone, and the states after them do not matter."""
    cfg = DiTConfig(**TINY)                                                    # text_len 7
    model = randomized(cfg).eval()
    x, t, text, pooled = inputs(dataclasses.replace(cfg, text_len=12), B=3)   # 12 states: more than the model uses
    with torch.no_grad():
        full = model(x, t, text, pooled)
        torch.testing.assert_close(full, model(x, t, text[:, :7], pooled), rtol=0, atol=0)
        tail = text.clone()
        tail[:, 7:] = torch.randn_like(tail[:, 7:]) * 10
        torch.testing.assert_close(full, model(x, t, tail, pooled), rtol=0, atol=0)
        head = text.clone()
        head[:, 6] += 1.0
        assert (model(x, t, head, pooled) - full).abs().amax() > 1e-4          # the last kept token still counts
        longer = DiT(dataclasses.replace(cfg, text_len=12))
        longer.load_state_dict(model.state_dict())                             # same weights, sees all 12
        assert (longer.eval()(x, t, tail, pooled) - full).abs().amax() > 1e-4


def test_rope_is_relative_and_two_dimensional():
    """q_i . k_j after RoPE depends only on the 2-D offset between tokens i and j, and on both axes."""
    D, h, w = 16, 5, 6
    cos, sin = M.rope_tables(*M.rope_2d(h, w, D, "cpu"), torch.float64)      # (N, D) each
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    rq = M.apply_rope(q.expand(1, h * w, 1, D), cos, sin)[0, :, 0]            # (N, D)
    rk = M.apply_rope(k.expand(1, h * w, 1, D), cos, sin)[0, :, 0]
    s = (rq @ rk.T).view(h, w, h, w)                                           # s[y1, x1, y2, x2]
    torch.testing.assert_close(s[0, 0, 1, 2], s[3, 2, 4, 4])                   # same offset (1, 2)
    torch.testing.assert_close(s[2, 3, 0, 0], s[4, 5, 2, 2])                   # same offset (-2, -3)
    assert (s[0, 0, 1, 0] - s[0, 0, 0, 0]).abs() > 1e-6                        # a row offset rotates
    assert (s[0, 0, 0, 1] - s[0, 0, 0, 0]).abs() > 1e-6                        # a column offset rotates
    assert (s[0, 0, 1, 0] - s[0, 0, 0, 1]).abs() > 1e-6                        # differently
    torch.testing.assert_close(rq.norm(dim=1), q.norm().expand(h * w))         # a rotation


#################################################################################
#                                   FLOPs                                       #
#################################################################################

@pytest.mark.parametrize("name,adaln,grid", [("DiT-B/2", "single", 32), ("DiT-XL/2", "single", 32),
                                             ("DiT-XL/2", "zero", 32), ("DiT-B/2", "single", 64)])
def test_estimate_flops_matches_flop_counter(name, adaln, grid):
    cfg = make_config(name, adaln=adaln)
    B = 2
    with torch.device("meta"):   # SDPA decomposes into counted bmm's on meta (CPU's fused kernel is not counted)
        model = DiT(cfg)
        args = inputs(cfg, B=B, grid=grid, device="meta")
    with FlopCounterMode(display=False) as fwd:
        out = model(*args)
    with FlopCounterMode(display=False) as bwd:
        out.float().pow(2).mean().backward()
    est = model.estimate_flops(grid)
    counted_fwd, counted = fwd.get_total_flops() / B, (fwd.get_total_flops() + bwd.get_total_flops()) / B
    print(f"\n{name} {adaln} grid {grid}: estimate {est / 1e9:.2f} GFLOP/img, counted fwd+bwd {counted / 1e9:.2f} "
          f"(ratio {est / counted:.4f}), fwd exact: {est / 3 / counted_fwd:.6f}")
    assert abs(est / 3 / counted_fwd - 1) < 1e-9       # forward matmuls: counted exactly
    assert abs(est / counted - 1) < 1e-3                 # backward: 2x fwd, except layers fed only by inputs (< 0.1%)


def test_peak_flops_table_and_mfu(monkeypatch):
    assert M.peak_flops("cpu") is None
    model = DiT(DiTConfig(**TINY))
    assert model.mfu(100.0, "cpu") != model.mfu(100.0, "cpu")   # nan
    for name, peak in [("NVIDIA GeForce RTX 5090", 209.5e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
                       ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756.5e12),
                       ("NVIDIA H200", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert M.peak_flops("cuda") == peak, name
        assert M.peak_flops(torch.device("cuda", 0)) == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 5090")
    assert abs(model.mfu(1e3, "cuda") - 1e3 * model.estimate_flops() / 209.5e12) < 1e-15


#################################################################################
#                          torch.compile and checkpointing                      #
#################################################################################

@pytest.mark.slow
def test_torch_compile_matches_eager():
    """Dynamo capture + inductor lowering give the eager numbers. Cold (empty inductor cache) this is the slow test:
    ~20 s of CPU time with vectorised C++ codegen off (~35 s with it on; a CPU-only codegen detail, the GPU path is
    Triton), ~3 s warm."""
    cfg = DiTConfig(**{**TINY, "depth": 1})
    model = randomized(cfg).eval()
    args = inputs(cfg)
    t0 = time.time()
    compiled = torch.compile(model, fullgraph=True, options={"cpp.vec_isa_ok": False})
    with torch.no_grad():
        out_c = compiled(*args)
        out_e = model(*args)
    print(f"\ncompile + first call: {time.time() - t0:.1f} s")
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adaln", ["single", "zero"])
def test_grad_ckpt_gives_same_gradients(adaln):
    cfg = DiTConfig(**TINY, adaln=adaln)
    model = randomized(cfg)
    args = inputs(cfg)
    grads = []
    for ckpt in (False, True):
        model.config.grad_ckpt = ckpt
        model.zero_grad()
        model(*args).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-8, msg=n)


def saved_activation_bytes(model, args):
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward of one forward: inside a
    checkpointed block none (torch.utils.checkpoint's own hooks take them), but the inputs it keeps to recompute."""
    params, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}
    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args)
    return sum(seen.values())


def test_ckpt_blocks_checkpoints_the_first_blocks_with_the_same_gradients():
    """ckpt_blocks = k checkpoints blocks[:k]: gradients equal those without checkpointing (float32), and each
    checkpointed block frees the same bytes of saved activations (the blocks are alike), less, once, the shared
    modulation (B, 6W) that the checkpoints keep as an input; ckpt_blocks 0 checkpoints them all. The GPU's peak
    memory at XL/2 is scripts/gpu_check.sh's row."""
    cfg = DiTConfig(**dict(TINY, depth=4))
    model = randomized(cfg)
    args = inputs(cfg)
    grads, saved = [], []
    for ckpt, k in [(False, 0), (True, 1), (True, 2), (True, 3), (True, 4), (True, 0)]:
        model.config.grad_ckpt, model.config.ckpt_blocks = ckpt, k
        saved.append(saved_activation_bytes(model, args))
        model.zero_grad()
        model(*args).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for g in grads[1:]:
        for n in grads[0]:
            torch.testing.assert_close(g[n], grads[0][n], rtol=1e-6, atol=1e-8, msg=n)
    freed = [a - b for a, b in zip(saved, saved[1:4])]                         # per block, for k = 1, 2, 3
    shared = 2 * 6 * TINY["width"] * 4                                         # cb (B, 6W) float32, kept once
    assert freed[1] == freed[2] > shared and freed[0] == freed[1] - shared, saved
    assert saved[4] == saved[5] < saved[3]   # all 4 (the text states, shared by the blocks, go with the last one)
    with pytest.raises(ValueError, match="ckpt_blocks 5: must be in 0..depth 4"):
        DiTConfig(**dict(TINY, depth=4), ckpt_blocks=5)


def reference_attention(attn, x, ctx=None, rope=None):
    """Attention.forward as it was before q and k were normalised and rotated stacked: q, k, v permuted to
    (B, H, N, D) apart, nn.RMSNorm on each, RoPE on each as the cat of the two rotated halves with (N, D/2) angles."""
    B, N, W = x.shape
    H, D = attn.heads, W // attn.heads
    if attn.cross:
        q = attn.q(x).view(B, N, H, D).transpose(1, 2)
        k, v = attn.kv(ctx).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = attn.qkv(x).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q).to(v.dtype), attn.k_norm(k).to(v.dtype)
    if rope is not None:
        cos, sin = rope[0].to(v.dtype), rope[1].to(v.dtype)
        if cos.ndim == 3:
            cos, sin = cos[:, None], sin[:, None]
        def rotate(t):
            t1, t2 = t.chunk(2, dim=-1)
            return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)
        q, k = rotate(q), rotate(k)
    return attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W))


@pytest.mark.parametrize("over", [{}, dict(qk_norm=False), dict(rope=False),
                                  dict(depth=4, route_frac=0.5, route_from=1, route_to=-1)])
def test_stacked_qk_norm_and_rope_equal_the_per_tensor_reference(over, monkeypatch):
    """The one-pass RMSNorm + rotate-half of q and k is the former per-tensor computation: to float64 precision
    (routing's per-sample angles included), and bitwise in float32 on the CPU (the same rounding steps)."""
    cfg = DiTConfig(**dict(TINY, **over))
    model = randomized(cfg).train()
    args = inputs(cfg)
    kw = {"route_scores": torch.rand(2, 64, generator=torch.Generator().manual_seed(1))} if cfg.route_frac else {}
    def old(self, x, ctx=None, rope=None):  # the reference, fed the (N, D/2) angles the tables were made from
        half = None if rope is None else (rope[0][..., :rope[0].shape[-1] // 2], rope[1][..., rope[1].shape[-1] // 2:])
        return reference_attention(self, x, ctx, half)
    with torch.no_grad():
        for dtype in (torch.float64, torch.float32):
            model.to(dtype)
            a = [t.to(dtype) if t.is_floating_point() else t for t in args]
            new = model(*a, **kw)
            with monkeypatch.context() as m:
                m.setattr(M.Attention, "forward", old)
                ref = model(*a, **kw)
            if dtype == torch.float64:
                torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(new, ref)
    assert new.abs().amax() > 0


#################################################################################
#                              FP8 (torchao)                                    #
#################################################################################

def test_fp8_filter_picks_exactly_the_block_linears():
    """fp8_linear_filter: the attention and MLP linears of every block, not the embedders, t_block, adaLN-Zero's
    modulation or the final layer; a block linear with a side that is not a multiple of 16 is left out, and named."""
    per_block = ["attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "mlp.0", "mlp.2"]
    for adaln in ("single", "zero"):
        model = DiT(DiTConfig(**TINY, adaln=adaln))
        picked, left = M.fp8_split(model)
        assert picked == [f"blocks.{i}.{n}" for i in range(TINY["depth"]) for n in per_block] and left == []
        everything = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        assert set(everything) - set(picked) == ({"final_layer.linear", "t_embedder.0", "t_embedder.2",
                                                   "pooled_embedder.0", "pooled_embedder.2", "text_embedder.0",
                                                   "text_embedder.2"} | ({"t_block.1"} if adaln == "single" else
                                                   {f"blocks.{i}.adaLN_modulation.1" for i in range(TINY["depth"])}))
    odd = DiT(DiTConfig(**TINY, mlp_ratio=4.125))                              # MLP hidden 264 = 16 x 16.5
    picked, left = M.fp8_split(odd)
    assert left == [f"blocks.{i}.{n}" for i in range(TINY["depth"]) for n in ("mlp.0", "mlp.2")]
    assert picked == [f"blocks.{i}.{n}" for i in range(TINY["depth"]) for n in per_block[:5]]


def test_rope_tables_are_cos_cos_and_minus_sin_sin():
    """The full-width tables against rope_2d's angles, so that a sign flip in both the tables and a reference built
    from them cannot pass: apply_rope must rotate by +angle, (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)."""
    cos, sin = M.rope_2d(3, 5, 16, "cpu")                                      # (15, 8)
    c, s = M.rope_tables(cos, sin, torch.float64)
    assert torch.equal(c, torch.cat([cos, cos], -1).double()) and torch.equal(s, torch.cat([-sin, sin], -1).double())
    x = torch.randn(2, 15, 3, 16, dtype=torch.float64)                         # (B, N, H, D)
    x1, x2 = x[..., :8], x[..., 8:]
    want = torch.cat([x1 * cos[:, None].double() - x2 * sin[:, None].double(),
                      x1 * sin[:, None].double() + x2 * cos[:, None].double()], -1)
    torch.testing.assert_close(M.apply_rope(x, c, s), want, rtol=1e-12, atol=1e-12)


def test_fp8_conversion_keeps_parameters_and_state_dict():
    """torchao swaps exactly the filtered linears; the parameters stay the same objects (the optimizer and the EMA
    see them) and the state dict keeps nn.Linear's keys and plain tensors, which a model without torchao loads.
    On the CPU its float8 matmuls run too: the output moves by the size of e4m3 rounding, no more."""
    pytest.importorskip("torchao.float8")
    model = randomized(DiTConfig(**TINY))
    before, params = model.state_dict(), list(model.parameters())
    args = inputs(model.config)
    with torch.no_grad():
        ref = model(*args)
    M.convert_to_fp8(model)
    swapped = [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert swapped == M.fp8_split(model)[0] and len(swapped) == 7 * TINY["depth"]
    # CUDA's _scaled_mm needs the weight-gradient matmul's inner dim (batch x tokens) a multiple of 16: padded
    assert all(m.config.pad_inner_dim for m in model.modules() if type(m).__name__ == "Float8Linear")
    assert all(a is b for a, b in zip(params, model.parameters())) and len(params) == len(list(model.parameters()))
    after = model.state_dict()
    assert list(after) == list(before) and all(type(v) is torch.Tensor and torch.equal(v, before[k])
                                               for k, v in after.items())
    plain = DiT(DiTConfig(**TINY))
    plain.load_state_dict(after)                                               # strict: same keys, same shapes
    with torch.no_grad():
        out = model(*args)
        torch.testing.assert_close(plain(*args), ref, rtol=0, atol=0)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel                                                  # e4m3: 3 mantissa bits


#################################################################################
#                              Token routing                                    #
#################################################################################

ROUTED = dict(TINY, depth=4, route_frac=0.5, route_from=1, route_to=-1)  # blocks 1 and 2 routed


def test_routing_off_is_the_unrouted_model_bitwise():
    """Sampling never routes (eval mode), nor does a forward without scores, nor route_frac 0 with scores."""
    routed, plain = randomized(DiTConfig(**ROUTED)), DiT(DiTConfig(**dict(ROUTED, route_frac=0.0)))
    plain.load_state_dict(routed.state_dict())
    args = inputs(routed.config)
    scores = torch.rand(2, 64)
    with torch.no_grad():
        ref = plain.eval()(*args)
        assert torch.equal(routed.eval()(*args, route_scores=scores), ref)
        assert torch.equal(routed.train()(*args), ref)
        assert torch.equal(plain.train()(*args, route_scores=scores), ref)
        assert not torch.equal(routed.train()(*args, route_scores=scores), ref)  # and routing does change it


def test_routed_tokens_skip_the_routed_blocks_unchanged():
    model = randomized(DiTConfig(**ROUTED)).train()
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("before", out))
    model.blocks[3].register_forward_pre_hook(lambda m, a: seen.__setitem__("after", a[0]))
    scores = torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(*inputs(model.config), route_scores=scores)
    kept = torch.zeros(2, 64, dtype=torch.bool)
    kept.scatter_(1, scores.argsort(dim=1)[:, :32], True)  # kept_tokens(64) = 32, the lowest scores
    assert seen["after"].shape == seen["before"].shape == (2, 64, 64)
    assert torch.equal(seen["after"][~kept], seen["before"][~kept])             # routed: bitwise unchanged
    assert (seen["after"][kept] - seen["before"][kept]).abs().amax(-1).min() > 0  # kept: every one went through
    assert not torch.equal(kept[0], kept[1])                                    # random per sample


@pytest.mark.parametrize("frac,first,to", [(0.5, 2, -2), (0.75, 0, 12), (0.25, 4, 8)])
def test_routed_flop_estimate_matches_flop_counter(frac, first, to):
    cfg = make_config("DiT-B/2", route_frac=frac, route_from=first, route_to=to)
    B = 2
    with torch.device("meta"):
        model = DiT(cfg).train()
        args = inputs(cfg, B=B, grid=32, device="meta")
        scores = torch.rand(B, 256)
    with FlopCounterMode(display=False) as fwd:
        model(*args, route_scores=scores)
    assert abs(model.estimate_flops() / 3 / (fwd.get_total_flops() / B) - 1) < 1e-9


@pytest.mark.parametrize("over,needle", [(dict(route_frac=1.0), "route_frac must be in [0, 1)"),
                                         (dict(route_frac=-0.1), "route_frac"),
                                         (dict(route_frac=0.5, route_from=3, route_to=3), "non-empty range"),
                                         (dict(route_frac=0.5, route_from=3, route_to=-2), "non-empty range"),
                                         (dict(route_frac=0.5, route_from=1, route_to=5), "within the depth 4")])
def test_bad_routes_are_value_errors(over, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        DiTConfig(**dict(TINY, depth=4, **over))


def test_rope_off_is_the_model_with_zero_rotation(monkeypatch):
    """rope=False removes exactly the rotation: it equals rope=True with every angle 0 (cos 1, sin 0)."""
    off = randomized(DiTConfig(**dict(TINY, rope=False)))
    on = DiT(DiTConfig(**TINY))
    on.load_state_dict(off.state_dict())
    args = inputs(off.config)
    with torch.no_grad():
        rotated = on(*args)
        no_angle = lambda h, w, d, device: (torch.ones(h * w, d // 2), torch.zeros(h * w, d // 2))
        monkeypatch.setattr(M, "rope_2d", no_angle)
        torch.testing.assert_close(off(*args), on(*args), rtol=0, atol=0)
    assert not torch.equal(off(*args), rotated)


def test_cross_norm_off_drops_only_the_cross_attention_layernorm():
    off, on = randomized(DiTConfig(**dict(TINY, cross_norm=False))), randomized(DiTConfig(**TINY))
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra == {f"blocks.{i}.norm2.{p}" for i in range(TINY["depth"]) for p in ("weight", "bias")}
    on.load_state_dict(off.state_dict(), strict=False)
    for block in on.blocks:
        block.norm2 = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(off(*inputs(off.config)), on(*inputs(on.config)), rtol=0, atol=0)


@pytest.mark.parametrize("adaln", ["single", "zero"])
def test_cross_gate_at_one_is_the_ungated_model(adaln):
    """cross_gate adds a seventh modulation vector, the cross-attention's gate; with that gate held at 1 the
    block computes the ungated block, weight for weight. At init the gate is 0 (adaLN-Zero: the branch starts off)."""
    cfg = dict(TINY, adaln=adaln)
    off = randomized(DiTConfig(**cfg))
    gated = DiT(DiTConfig(**dict(cfg, cross_gate=True)))
    W = TINY["width"]
    sd = off.state_dict()
    with torch.no_grad():
        for name, p in gated.state_dict().items():
            if p.shape == sd[name].shape:
                p.copy_(sd[name])
            else:  # the modulation's output grows from 6W to 7W: rows 6W.. are the new gate
                assert p.shape[0] == 7 * W and sd[name].shape[0] == 6 * W, name
                p.zero_()
                p[:6 * W] = sd[name]
                if name.endswith("scale_shift_table") or name.endswith("adaLN_modulation.1.bias"):
                    p[6 * W:] = 1.0  # gate = 0 (the t_block / modulation rows) + 1 (the offset) = 1
        args = inputs(off.config)
        torch.testing.assert_close(gated(*args), off(*args), rtol=1e-6, atol=1e-6)
    fresh = DiT(DiTConfig(**dict(cfg, cross_gate=True)))
    mod = fresh.t_block[1] if adaln == "single" else fresh.blocks[0].adaLN_modulation[1]
    assert mod.weight.shape == (7 * W, W) and not mod.weight.any() and not mod.bias.any()


def test_linear_text_projection_is_one_linear():
    lin = randomized(DiTConfig(**dict(TINY, text_proj="linear")))
    assert isinstance(lin.text_embedder, torch.nn.Linear)
    assert lin.text_embedder.weight.shape == (TINY["width"], TINY["text_dim"])
    mlp = DiT(DiTConfig(**TINY))
    assert set(mlp.state_dict()) - set(lin.state_dict()) == {"text_embedder.0.weight", "text_embedder.0.bias",
                                                            "text_embedder.2.weight", "text_embedder.2.bias"}
    with pytest.raises(ValueError, match="text_proj"):
        DiTConfig(**dict(TINY, text_proj="conv"))


def test_torch_weight_init_keeps_the_default_init_and_the_zeros():
    """weight_init "torch": every weight is what nn.Linear / nn.Conv2d drew at construction (same seed, same
    draws), except the zero-initialised modulation and final layer, zero in both inits."""
    cfg = DiTConfig(**dict(TINY, weight_init="torch"))
    torch.manual_seed(3)
    model = DiT(cfg)
    # the reference: the same modules built with initialize_weights skipped
    orig = DiT.initialize_weights
    try:
        DiT.initialize_weights = lambda self: None
        torch.manual_seed(3)
        ref = DiT(cfg)
    finally:
        DiT.initialize_weights = orig
    zeroed = {"t_block.1.weight", "t_block.1.bias", "final_layer.linear.weight", "final_layer.linear.bias"}
    for name, p in model.state_dict().items():
        if name in zeroed:
            assert not p.any(), name
        else:
            assert torch.equal(p, ref.state_dict()[name]), name
    dit = DiT(DiTConfig(**TINY))
    bound = 1 / TINY["width"] ** 0.5  # nn.Linear's kaiming-uniform(a=sqrt(5)) bound for fan_in W
    assert model.blocks[0].attn.proj.weight.abs().max() <= bound
    assert dit.blocks[0].attn.proj.weight.abs().max() > bound  # xavier-uniform: sqrt(6 / (2W)) is wider


@pytest.mark.parametrize("over", [dict(cross_gate=True), dict(text_proj="linear"),
                                  dict(cross_gate=True, text_proj="linear", adaln="zero")])
def test_switch_flop_estimates_match_flop_counter(over):
    cfg = make_config("DiT-S/2", **over)
    B = 2
    with torch.device("meta"):
        model = DiT(cfg)
        args = inputs(cfg, B=B, grid=16, device="meta")
    with FlopCounterMode(display=False) as fwd:
        model(*args)
    assert abs(model.estimate_flops(16) / 3 / (fwd.get_total_flops() / B) - 1) < 1e-9


#################################################################################
#               The training levers' hidden states, head and FLOPs              #
#################################################################################

@pytest.mark.parametrize("over", [{}, dict(grad_ckpt=True), dict(route_frac=0.5, route_from=1, route_to=2, depth=4)])
def test_hidden_states_are_the_blocks_outputs_of_the_same_forward(over):
    """hidden=(i, ...) returns each block's output (what a forward hook on it sees) beside the unchanged output, in
    training with grad_ckpt and with routing (blocks outside the routed range); output=False stops after the last
    asked block: the blocks after it and the final layer never run."""
    cfg = DiTConfig(**{**TINY, "depth": 3, **over})
    model = randomized(cfg).train()
    args = inputs(cfg)
    route = {"route_scores": torch.rand(2, 64, generator=torch.Generator().manual_seed(2))} if "route_frac" in over \
        else {}
    asked = (0, cfg.depth - 1)
    seen, calls = {}, []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
        block.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    model.final_layer.register_forward_pre_hook(lambda m, a: calls.append("final"))
    plain = model(*args, **route)
    out, states = model(*args, **route, hidden=asked)
    assert torch.equal(out, plain) and sorted(states) == list(asked)
    for i in asked:
        assert states[i].shape == (2, 64, cfg.width) and torch.equal(states[i], seen[i]), i  # 64 tokens
    out.pow(2).mean().backward()  # the states are part of the graph (grad_ckpt: recomputed)
    calls.clear()
    early = model(*args, **route, hidden=(0,), output=False)
    assert list(early) == [0] and torch.equal(early[0], states[0]) and calls == [0]


def test_block_index_counts_from_the_end_and_refuses_beyond_the_depth_or_inside_the_routing():
    cfg = DiTConfig(**{**TINY, "depth": 6})
    assert [cfg.block_index(i) for i in (0, 5, -1, -6)] == [0, 5, 5, 0]
    for bad in (6, -7):
        with pytest.raises(ValueError, match="beyond the depth 6"):
            cfg.block_index(bad, "--disp_block")
    routed = dataclasses.replace(cfg, route_frac=0.5, route_from=2, route_to=-2)  # blocks 2, 3
    assert [routed.block_index(i) for i in (1, 4, -1)] == [1, 4, 5]
    for bad in (2, 3, -3):
        with pytest.raises(ValueError, match="is routed"):
            routed.block_index(bad)


def test_sra_head_is_the_authors_projector():
    """Linear(W, 2W), SiLU, Linear(2W, W) (the authors' SimpleHead), xavier-uniform weights, zero biases."""
    torch.manual_seed(0)
    head = M.SRAHead(64)
    assert [tuple(p.shape) for p in head.parameters()] == [(128, 64), (128,), (64, 128), (64,)]
    assert not head.linear1.bias.any() and not head.linear2.bias.any()
    bound = (6 / (64 + 128)) ** 0.5  # xavier-uniform's
    assert head.linear1.weight.abs().max() <= bound and head.linear1.weight.abs().max() > 0.9 * bound
    z = torch.randn(2, 5, 64)
    torch.testing.assert_close(head(z), F.linear(F.silu(F.linear(z, head.linear1.weight)), head.linear2.weight))


@pytest.mark.parametrize("target,grid", [(-1, 32), (5, 32), (0, 16)])
def test_train_flops_add_the_teachers_forward_and_the_head(target, grid):
    """train_flops = estimate_flops + the EMA teacher's no-grad forward up to sra_target_block (flop counter: a
    forward with output=False) + the head's forward and backward; nothing more with every weight 0, and the same
    count CFM or dispersive alone (O(B N W), not counted)."""
    cfg = make_config("DiT-S/2")
    B = 2
    with torch.device("meta"):
        model, head = DiT(cfg).eval(), M.SRAHead(cfg.width)
        args = inputs(cfg, B=B, grid=grid, device="meta")
        j = cfg.block_index(target)
        with FlopCounterMode(display=False) as teacher:
            model(*args, hidden=(j,), output=False)
        tokens = torch.randn(B, (grid // 2) ** 2, cfg.width)
        with FlopCounterMode(display=False) as head_fwd:
            head(tokens)
    off = dict(sra_weight=0.0, sra_target_block=target, cfm_weight=0.5, disp_weight=0.5)
    assert M.train_flops(model, off, grid) == model.estimate_flops(grid)
    on = M.train_flops(model, {**off, "sra_weight": 0.2}, grid)
    assert abs((on - model.estimate_flops(grid)) / (teacher.get_total_flops() / B + 3 * head_fwd.get_total_flops() / B)
               - 1) < 1e-9
