"""
A compact text-conditioned DiT (Peebles & Xie, arXiv 2212.09748) with PixArt-alpha's cross-attention and
adaLN-single (Chen et al., arXiv 2310.00426), QK-RMSNorm and 2-D RoPE. `python model.py` prints the presets.
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#################################################################################
#                                  Config                                       #
#################################################################################

CHOICES = dict(adaln=("single", "zero"), text_proj=("mlp", "linear"), weight_init=("dit", "torch"))  # (config.py's too)


@dataclass
class DiTConfig:
    in_channels: int = 4        # 4 for sd-vae latents, 3 for pixel space
    input_size: int = 32        # latent grid used for FLOP estimates (the model accepts any grid divisible by patch)
    patch: int = 2              # patch side in latent pixels; tokens = (grid / patch)^2
    depth: int = 12             # number of transformer blocks
    width: int = 768            # hidden size
    heads: int = 12             # attention heads (head dim = width / heads, must be divisible by 4 for 2-D RoPE)
    text_dim: int = 768         # width of the per-token text states
    pooled_dim: int = 768       # width of the pooled text embedding
    text_len: int = 77          # text tokens the cross-attention sees: the first text_len of the encoder's states
    mlp_ratio: float = 4.0      # MLP hidden = mlp_ratio * width
    adaln: str = "single"       # "single" (PixArt adaLN-single) | "zero" (DiT adaLN-Zero per block)
    qk_norm: bool = True        # RMSNorm on queries and keys (bf16 stability, arXiv 2302.05442)
    rope: bool = True           # 2-D RoPE in self-attention, on top of the fixed sin-cos position embedding
    cross_norm: bool = True     # affine LayerNorm before the cross-attention (PixArt has none)
    cross_gate: bool = False    # an adaLN gate (zero at init) on the cross-attention branch too, as on the other two
    text_proj: str = "mlp"      # text states -> width: "mlp" (PixArt's caption projection) | "linear" (one Linear)
    weight_init: str = "dit"    # "dit" (xavier-uniform linears, normal(0.02) embedders) | "torch" (nn.Linear's own);
                                # the zero-initialised modulation and final layer are zero in both
    grad_ckpt: bool = False     # activation checkpointing per block (training only)
    ckpt_blocks: int = 0        # with grad_ckpt: only blocks[:ckpt_blocks] are checkpointed (0 = every block)
    route_frac: float = 0.0     # token routing (TREAD, arXiv 2501.04765), training only: this share of the tokens,
    route_from: int = 2         # random per sample, skips blocks[route_from:route_to] (a Python slice: a negative
    route_to: int = -2          # route_to counts from the end) and rejoins unchanged; 0 = off

    def __post_init__(self):  # ValueError, not assert: train.py turns it into a one-line error before any work
        for key, options in CHOICES.items():
            if getattr(self, key) not in options:
                raise ValueError(f"{key} must be one of {', '.join(options)}, got {getattr(self, key)!r}")
        if not 0 <= self.ckpt_blocks <= self.depth:
            raise ValueError(f"ckpt_blocks {self.ckpt_blocks}: must be in 0..depth {self.depth} (0 = every block)")
        if not 0 <= self.route_frac < 1:
            raise ValueError(f"route_frac must be in [0, 1), got {self.route_frac}")
        if self.route_frac > 0 and not 0 <= self.route_from < self.routed_blocks[1] <= self.depth:
            raise ValueError(f"route_from {self.route_from}, route_to {self.route_to}: the routed blocks "
                             f"[route_from, route_to) must be a non-empty range within the depth {self.depth}")
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ValueError(f"width {self.width} / heads {self.heads}: "
                             "the head size must be a whole multiple of 4 (2-D RoPE)")

    @property
    def routed_blocks(self):
        """(first, end) block indices of the routed range; end resolved from a negative route_to."""
        return self.route_from, self.route_to + self.depth if self.route_to < 0 else self.route_to

    def kept_tokens(self, n):
        """Of n tokens, how many go through the routed blocks."""
        return n - int(self.route_frac * n)

    def block_index(self, i, key="block"):
        """A training lever's block key (0-based, negative from the end) -> 0..depth-1. ValueError beyond the depth,
        or inside the routed blocks with route_frac > 0 (their outputs hold only the kept tokens)."""
        j = i + self.depth if i < 0 else i
        if not 0 <= j < self.depth:
            raise ValueError(f"{key} {i}: beyond the depth {self.depth} (0..{self.depth - 1}, or -1 for the last)")
        first, end = self.routed_blocks
        if self.route_frac > 0 and first <= j < end:
            raise ValueError(f"{key} {i}: block {j} is routed (blocks {first}..{end - 1} see only the kept tokens "
                             "with route_frac > 0): choose a block outside them")
        return j

    @property
    def n_mod(self):
        """Modulation vectors per block: shift, scale, gate of attention and MLP (+ the cross-attention's gate)."""
        return 7 if self.cross_gate else 6

# DiTConfig's fields that train.py has as keys are the architecture keys (one list: config_from_keys, init_from's
# inheritance and resume's check all read it); of those, these shape neither the weights nor what they compute
TRAINING_ONLY = ("grad_ckpt", "ckpt_blocks", "route_frac", "route_from", "route_to", "weight_init")


def config_keys(keys):
    """The DiTConfig fields among `keys` (train.py's key names), in DiTConfig's order."""
    return [f.name for f in fields(DiTConfig) if f.name in keys]

def config_from_keys(C, **derived) -> DiTConfig:
    """train.py's keys (a namespace) -> DiTConfig: the preset C.model, overridden by the keys that are DiTConfig
    fields (0 = the preset's depth / width / heads / patch), plus what the data decides (in_channels, input_size,
    text_dim, pooled_dim). text_len 0 = all of the text tower's tokens: 77 x text_chunks (CLIP's window)."""
    keys = vars(C)
    fields = {k: keys[k] for k in config_keys(keys)}
    if fields.get("text_len") == 0:
        fields["text_len"] = 77 * keys.get("text_chunks", 1)
    return make_config(C.model, **fields, **derived)

# the DiT paper's sizes (Table 1); the /N suffix is the patch size
_SIZES = {"S": dict(depth=12, width=384, heads=6), "B": dict(depth=12, width=768, heads=12),
          "L": dict(depth=24, width=1024, heads=16), "XL": dict(depth=28, width=1152, heads=16)}
PRESETS = {f"DiT-{s}/{p}": dict(**d, patch=p) for s, d in _SIZES.items() for p in (2, 4, 8)}

def make_config(name: str, **overrides) -> DiTConfig:
    """Preset `name` with overrides applied; None, or 0 for a preset key (depth, width, heads, patch), means "take
    the preset's value"."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    kw.update({k: v for k, v in overrides.items() if v is not None and not (k in kw and v == 0)})
    return DiTConfig(**kw)

#################################################################################
#               Embedding Layers for Timesteps and Positions                    #
#################################################################################

def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of (B,) float timesteps -> (B, dim) (DiT's TimestepEmbedder, from GLIDE)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                    # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)               # (B, dim)

def rope_2d(h, w, head_dim, device, theta=10000.0):
    """cos, sin (h*w, head_dim/2) of axial 2-D RoPE (RoFormer arXiv 2104.09864, axial form as in FiT/Lumina):
    half of each head's rotation pairs rotate with the row index, half with the column index. Computed for the
    current grid, so any resolution works; positions are integer token indices (relative, shared across grids)."""
    n = head_dim // 4                                                          # frequencies per axis
    freqs = theta ** (-torch.arange(n, dtype=torch.float32, device=device) / n)  # (n,)
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ang = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)  # (h*w, head_dim/2)
    return ang.cos(), ang.sin()

def sincos_2d(h, w, dim, base, device):
    """Fixed 2-D sin-cos position embedding (h*w, dim) added to the patch tokens (DiT / MAE), so that even a token
    the self-attention has not yet learned to use knows where it is. Positions are measured on the training grid
    `base` (rows and columns scaled by base/h, base/w): a larger grid interpolates between trained positions
    instead of extrapolating (PixArt-alpha's pe_interpolation)."""
    n = dim // 4                                                               # frequencies per axis and per sin/cos
    omega = 10000.0 ** (-torch.arange(n, dtype=torch.float32, device=device) / n)  # (n,)
    ys = torch.arange(h, dtype=torch.float32, device=device) * (base / h)      # (h,)
    xs = torch.arange(w, dtype=torch.float32, device=device) * (base / w)      # (w,)
    ey, ex = ys[:, None] * omega, xs[:, None] * omega                          # (h, n), (w, n)
    ey = torch.cat([ey.sin(), ey.cos()], dim=1)[:, None].expand(h, w, 2 * n)   # (h, w, dim/2)
    ex = torch.cat([ex.sin(), ex.cos()], dim=1)[None, :].expand(h, w, 2 * n)   # (h, w, dim/2)
    return torch.cat([ey, ex], dim=-1).reshape(h * w, 4 * n)                   # (h*w, dim)

def rope_tables(cos, sin, dtype):
    """rope_2d's (..., D/2) angles -> the full-width tables apply_rope multiplies by, (..., D) in the compute dtype:
    [cos, cos] and [-sin, sin]. Made once per forward (not per block), so the rotation is two multiplies and an add."""
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)

def apply_rope(x, cos, sin):
    """Rotate the pairs (x[..., i], x[..., i + D/2]) of x (B, N, *, D) by token n's angles: real-valued rotate-half,
    x * [cos, cos] + [x2, x1] * [-sin, sin] = [x1 cos - x2 sin, x2 cos + x1 sin], with rope_tables' cos, sin (N, D),
    or per sample (B, N, D) where routing kept different tokens in each sample. Equals the rotation of the complex
    pairs x1 + i x2 by the angles, in the same rounding steps as computing those two products by hand."""
    shape = cos.shape[:-1] + (1,) * (x.ndim - 3) + cos.shape[-1:]                # (N | B N, 1.., D)
    x1, x2 = x.chunk(2, dim=-1)                                                # (B, N, *, D/2) each
    return x * cos.view(shape) + torch.cat([x2, x1], dim=-1) * sin.view(shape)  # (B, N, *, D)

def qk_rms_norm(x, weight, eps):
    """RMSNorm over the last dim, reduced in fp32 at least (F.rms_norm), times weight (broadcast: (D,), or (2, 1, D)
    for q and k stacked), back in x's dtype: nn.RMSNorm's numbers, bitwise in fp32."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))                   # bf16 -> fp32; fp32, fp64 stay
    return (F.rms_norm(wide, x.shape[-1:], eps=eps) * weight).to(x.dtype)

def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]                           # (B, N, W)

#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Self-attention (fused QKV, with RoPE) or cross-attention (Q from x, fused KV from the text states)."""
    def __init__(self, config, cross):
        super().__init__()
        W = config.width
        self.heads, self.cross = config.heads, cross
        if cross:
            self.q, self.kv = nn.Linear(W, W), nn.Linear(W, 2 * W)
        else:
            self.qkv = nn.Linear(W, 3 * W)
        norm = (lambda: nn.RMSNorm(W // config.heads, eps=1e-6)) if config.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.proj = nn.Linear(W, W)

    def forward(self, x, ctx=None, rope=None):
        B, N, W = x.shape                                                      # x (B, N, W); ctx (B, L, W)
        H, D = self.heads, W // self.heads
        qk_norm = isinstance(self.q_norm, nn.RMSNorm)
        if self.cross:
            q = self.q(x).view(B, N, H, D)                                     # (B, N, H, D)
            k, v = self.kv(ctx).view(B, -1, 2, H, D).unbind(2)                 # (B, L, H, D) each
            if qk_norm:
                q = qk_rms_norm(q, self.q_norm.weight, self.q_norm.eps)         # (B, N, H, D)
                k = qk_rms_norm(k, self.k_norm.weight, self.k_norm.eps)         # (B, L, H, D)
        else:
            # q and k stay stacked in the QKV output's own layout, so that RMSNorm and RoPE are one pass over both
            # (Inductor: one fused reduction + rotate kernel instead of one per tensor; docs/internals.md, the model).
            # RMSNorm reduces in fp32, RoPE runs in the compute dtype (rope_tables' cos/sin are cast to it, as
            # Llama's RoPE does): upcasting q, k to fp32 around both costs 4% of a compiled B/2 step on an H100
            # (docs/log.md 2026-11-26 11:19, attention variants).
            qkv = self.qkv(x).view(B, N, 3, H, D)                              # (B, N, 3, H, D)
            qk, v = qkv[:, :, :2], qkv[:, :, 2]                                # (B, N, 2, H, D), (B, N, H, D)
            if qk_norm:
                w = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None]  # (2, 1, D)
                qk = qk_rms_norm(qk, w, self.q_norm.eps)                       # (B, N, 2, H, D)
            if rope is not None:
                qk = apply_rope(qk, *rope)                                     # (B, N, 2, H, D)
            q, k = qk.unbind(2)                                                # (B, N, H, D) each
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, N, D)
        return self.proj(x.transpose(1, 2).reshape(B, N, W))                   # (B, N, W)

class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, cross-attention to the text (ungated as in PixArt-alpha Fig. 3, or gated with
    cross_gate), gated MLP."""
    def __init__(self, config):
        super().__init__()
        W, self.adaln, self.n_mod = config.width, config.adaln, config.n_mod
        M = self.n_mod
        self.norm1 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(config, cross=False)
        self.norm2 = nn.LayerNorm(W, eps=1e-6) if config.cross_norm else nn.Identity()
        self.cross_attn = Attention(config, cross=True)
        self.norm3 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        hidden = int(W * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(W, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, W))
        if config.adaln == "zero":   # DiT: a per-block MLP regresses shift/scale/gate from the conditioning
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(W, M * W))
        else:                        # PixArt adaLN-single: a learned per-block offset to the shared modulation
            self.scale_shift_table = nn.Parameter(torch.zeros(M * W))

    def forward(self, x, c, text, rope):
        # x (B, N, W); c (B, W) for "zero", (B, MW) shared modulation for "single" (M = 6, 7 with cross_gate);
        # text (B, L, W)
        m = self.adaLN_modulation(c) if self.adaln == "zero" else c + self.scale_shift_table  # (B, MW)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *gate_ca = m.chunk(self.n_mod, dim=1)  # (B, W)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)  # (B, N, W)
        ca = self.cross_attn(self.norm2(x), ctx=text)                          # (B, N, W)
        x = x + (gate_ca[0][:, None] * ca if gate_ca else ca)                  # (B, N, W)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))  # (B, N, W)
        return x

class FinalLayer(nn.Module):
    """PixArt's final layer: shift/scale = learned table + conditioning embedding, then a zero-init linear."""
    def __init__(self, config):
        super().__init__()
        W, p = config.width, config.patch
        self.norm = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, W))
        self.linear = nn.Linear(W, p * p * config.in_channels)

    def forward(self, x, c):
        shift, scale = (self.scale_shift_table[None] + c[:, None]).unbind(1)   # (B, W) each
        return self.linear(modulate(self.norm(x), shift, scale))               # (B, N, p*p*C)

class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        W = config.width
        self.x_embedder = nn.Conv2d(config.in_channels, W, config.patch, stride=config.patch)
        self.t_embedder = nn.Sequential(nn.Linear(256, W), nn.SiLU(), nn.Linear(W, W))
        self.pooled_embedder = nn.Sequential(nn.Linear(config.pooled_dim, W), nn.SiLU(), nn.Linear(W, W))
        # text states -> width once, shared by every block's K/V projection (PixArt's caption projection)
        self.text_embedder = (nn.Sequential(nn.Linear(config.text_dim, W), nn.GELU(approximate="tanh"), nn.Linear(W, W))
                              if config.text_proj == "mlp" else nn.Linear(config.text_dim, W))
        if config.adaln == "single":   # PixArt-alpha Sec. 2.3: one MLP for all blocks
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(W, config.n_mod * W))
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(config)
        self.initialize_weights()

    def initialize_weights(self):
        # DiT: xavier-uniform linears with zero bias, patch embed as a linear, normal(0.02) timestep MLP
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.weight_init == "dit":
            self.apply(_basic_init)
            w = self.x_embedder.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.x_embedder.bias)
            for mlp in (self.t_embedder, self.pooled_embedder):
                nn.init.normal_(mlp[0].weight, std=0.02)
                nn.init.normal_(mlp[2].weight, std=0.02)
        # adaLN-Zero (DiT Sec. 3.2): every modulation output starts at zero, so self-attention and MLP branches
        # start gated off (at init "single" and "zero" compute the same function). The cross-attention output is
        # NOT zeroed (PixArt zeroes it): with a zero final layer its gradient is zero on the first step, so the
        # caption tokens would reach the output only after two steps. t and pooled reach it after one step
        # through the final layer's shift/scale, which PixArt adds straight from the conditioning.
        if self.config.adaln == "single":
            nn.init.zeros_(self.t_block[1].weight)
            nn.init.zeros_(self.t_block[1].bias)
        for block in self.blocks:
            if self.config.adaln == "zero":
                nn.init.zeros_(block.adaLN_modulation[1].weight)
                nn.init.zeros_(block.adaLN_modulation[1].bias)
        # zero final layer: an untrained model outputs exactly zero
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x, h, w):
        p, C = self.config.patch, self.config.in_channels
        x = x.view(x.shape[0], h, w, p, p, C)                                  # (B, h, w, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], C, h * p, w * p)  # (B, C, H, W)

    def forward(self, x, t, text, pooled, route_scores=None, hidden=(), output=True):
        """x (B,C,H,W); t (B,) int or float timesteps in [0, 1000); text (B,77 x chunks,text_dim), of which the first
        config.text_len tokens are used (a causal CLIP tower's states after a short caption's EOT are padding);
        pooled (B,pooled_dim). route_scores (B, >= N) (training with route_frac > 0 only; train.py draws them from
        the step's seed, for the largest bucket): the first N score this grid's tokens, and in each sample the
        kept_tokens(N) lowest-scored ones go through the routed blocks.
        hidden: 0-based block indices whose outputs (B, N, W) the training levers read, from this same forward
        (diffusion.Levers): -> (output, {index: that block's output}); output False: -> the dict alone, the forward
        stopped after the last of them (SRA's EMA teacher: no later blocks, no final layer)."""
        p = self.config.patch
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.x_embedder(x.to(self.x_embedder.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, W), N = h*w
        x = x + sincos_2d(h, w, self.config.width, self.config.input_size // p, x.device).to(x.dtype)  # (B, N, W)
        head = self.config.width // self.config.heads
        rope = rope_tables(*rope_2d(h, w, head, x.device), x.dtype) if self.config.rope else None  # cos, sin (N, D)
        c = self.t_embedder(timestep_embedding(t).to(x.dtype)) + self.pooled_embedder(pooled.to(x.dtype))  # (B, W)
        text = self.text_embedder(text[:, :self.config.text_len].to(x.dtype))  # (B, L, W), L <= text_len
        cb = self.t_block(c) if self.config.adaln == "single" else c           # (B, 6W) | (B, W)
        route = self.training and self.config.route_frac > 0 and route_scores is not None
        if route and (route_scores.shape[0] != x.shape[0] or route_scores.shape[1] < h * w):
            raise ValueError(f"route_scores {tuple(route_scores.shape)}: one per token, ({x.shape[0]}, {h * w})")
        if route:
            route_scores = route_scores[:, :h * w]                            # (B, N)
        first, end = self.config.routed_blocks
        block_rope, rejoin = rope, lambda x_all, x: x_all.scatter(1, keep[..., None].expand_as(x), x)
        # grad_ckpt: activation checkpointing of whole blocks, blocks[:ckpt_blocks] (0 = all). Whole blocks, not a
        # selective policy that saves the matmul outputs and recomputes the elementwise ops: under torch.compile
        # the min-cut partitioner already recomputes cheap pointwise ops in the backward instead of saving them,
        # so what a block keeps is mostly matmul and attention outputs, which that policy would keep too. k of
        # depth blocks checkpointed free ~k/depth of the activations for ~k/depth of a forward in recompute.
        ckpt_end = self.config.ckpt_blocks or len(self.blocks)
        states = {}                                                            # hidden's {i: (B, N, W)}
        for i, block in enumerate(self.blocks):
            if route and i == first:  # the kept tokens (with their RoPE angles) go on; the others wait in x_all
                keep = route_scores.argsort(dim=1)[:, :self.config.kept_tokens(h * w)]  # (B, K)
                x_all, x = x, x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, W)
                block_rope = rope and (rope[0][keep], rope[1][keep])          # cos, sin (B, K, D)
            if route and i == end:  # the routed tokens rejoin unchanged
                x, block_rope = rejoin(x_all, x), rope                        # (B, N, W)
            if self.config.grad_ckpt and self.training and torch.is_grad_enabled() and i < ckpt_end:
                x = checkpoint(block, x, cb, text, block_rope, use_reentrant=False)  # (B, N|K, W)
            else:
                x = block(x, cb, text, block_rope)                             # (B, N|K, W)
            if i in hidden:
                states[i] = x                                                  # (B, N, W)
                if not output and len(states) == len(hidden):
                    return states
        if route and end == len(self.blocks):
            x = rejoin(x_all, x)                                               # (B, N, W)
        x = self.final_layer(x, c)                                             # (B, N, p*p*C)
        x = self.unpatchify(x, h, w)                                           # (B, C, H, W)
        return (x, states) if hidden else x

    #############################################################################
    #                          FLOPs and MFU                                    #
    #############################################################################

    def estimate_flops(self, grid: int | None = None) -> float:
        """Training FLOPs per image (forward + backward = 3x forward; backward does two matmuls per forward one,
        PaLM arXiv 2204.02311 App. B), counting every matmul as 2*MACs including attention scores and values; the
        routed blocks at their kept tokens (with route_frac > 0: a training step's cost, not a sampling step's)."""
        return 3 * 2 * self.forward_macs(grid)

    def forward_macs(self, grid: int | None = None, upto: int | None = None) -> int:
        """Multiply-adds of one image's forward (estimate_flops' count): the training forward, or with upto = k an
        eval-mode forward (all tokens) that stops after blocks[k - 1], before the final layer (SRA's EMA teacher)."""
        cfg = self.config
        W, D, L, C, p = cfg.width, cfg.depth, cfg.text_len, cfg.in_channels, cfg.patch
        N = ((grid or cfg.input_size) // p) ** 2
        hidden = int(W * cfg.mlp_ratio)
        def block(N):
            self_attn = N * W * 3 * W + 2 * N * N * W + N * W * W              # qkv, QK^T and AV, out proj
            cross_attn = N * W * W + L * W * 2 * W + 2 * N * L * W + N * W * W  # q, kv, QK^T and AV, out proj
            return self_attn + cross_attn + 2 * N * W * hidden + (W * cfg.n_mod * W if cfg.adaln == "zero" else 0)
        routed = cfg.routed_blocks[1] - cfg.routed_blocks[0] if cfg.route_frac > 0 else 0  # at kept_tokens(N)
        embed = (N * C * p * p * W + 256 * W + W * W + cfg.pooled_dim * W + W * W  # patch, t MLP, pooled MLP
                 + L * (cfg.text_dim * W + (W * W if cfg.text_proj == "mlp" else 0))  # text projection
                 + (W * cfg.n_mod * W if cfg.adaln == "single" else 0))  # t_block
        if upto is not None:
            return upto * block(N) + embed
        return (D - routed) * block(N) + routed * block(cfg.kept_tokens(N)) + embed + N * W * p * p * C  # + final

    def mfu(self, images_per_s: float, device, grid: int | None = None, flops: float | None = None) -> float:
        """Model FLOPs utilisation (PaLM App. B) against PEAK_FLOPS; nan where the peak is unknown (CPU). flops: the
        training FLOPs per image (train_flops' with the training levers), else estimate_flops(grid)."""
        peak = peak_flops(device)
        return images_per_s * (flops or self.estimate_flops(grid)) / peak if peak else float("nan")


def train_flops(model, keys, grid: int | None = None) -> float:
    """Training FLOPs per image of train.py's step, the one count the start-up line, MFU and scripts/ablate.py's
    equal-FLOP budgets use: the DiT's (estimate_flops), plus with sra_weight > 0 the EMA teacher's no-grad forward
    up to sra_target_block (2 x forward_macs) and SRA's head (forward + backward, 3 x 2 x 4 W^2 a token). keys:
    train.py's keys (a namespace or dict). CFM and the dispersive loss cost O(batch x tokens x width) an image, about
    batch / (20 width) of one block's: not counted."""
    keys = keys if isinstance(keys, dict) else vars(keys)
    flops, cfg = model.estimate_flops(grid), model.config
    if keys.get("sra_weight", 0) > 0:
        tokens = ((grid or cfg.input_size) // cfg.patch) ** 2
        teacher = model.forward_macs(grid, upto=cfg.block_index(keys["sra_target_block"]) + 1)
        flops += 2 * teacher + 3 * 2 * tokens * SRAHead.macs_per_token(cfg.width)
    return flops


class SRAHead(nn.Module):
    """SRA's projector on the student block's output (B, N, W) -> (B, N, W) (arXiv 2505.02831 Sec. 3; the authors'
    SimpleHead, github.com/vvvvvjdy/SRA SiT-SRA/models/sit.py: Linear(W, 2W), SiLU, Linear(2W, W), xavier-uniform
    weights and zero biases as their model's init). Trained with the DiT by the AdamW half of the optimizer; lives in
    the checkpoint as "sra_head", outside the DiT (the EMA, sample.py and init_from never see it)."""
    def __init__(self, width):
        super().__init__()
        self.linear1, self.act, self.linear2 = nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width)
        for m in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def macs_per_token(width):
        return 2 * width * width + 2 * width * width

    def forward(self, x):
        return self.linear2(self.act(self.linear1(x)))                        # (B, N, W)

# dense bf16 tensor-core FLOP/s with fp32 accumulate (no sparsity), matched by substring of the device name;
# more specific names first
PEAK_FLOPS = {
    "5090": 209.5e12,     # NVIDIA RTX Blackwell GPU Architecture whitepaper: BF16 w/ FP32 acc 209.5 (419 sparse)
    "4090": 165.2e12,     # NVIDIA Ada Lovelace GPU Architecture whitepaper: BF16 w/ FP32 acc 165.2 (330.4 sparse)
    "H100 PCIe": 756.5e12,  # NVIDIA H100 datasheet, H100 PCIe: BF16 1,513 TFLOPS with sparsity
    "H100": 989.4e12,     # NVIDIA H100 datasheet, H100 SXM: BF16 1,979 TFLOPS with sparsity
    "H200": 989.4e12,     # NVIDIA H200 datasheet, H200 SXM: BF16 1,979 TFLOPS with sparsity
    "A100": 312e12,       # NVIDIA A100 datasheet: BF16 312 TFLOPS (624 with sparsity)
}

def peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device from PEAK_FLOPS; None for the CPU or an unlisted GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)

#################################################################################
#                       FP8 training (optional: torchao)                        #
#################################################################################

def compile_model(model, shapes=1):
    """torch.compile of the DiT for `shapes` latent shapes (aspect buckets): static per shape, each compiled once.
    Dynamo would otherwise turn the second shape into one dynamic graph (slower kernels), and after recompile_limit
    (8) recompiles run eager; x2 + 2: a routed and an unrouted graph per shape."""
    if shapes > 1:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * shapes + 2)
    return torch.compile(model, dynamic=False if shapes > 1 else None)

def fp8_aligned(module):
    """Both sides of a linear are multiples of 16: the alignment torch._scaled_mm needs."""
    return module.in_features % 16 == 0 and module.out_features % 16 == 0

def block_linear(module, name):
    """The blocks' self- and cross-attention (qkv, q, kv, proj) and MLP linears, where nearly all FLOPs are. Not the
    embedders, t_block, adaLN-Zero's modulation or the final layer: small GEMMs (once per image, or few rows) whose
    fp8 casts would cost about what they save, and the conditioning's and the output's precision."""
    return isinstance(module, nn.Linear) and name.startswith("blocks.") and ".adaLN_modulation." not in name

def fp8_linear_filter(module, name):
    """The linears fp8 training runs in float8: block_linear and fp8_aligned."""
    return block_linear(module, name) and fp8_aligned(module)

def fp8_split(model):
    """-> (names of the linears fp8_linear_filter picks, names of the block linears it leaves in the compute dtype
    because a side is not a multiple of 16)."""
    mods = [(n, m) for n, m in model.named_modules() if block_linear(m, n)]
    return [n for n, m in mods if fp8_aligned(m)], [n for n, m in mods if not fp8_aligned(m)]

def convert_to_fp8(module, keep=fp8_linear_filter):
    """Swap the linears keep(module, name) picks for torchao's Float8Linear, in place (before torch.compile): dynamic
    tensorwise scaling, the recipe every FP8 card runs (rowwise scaling is not supported on consumer Blackwell).
    The parameters stay the same objects and the state dict keeps nn.Linear's keys and plain tensors, so the
    optimizer, the EMA and checkpoints do not change, and sample.py loads the weights without torchao.
    -> the module. torchao is imported here only: it is optional (train.py checks it before any work)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    # pad_inner_dim: the weight-gradient matmul's inner dimension is the row count (batch x tokens, batch x 77 for
    # the cross-attention's kv); CUDA's _scaled_mm needs it a multiple of 16, which a micro-batch of 8 is not
    config = replace(Float8LinearConfig.from_recipe_name("tensorwise"), pad_inner_dim=True)
    return convert_to_float8_training(module, module_filter_fn=keep, config=config)

#################################################################################
#                                  Preset table                                 #
#################################################################################

def preset_table(grid: int = 32, **overrides) -> str:
    """Markdown table of every preset: parameters and training GFLOPs per image at `grid` (built on meta)."""
    rows = ["| preset | depth | width | heads | patch | params (M) | train GFLOP/img |",
            "|---|---|---|---|---|---|---|"]
    for name in PRESETS:
        with torch.device("meta"):
            model = DiT(make_config(name, input_size=grid, **overrides))
        cfg, n = model.config, sum(q.numel() for q in model.parameters())
        rows.append(f"| {name} | {cfg.depth} | {cfg.width} | {cfg.heads} | {cfg.patch} | {n / 1e6:.1f} | "
                    f"{model.estimate_flops() / 1e9:.1f} |")
    return "\n".join(rows)

if __name__ == "__main__":
    for adaln in ("single", "zero"):
        print(f"\nadaln={adaln}, latent 4x32x32 (256 px), 77x768 text states\n" + preset_table(adaln=adaln))
