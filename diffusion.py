"""
Diffusion math: beta schedules, noising, targets, min-SNR weights, the training loss and its levers (contrastive
flow matching, dispersive loss, SRA), samplers and guidance (CFG, its interval, APG, CFG-Zero*); and rectified flow
(prediction "flow") beside eps / v / x0.

Pure math on a fixed schedule; imports nothing from the project. Notation follows DDIM / diffusers:
a_t = alphas_cumprod[t] (alpha-bar), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, t an integer in [0, T).
Flow (SD3, arXiv 2403.03206; SiT, arXiv 2401.08740): x_sigma = (1 - sigma) x0 + sigma eps, sigma in (0, 1], the
model predicts the velocity eps - x0 and is called with the float t = T * sigma, as diffusers does.
The numbers agree with diffusers' DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler
(clip_sample=False, set_alpha_to_one=True, steps_offset=0), FlowMatchEulerDiscreteScheduler and
FlowMatchHeunDiscreteScheduler, and diffusers.training_utils.compute_snr; tests/test_diffusion.py is the
proof. Schedule tensors are float64 on the CPU; every coefficient is cast to the dtype
and device of the tensor it multiplies.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "v", "x0", "flow")
SPACINGS = ("leading", "trailing", "linspace")
DDPM_SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")  # for eps / v / x0
FLOW_SAMPLERS = ("euler", "heun")            # for flow
SAMPLERS = DDPM_SAMPLERS + FLOW_SAMPLERS

#################################################################################
#                        Schedules (float64) and helpers                        #
#################################################################################

def make_betas(schedule, T, beta_start, beta_end):
    """Betas [T] in float64, as diffusers' beta_schedule "linear" | "scaled_linear" | "squaredcos_cap_v2" ("cosine")."""
    if schedule in ("linear", "scaled_linear") and not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise ValueError(f"beta_start and beta_end must be in (0, 1), got {beta_start} and {beta_end}")
    if schedule == "linear":  # Ho et al. 2020 (DDPM) sec. 4: betas linear in t
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":  # Stable Diffusion / diffusers "scaled_linear": linear in sqrt(beta)
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021 eq. 17 (s = 0.008, beta <= 0.999); beta_start/end unused
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023 (arXiv 2305.08891) Algorithm 1 = diffusers' rescale_zero_terminal_snr: a_{T-1} becomes 0."""
    s = torch.cumprod(1 - betas, dim=0).sqrt()  # sqrt(alpha-bar)
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])  # shift the last to 0, rescale so the first keeps its value
    a = s ** 2
    return 1 - torch.cat([a[:1], a[1:] / a[:-1]])  # back to betas: alpha_t = a_t / a_{t-1}


def rescale_cfg(out, out_cond, guidance_rescale):
    """Lin et al. 2023 sec. 3.4 = diffusers' rescale_noise_cfg: pull the guided output's per-sample std toward the
    conditional output's (guidance_rescale = phi: 0 leaves it, 1 matches fully)."""
    dims = list(range(1, out.ndim))
    rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * out


#################################################################################
#                  Guidance: CFG, its interval, APG, CFG-Zero*                  #
#################################################################################

# APG's defaults (Sadat et al. 2024, arXiv 2410.02416): r and beta of the public reimplementations that follow the
# paper's code (norm_threshold 2.5, momentum -0.75, e.g. ACE-Step's apg_guidance.py; the paper's momentum is negative);
# eta has no default (0 is its main setting). r bounds a norm over a whole sample (C x H x W values), so it depends on
# the latent size: measure it (issue 25's sampling table).
APG_NORM = 2.5
APG_MOMENTUM = -0.75
# CFG-Zero* (Fan et al. 2025, arXiv 2503.18886) zero-init: the authors' SD3 / Flux pipelines zero the velocity while
# `i <= zero_steps` with zero_steps = 0 (github.com/WeichenFan/CFG-Zero-star, models/sd/sd3_pipeline.py): one step
CFG_ZERO_INIT_STEPS = 1


def parse_cfg_interval(text):
    """"LO,HI" -> (lo, hi) floats, "" -> None (guide at every evaluation); ValueError otherwise. The one parser of
    sample.py's / evaluate.py's --cfg_interval and train.py's sample_cfg_interval; check_guidance checks the range."""
    if not text.strip():
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"cfg_interval must be LO,HI (two numbers in [0, 1]), got {text!r}") from None
    return lo, hi


def check_guidance(cfg_interval=None, apg=None, apg_norm=APG_NORM, apg_momentum=APG_MOMENTUM, cfg_zero_star=False,
                   guidance_rescale=0.0, prediction=None):
    """ValueError for guidance settings that no sampler takes; prediction None: not known yet (the CLIs check before
    loading a checkpoint, Diffusion.sample again with its own kind)."""
    if cfg_interval is not None:
        lo, hi = cfg_interval if len(cfg_interval) == 2 else (math.nan, math.nan)
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"cfg_interval {tuple(cfg_interval)}: needs 0 <= LO <= HI <= 1 (s = sigma for flow, "
                             "t / T otherwise)")
    if apg is not None:
        if not (math.isfinite(apg) and apg >= 0):
            raise ValueError(f"apg (eta, the weight of the parallel component) must be >= 0, got {apg}")
        if not apg_norm > 0:
            raise ValueError(f"apg_norm (r, the norm threshold) must be > 0 (inf: no rescaling), got {apg_norm}")
        if not math.isfinite(apg_momentum):
            raise ValueError(f"apg_momentum must be a finite number, got {apg_momentum}")
        if cfg_zero_star:
            raise ValueError("APG and CFG-Zero* each replace the CFG update: choose one")
        if guidance_rescale > 0:
            raise ValueError("APG with guidance_rescale > 0 is refused: APG's norm threshold already bounds the "
                             "update; use one of them")
    if cfg_zero_star and prediction not in (None, "flow"):
        raise ValueError(f"CFG-Zero* is for flow models (its scale and zero-init are derived for flow velocities); "
                         f"this model predicts {prediction}")


@dataclasses.dataclass
class Guidance:
    """How one sampling call combines the conditional and unconditional outputs (Diffusion.guide), and the state
    that runs over its model evaluations (APG's momentum). Diffusion.sample makes one per call."""
    cfg: float = 1.0                # w in out_u + w (out_c - out_u) (Ho & Salimans 2022 eq. 6 with their w + 1)
    guidance_rescale: float = 0.0   # phi of Lin et al. 2023 sec. 3.4 (rescale_cfg)
    cfg_interval: tuple = None      # (lo, hi): guide only where s is in [lo, hi] (Kynkaanniemi et al. 2024)
    apg: float = None               # APG's eta; None: APG off (0 is the paper's main setting)
    apg_norm: float = APG_NORM      # APG's r
    apg_momentum: float = APG_MOMENTUM  # APG's beta
    cfg_zero_star: bool = False     # CFG-Zero*'s optimised scale (and, in the flow loop, its zero-init)
    running: torch.Tensor = None    # APG: the momentum average of D over this call's guided evaluations, (B, C, H, W)

    def guides_at(self, s):
        """Whether an evaluation at s (sigma for flow, t / T otherwise) is guided (arXiv 2404.07724: closed range)."""
        return self.cfg_interval is None or self.cfg_interval[0] <= s <= self.cfg_interval[1]


def _draw(generator, shape, device, dtype=torch.float32, high=None, uniform=False):
    """randn(shape) (or randint(0, high, shape), or rand(shape) on [0, 1)) from None, one torch.Generator, or a list
    of per-sample generators: with a list, row i comes from generator i alone, so a sample does not depend on its
    batch-mates."""
    def one(g, shp):
        dev = g.device if g is not None else device  # draw where the generator lives, then move (as randn_tensor)
        if uniform:
            return torch.rand(shp, generator=g, device=dev, dtype=dtype)
        if high is None:
            return torch.randn(shp, generator=g, device=dev, dtype=dtype)
        return torch.randint(0, high, shp, generator=g, device=dev)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"a list of generators needs one per sample: {len(generator)} for a batch of {shape[0]}")
        return torch.cat([one(g, (1, *shape[1:])) for g in generator]).to(device)
    return one(generator, shape).to(device)


def _cat_cond(uncond, cond):
    """Concatenate uncond and cond along the batch (elementwise for tuples/lists); a batch-1 uncond is broadcast."""
    if isinstance(cond, (tuple, list)):
        return type(cond)(_cat_cond(u, c) for u, c in zip(uncond, cond, strict=True))
    return torch.cat([uncond.expand_as(cond), cond])


#################################################################################
#          Training levers: contrastive flow matching, dispersive, SRA          #
#################################################################################

# The dispersive loss's temperature tau. The authors' PyTorch release (github.com/raywang4/DispLoss: transport.py's
# disp_loss and its README) divides the squared distances by the feature size and uses tau 1 (weight 0.25, on the
# last block); their JAX runs of the paper used tau 0.5 (weight 0.5, a quarter of the depth).
DISP_TEMPERATURE = 1.0
# SRA's smooth-L1 beta: the authors' loss.py (github.com/vvvvvjdy/SRA, SiT-SRA/loss.py: smooth_l1_loss(beta=0.05),
# the paper's loss; their code now defaults to a cosine loss and calls smooth-L1 the paper's legacy)
SRA_BETA = 0.05
LEVER_TERMS = ("cfm", "disp", "sra")  # the terms Diffusion.loss returns (and train.py logs) beside the loss


def derangement(u):
    """(B,) uniform draws -> (B,) indices neg with neg[i] != i (B >= 2): the random cyclic order argsort(u), each
    sample's negative its successor in it. Every sample is one other's negative, and for one i, neg[i] is uniform
    over the others: the law of the CFM authors' draw (github.com/gstoica27/DeltaFM triplet_loss.py), which draws
    each sample's other sample independently."""
    order = u.argsort()                                                        # (B,)
    neg = torch.empty_like(order)
    neg[order] = order.roll(-1)                                                # order[k] -> order[k + 1]
    return neg


def contrastive_flow_error(pred, target, negatives):
    """Contrastive flow matching (Stoica et al. 2025, arXiv 2506.05350, Sec. 3; DeltaFM's triplet_loss.py
    compute_triplet_loss_efficiently): per sample, the mean squared distance of the predicted flow from ANOTHER
    sample's flow target, target[negatives] (its own noise - x0); the loss subtracts lambda times it from the flow
    matching error. pred, target (B, C, H, W), negatives (B,) -> (B,) float32."""
    err = (pred.float() - target.float()[negatives]) ** 2                     # (B, C, H, W)
    return err.mean(dim=tuple(range(1, err.ndim)))                            # (B,)


def dispersive_loss(z, temperature=DISP_TEMPERATURE):
    """Dispersive loss, InfoNCE-L2 form (Wang & He 2025, arXiv 2506.09027, Sec. 3; the authors' disp_loss): one
    block's output z (B, ...) flattened per sample to D values, in float32; d_ij = ||z_i - z_j||^2 / D; the loss is
    log of the mean of exp(-d_ij / tau) over all B^2 pairs (i = j included, as their "full BxB matrix"), computed
    as a logsumexp. A scalar; its minimum spreads the micro-batch's states apart, with no positive pairs."""
    z = z.float().flatten(1)                                                   # (B, D)
    d = F.pdist(z).pow(2) / z.shape[1]                                         # (B (B - 1) / 2,) the pairs i < j
    logits = torch.cat([-d, -d, d.new_zeros(z.shape[0])]) / temperature       # (B^2,) every (i, j)
    return torch.logsumexp(logits, dim=0) - 2 * math.log(z.shape[0])


def sra_loss(student, teacher, beta=SRA_BETA):
    """Self-representation alignment (Jiang et al. 2025, arXiv 2505.02831, Sec. 3; SiT-SRA/loss.py): smooth-L1 of
    the head's projection of the student block's output to the EMA teacher's block output, (B, N, W) each, in
    float32, averaged over every element. A scalar."""
    return F.smooth_l1_loss(student.float(), teacher.float(), beta=beta)


@dataclasses.dataclass
class Levers:
    """train.py's extra training terms (issue 25), each on where its weight is > 0 (all 0: Diffusion.loss adds
    nothing, draws nothing and calls the model as without them). Blocks are 0-based, already resolved."""
    cfm_weight: float = 0.0     # lambda of contrastive flow matching (flow only, micro-batches of 2 or more)
    disp_weight: float = 0.0    # the dispersive loss's weight, on the output of disp_block
    disp_block: int = 0
    sra_weight: float = 0.0     # SRA's weight: head(student's sra_block) -> the teacher's sra_target_block
    sra_block: int = 0
    sra_target_block: int = 0
    sra_gap: float = 0.2        # the teacher's t: up to sra_gap of the time range earlier (Diffusion.earlier_t)
    teacher: object = None      # SRA: the EMA model as a model_fn (x_t, t, cond, hidden=, output=); called no-grad
    head: object = None         # SRA: the projector on the student's block (model.SRAHead)

    @classmethod
    def from_config(cls, config, depth, teacher=None, head=None):
        """From train.py's keys (a dict) for a DiT of `depth` blocks (config.py has checked the indices)."""
        blocks = {k: config[k] % depth for k in ("disp_block", "sra_block", "sra_target_block")}
        return cls(config["cfm_weight"], config["disp_weight"], blocks["disp_block"], config["sra_weight"],
                   blocks["sra_block"], blocks["sra_target_block"], config["sra_gap"], teacher, head)

    @property
    def blocks(self):
        """The student blocks whose outputs the terms read: model_fn's `hidden` (none: the model is called as ever)."""
        return tuple(sorted({b for b, w in ((self.disp_block, self.disp_weight), (self.sra_block, self.sra_weight))
                             if w > 0}))


#################################################################################
#                             The diffusion process                             #
#################################################################################


class Diffusion:
    def __init__(self, schedule="scaled_linear", T=1000, beta_start=0.00085, beta_end=0.012, prediction="v",
                 zero_terminal_snr=False, flow_shift=1.0):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive int, got {T!r}")
        if not (math.isfinite(flow_shift) and flow_shift > 0):
            raise ValueError(f"flow_shift must be a positive number, got {flow_shift!r}")
        if prediction == "flow" and zero_terminal_snr:
            # the beta schedule (schedule, beta_start/end) does not enter flow at all
            raise ValueError("zero_terminal_snr does not apply to flow: its last step (sigma = 1) is pure noise "
                             "by construction (SNR 0); leave zero_terminal_snr off")
        if zero_terminal_snr and prediction == "eps":
            # at t = T-1 alphas_cumprod is 0 (SNR 0): x_t is pure noise, eps carries nothing about x0, and
            # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) divides by zero
            raise ValueError("zero_terminal_snr with prediction 'eps' is ill-posed (SNR 0 at t = T-1 leaves x0 "
                             "unrecoverable): use prediction 'v' (as arXiv 2305.08891 does) or 'x0'")
        self.schedule, self.T, self.prediction, self.zero_terminal_snr = schedule, T, prediction, zero_terminal_snr
        self.flow, self.flow_shift = prediction == "flow", float(flow_shift)
        betas = make_betas(schedule, T, beta_start, beta_end)
        self.betas = rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas  # float64 [T]
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # a_t = prod_{s<=t} (1 - beta_s), float64 [T]
        self.sqrt_ab = self.alphas_cumprod.sqrt()  # signal scale sqrt(a_t)
        self.sqrt_1m_ab = (1 - self.alphas_cumprod).sqrt()  # noise scale sqrt(1 - a_t)
        self.snr_table = self.alphas_cumprod / (1 - self.alphas_cumprod)  # SNR(t) = a_t / (1 - a_t), Kingma et al. 2021
        self._moved = {}  # (table id, device, dtype) -> table: one host->device copy per table, not one per call
        self._min_snr = {}  # gamma -> float64 [T] min-SNR weights

    @classmethod
    def from_config(cls, config):
        """The schedule of a train.py config (a dict: the run's keys, or a checkpoint's "config"); the one place a
        Diffusion is built from keys (checkpoints older than rectified flow have no flow_shift: 1)."""
        return cls(schedule=config["schedule"], beta_start=config["beta_start"], beta_end=config["beta_end"],
                   prediction=config["prediction"], zero_terminal_snr=config["zero_terminal_snr"],
                   flow_shift=config.get("flow_shift", 1.0))

    def _on(self, table, device, dtype):
        """`table` cast to dtype (before moving: some devices have no float64) and moved to device, once: a copy
        per call would make the host wait for the GPU in every training step."""
        key = (id(table), torch.device(device), dtype)
        if key not in self._moved:
            self._moved[key] = table.to(dtype).to(device)
        return self._moved[key]

    def _gather(self, table, t, x):
        """table[t] cast to x's dtype and device, shaped (B, 1, ..., 1) to broadcast against x."""
        return self._on(table, x.device, x.dtype)[t.to(x.device).long()].view(-1, *([1] * (x.ndim - 1)))

    def _sigma(self, t, x):
        """Flow: sigma = t / T as x's dtype and device, shaped (B, 1, ..., 1)."""
        return (t.to(x.device, torch.float64) / self.T).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def shift(self, sigma):
        """SD3's timestep shift (arXiv 2403.03206 eq. 23) s sigma / (1 + (s - 1) sigma): s > 1 spends more of the
        steps at high noise (for more pixels); s = 1 leaves sigma. Tensors or floats."""
        s = self.flow_shift
        return s * sigma / (1 + (s - 1) * sigma)

    def draw_t(self, n, generator=None, device="cpu", logit_mean=0.0, logit_std=0.0):
        """n training timesteps from `generator`. eps / v / x0: integers floor(T * sigmoid(N(mean, std))) on 0..T-1
        (SD3's logit-normal, discretised), or uniform on 0..T-1 when logit_std is 0 (DDPM Algorithm 1). flow:
        t = T * shift(sigma) (float32) with sigma = sigmoid(N(mean, std)), or uniform on (0, 1] when logit_std is 0."""
        if self.flow:
            if logit_std > 0:
                sigma = torch.sigmoid(torch.randn((n,), generator=generator, device=device) * logit_std + logit_mean)
            else:
                sigma = 1 - torch.rand((n,), generator=generator, device=device)  # (0, 1]: sigma = 0 teaches nothing
            return self.T * self.shift(sigma)
        if logit_std > 0:
            z = torch.randn((n,), generator=generator, device=device) * logit_std + logit_mean
            return (torch.sigmoid(z) * self.T).long().clamp_(0, self.T - 1)
        return torch.randint(0, self.T, (n,), generator=generator, device=device)

    def add_noise(self, x0, noise, t):
        """q(x_t | x0): sqrt(a_t) x0 + sqrt(1 - a_t) noise (DDPM eq. 4); flow: (1 - sigma) x0 + sigma noise."""
        if self.flow:
            sigma = self._sigma(t, x0)
            return (1 - sigma) * x0 + sigma * noise
        return self._gather(self.sqrt_ab, t, x0) * x0 + self._gather(self.sqrt_1m_ab, t, x0) * noise

    def velocity(self, x0, noise, t):
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho 2022, arXiv 2202.00512, sec. 4)."""
        return self._gather(self.sqrt_ab, t, x0) * noise - self._gather(self.sqrt_1m_ab, t, x0) * x0

    def snr(self, t):
        """SNR(t) = a_t / (1 - a_t) as float32 (B,), like diffusers' compute_snr."""
        return self._on(self.snr_table, t.device, torch.float32)[t.long()]

    def target(self, x0, noise, t):
        """What a model of this prediction kind is trained to output."""
        if self.prediction == "eps":
            return noise
        if self.flow:
            return noise - x0  # d x_sigma / d sigma
        return self.velocity(x0, noise, t) if self.prediction == "v" else x0

    @staticmethod
    def _x0_eps(out, x_t, a, s, kind):
        """Model output of `kind` -> (x0, eps), given a = sqrt(a_t), s = sqrt(1 - a_t) (floats or broadcast tensors)."""
        if kind == "eps":
            return (x_t - s * out) / a, out  # invert x_t = a x0 + s eps (DDIM eq. 9)
        if kind == "v":
            return a * x_t - s * out, a * out + s * x_t  # v-prediction inverse (Salimans & Ho 2022 sec. 4)
        return out, (x_t - a * out) / s  # x0 prediction: eps from x_t = a x0 + s eps

    def convert(self, out, x_t, t, to, kind=None):
        """Convert a prediction of `kind` (default: self.prediction) at (x_t, t) into 'eps' | 'v' | 'x0'; a flow
        model's output (kind 'flow') converts into 'eps' | 'x0' | 'flow'."""
        if self.flow:
            if (kind or "flow") != "flow":
                raise ValueError(f"a flow Diffusion converts flow outputs, not {kind!r}")
            sigma = self._sigma(t, x_t)
            x0, eps = x_t - sigma * out, x_t + (1 - sigma) * out  # x = (1 - sigma) x0 + sigma eps, out = eps - x0
            return {"x0": x0, "eps": eps, "flow": out}[to]
        a, s = self._gather(self.sqrt_ab, t, x_t), self._gather(self.sqrt_1m_ab, t, x_t)
        x0, eps = self._x0_eps(out, x_t, a, s, kind or self.prediction)
        return {"x0": x0, "eps": eps, "v": a * eps - s * x0}[to]  # v = a eps - s x0 (Salimans & Ho 2022 sec. 4)

    def check_min_snr(self, min_snr_gamma):
        """ValueError where min-SNR does not apply (flow); train.py calls it before any work."""
        if self.flow and min_snr_gamma > 0:
            raise ValueError("min-SNR weights a DDPM schedule's loss by its SNR; flow puts its weight on the noise "
                             "levels through the sigma law instead (t_logit_mean / t_logit_std, flow_shift): "
                             "set min_snr_gamma 0")

    def loss_weight(self, t, min_snr_gamma=0.0):
        """Min-SNR-gamma weights (Hang et al. 2023, arXiv 2303.09556; diffusers train_text_to_image.py) as float32 (B,):
        eps min(snr, g) / snr, v min(snr, g) / (snr + 1), x0 min(snr, g); all ones when gamma is 0."""
        if min_snr_gamma <= 0:
            return torch.ones(t.shape, device=t.device)
        self.check_min_snr(min_snr_gamma)
        if min_snr_gamma not in self._min_snr:  # one float64 table per gamma, moved to the device once by _on
            snr = self.snr_table
            w = snr.clamp(max=min_snr_gamma)  # min(snr, gamma): the x0-loss weight of the paper
            if self.prediction == "eps":
                w = w / snr  # eps-MSE = snr * x0-MSE
            elif self.prediction == "v":
                w = w / (snr + 1)  # v-MSE = (snr + 1) * x0-MSE
            self._min_snr[min_snr_gamma] = w
        return self._on(self._min_snr[min_snr_gamma], t.device, torch.float32)[t.long()]

    #############################################################################
    #                               Training loss                               #
    #############################################################################

    def loss(self, model_fn, x0, cond, *, min_snr_gamma=0.0, noise_offset=0.0, input_perturbation=0.0,
             t=None, noise=None, offset_noise=None, perturb_noise=None, generator=None, levers=None, cfm_u=None,
             sra_u=None):
        """One denoising loss. Any of t (B,) / noise (B,C,H,W) / offset_noise (B,C,1,1) / perturb_noise (B,C,H,W)
        that is None is drawn from `generator`, in that order (the last two only when their strength is > 0).
        Returns (weighted mean loss, per-sample unweighted MSE (B,) float32 detached, t (B,): long, float for flow).
        Offset noise and input perturbation apply to flow as they do to the others (they change the noise drawn).
        levers (a Levers): the training levers' terms are added to the loss, and the return gains a 4th value, {term
        name: its value, a detached scalar} (LEVER_TERMS; empty where every weight is 0); the loss and per-sample
        values stay the denoising loss's. cfm_u, sra_u (B,) U(0, 1): CFM's negatives (derangement) and SRA's teacher
        times (earlier_t), drawn after the others where None and the lever is on. With blocks to read, model_fn is
        called as model_fn(x_t, t, cond, hidden=blocks) -> (output, {block: (B, N, W)}) (model.DiT.forward)."""
        B, C = x0.shape[:2]
        if t is None and self.flow:
            t = self.T * self.shift(1 - _draw(generator, (B,), x0.device, uniform=True))  # sigma ~ U(0, 1], shifted
        if t is None:
            t = _draw(generator, (B,), x0.device, high=self.T)  # t ~ U{0..T-1} (DDPM Algorithm 1)
        t = t.to(x0.device)
        if noise is None:
            noise = _draw(generator, x0.shape, x0.device, x0.dtype)
        if noise_offset > 0:  # offset noise (Guttenberg 2023; diffusers train_text_to_image --noise_offset)
            if offset_noise is None:
                offset_noise = _draw(generator, (B, C, *[1] * (x0.ndim - 2)), x0.device, x0.dtype)
            noise = noise + noise_offset * offset_noise
        input_noise = noise
        if input_perturbation > 0:  # Ning et al. 2023 (arXiv 2301.11706): perturb the model input, not the target
            if perturb_noise is None:
                perturb_noise = _draw(generator, x0.shape, x0.device, x0.dtype)
            input_noise = noise + input_perturbation * perturb_noise
        blocks = levers.blocks if levers is not None else ()
        pred = model_fn(self.add_noise(x0, input_noise, t), t, cond, **({"hidden": blocks} if blocks else {}))
        pred, states = pred if blocks else (pred, {})  # (B, C, H, W), {block: (B, N, W)}
        target = self.target(x0, noise, t)  # (B, C, H, W)
        err = (pred.float() - target.float()) ** 2  # (B, C, H, W)
        per_sample = err.mean(dim=tuple(range(1, err.ndim)))  # (B,)
        loss = (per_sample * self.loss_weight(t, min_snr_gamma)).mean()
        if levers is None:
            return loss, per_sample.detach(), t
        terms, uniform = {}, lambda u: _draw(generator, (B,), x0.device, uniform=True) if u is None else u
        if levers.cfm_weight > 0:  # -lambda ||v - (eps~ - x0~)||^2, another sample's target (arXiv 2506.05350)
            terms["cfm"] = contrastive_flow_error(pred, target, derangement(uniform(cfm_u))).mean()
            loss = loss - levers.cfm_weight * terms["cfm"]
        if levers.disp_weight > 0:  # log E_ij exp(-||z_i - z_j||^2 / D tau) of one block (arXiv 2506.09027)
            terms["disp"] = dispersive_loss(states[levers.disp_block])
            loss = loss + levers.disp_weight * terms["disp"]
        if levers.sra_weight > 0:  # the EMA at an earlier t, same noise and caption (arXiv 2505.02831)
            t_teacher = self.earlier_t(t, uniform(sra_u), levers.sra_gap)  # (B,)
            with torch.no_grad():
                aim = levers.teacher(self.add_noise(x0, input_noise, t_teacher), t_teacher, cond,
                                     hidden=(levers.sra_target_block,), output=False)[levers.sra_target_block]
            terms["sra"] = sra_loss(levers.head(states[levers.sra_block]), aim)
            loss = loss + levers.sra_weight * terms["sra"]
        return loss, per_sample.detach(), t, {k: v.detach() for k, v in terms.items()}

    def earlier_t(self, t, u, gap):
        """SRA's teacher time (arXiv 2505.02831 Sec. 3; SiT-SRA/loss.py: t - t_max U(0, 1), clamped at 0): per
        sample gap * u * T earlier (less noisy), never below 0; u (B,) in [0, 1), gap a fraction of the time range
        for every prediction kind. Flow: float, in the (shifted) sigma's units; eps / v / x0: rounded to a step."""
        early = (t - gap * self.T * u.to(t.device)).clamp(min=0)  # (B,) float
        return early if self.flow else early.round().long()

    #############################################################################
    #                                  Sampling                                 #
    #############################################################################

    def timesteps(self, steps, spacing="trailing"):
        """Descending LongTensor of `steps` timesteps, as diffusers' set_timesteps (steps_offset=0) defines them
        (Lin et al. 2023 table 2). Where diffusers' "trailing" returns steps+1 values ending in -1 (e.g. 61 steps, a
        float rounding artefact of np.arange), we return the `steps` valid ones."""
        T = self.T
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        i = torch.arange(steps, dtype=torch.float64)
        if spacing == "leading":  # diffusers: arange(steps) * (T // steps), reversed
            return (i * (T // steps)).flip(0).long()
        if spacing == "trailing":  # diffusers: round(arange(T, 0, -T/steps)) - 1; numpy's step: (T - T/steps) - T
            return (T + i * ((T - T / steps) - T)).round().long() - 1
        if spacing == "linspace":  # diffusers: round(linspace(0, T-1, steps)), reversed; numpy: i * step, last = T-1
            t = i * ((T - 1) / (steps - 1)) if steps > 1 else i
            t[-1] = T - 1 if steps > 1 else 0
            return t.round().flip(0).long()
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")

    def _guided_output(self, model_fn, x, t, s, cond, uncond, g):
        """Model output at (x, t). With uncond and s (sigma for flow, t / T otherwise) inside g's interval: guided
        (self.guide) from ONE batched call on [uncond; cond]; else the conditional model alone, one call of batch B."""
        if uncond is None or not g.guides_at(s):
            return model_fn(x, t, cond).to(x.dtype)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(uncond, cond)).to(x.dtype)  # (2B, C, H, W)
        out_uncond, out_cond = out.chunk(2)  # (B, C, H, W) each
        return self.guide(out_cond, out_uncond, x, t, g)

    def guide(self, out_cond, out_uncond, x, t, g):
        """The one place where the conditional and unconditional outputs (B, C, H, W) of the model at (x, t) become
        one, for every sampler: CFG (+ guidance_rescale), with CFG-Zero*'s optimised scale, or APG (per sample)."""
        if g.apg is not None:
            return self._apg(out_cond, out_uncond, x, t, g)
        if g.cfg_zero_star:  # CFG-Zero* sec. 4.1: s* = <v_c, v_u> / ||v_u||^2 per sample, v = s* v_u + w (v_c - s* v_u)
            # in float32 with the authors' 1e-8 (their optimized_scale); (B, 1, 1, 1)
            v_c, v_u = out_cond.flatten(1).float(), out_uncond.flatten(1).float()  # (B, C*H*W)
            s_star = (v_c * v_u).sum(1) / ((v_u * v_u).sum(1) + 1e-8)  # (B,)
            out_uncond = out_uncond * s_star.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        out = out_uncond + g.cfg * (out_cond - out_uncond)  # Ho & Salimans 2022 eq. 6 (cfg = 1 + w), on every channel
        if g.guidance_rescale > 0:  # applied to the raw output (eps or v), as diffusers' pipelines do
            out = rescale_cfg(out, out_cond, g.guidance_rescale)
        return out

    def _apg(self, out_cond, out_uncond, x, t, g):
        """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416; the order of its reference code) on the
        x0 prediction, per sample: D = x0_c - x0_u; reverse momentum D <- D + beta D_prev (D_prev: this running sum
        at the previous guided evaluation of the call; beta < 0 pushes away from it); rescaling D <- D min(1, r /
        ||D||); projection D = D_par + D_orth w.r.t. x0_c; x0 = x0_c + (w - 1) (D_orth + eta D_par), which at eta 1,
        r = inf, beta 0 is CFG. Returned as this model's kind of output for the sampler's update."""
        dims = tuple(range(1, x.ndim))
        x0_cond = self.convert(out_cond, x, t, "x0")  # (B, C, H, W)
        diff = x0_cond - self.convert(out_uncond, x, t, "x0")  # D, the CFG update of x0 over w - 1
        g.running = diff if g.running is None else diff + g.apg_momentum * g.running  # momentum over the call
        norm = torch.linalg.vector_norm(g.running, dim=dims, keepdim=True)  # (B, 1, 1, 1)
        diff = g.running * (g.apg_norm / norm).clamp(max=1.0)  # ||D|| <= r
        unit = F.normalize(x0_cond.flatten(1), dim=1).view_as(x0_cond)  # x0_c / ||x0_c||
        parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit  # D_par, (B, C, H, W)
        x0 = x0_cond + (g.cfg - 1) * (diff - parallel + g.apg * parallel)  # D_orth + eta D_par
        return self._from_x0(x0, x, t)

    def _from_x0(self, x0, x_t, t):
        """An x0 prediction at (x_t, t) as the output of this model's kind: the inverse of convert(..., "x0")."""
        if self.flow:
            return (x_t - x0) / self._sigma(t, x_t)  # x0 = x - sigma v
        a, s = self._gather(self.sqrt_ab, t, x_t), self._gather(self.sqrt_1m_ab, t, x_t)
        eps = (x_t - a * x0) / s  # x_t = a x0 + s eps
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.prediction]

    @property
    def default_sampler(self):
        return "euler" if self.flow else "ddim"

    def check_sampler(self, sampler, eta=0.0):
        """-> the sampler to use (None: the default of this prediction kind); ValueError for one of the other kind."""
        sampler = sampler or self.default_sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if self.flow and sampler not in FLOW_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is for eps / v / x0 models; this is a flow model: "
                             f"{' | '.join(FLOW_SAMPLERS)}")
        if not self.flow and sampler in FLOW_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is for flow models; this is a {self.prediction} model: "
                             f"{' | '.join(DDPM_SAMPLERS)}")
        if eta < 0 or (eta > 0 and self.flow):
            raise ValueError(f"eta {eta}: must be >= 0 (0: deterministic DDIM); flow's samplers take no eta")
        return sampler

    def flow_sigmas(self, steps):
        """The `steps` + 1 sigmas (float64, descending, last 0) of diffusers' FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=T, shift=s).set_timesteps(steps): linspace(1, shift(1 / T), steps), shifted, then 0.
        Its smallest sigma is shifted twice (shift(shift(1 / T))): kept, so the grid is diffusers' own."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in [1, {self.T}], got {steps}")
        sigma_min = self.shift(1 / self.T)  # the smallest training sigma of the scheduler's table
        grid = torch.linspace(1.0, sigma_min, steps, dtype=torch.float64)
        return torch.cat([self.shift(grid), torch.zeros(1, dtype=torch.float64)])

    @torch.no_grad()
    def sample(self, model_fn, x_T, cond, uncond=None, cfg=1.0, guidance_rescale=0.0, steps=50, sampler=None,
               eta=0.0, spacing="trailing", generator=None, t_start=None, *, cfg_interval=None, apg=None,
               apg_norm=APG_NORM, apg_momentum=APG_MOMENTUM, cfg_zero_star=False):
        """Denoise x_T (B, C, H, W) over self.timesteps(steps, spacing) and return x0 in x_T's dtype.
        t_start: x_T is x_{t_start}, e.g. add_noise(x0, noise, t_start) of an image (SDEdit, arXiv 2108.01073):
        the steps are t_start, then the grid's timesteps below it.
        model_fn(x_t, t (B,) long, cond) -> raw output of self.prediction's kind. uncond=None: no CFG, one call a step.
        Every sampler steps from timesteps[i] to timesteps[i+1] and finally to a = 1 (set_alpha_to_one), so the
        last step returns the model's x0 estimate. (DDIMScheduler steps to t - T//steps instead: the same grid for
        "leading", and for "trailing" when steps divides T.) ddpm and ddim with eta > 0 draw noise from `generator`.
        sampler None: ddim, or euler for flow. Flow steps over flow_sigmas(steps) (spacing unused), t = T * sigma.
        Guidance (with uncond; self.guide combines the two outputs for every sampler; at cfg 1 the conditional model
        alone, no unconditional forward, whatever the method):
        cfg_interval (lo, hi): guide only the model evaluations whose s is in [lo, hi] (Kynkaanniemi et al. 2024,
          arXiv 2404.07724), s = sigma for flow (after the shift; Heun's second evaluation by its own sigma), t / T
          otherwise; the others call the conditional model alone (batch B). None: every evaluation.
        apg: APG's eta (None: off), with apg_norm (r) and apg_momentum (beta, over this call's guided evaluations):
          see _apg. Not with cfg_zero_star, nor with guidance_rescale > 0.
        cfg_zero_star (flow only; Fan et al. 2025, arXiv 2503.18886): the optimised scale at every guided evaluation,
          and zero-init (sec. 4.2): the first CFG_ZERO_INIT_STEPS = 1 step has velocity 0, as the authors' SD3 / Flux
          code zeroes step 0 (zero_steps = 0): x stays, no model call (Heun: both evaluations of the step). The
          interval does not move it: zero-init replaces the step, guided or not."""
        sampler = self.check_sampler(sampler, eta)
        if t_start is not None and not 0 <= t_start < self.T:
            raise ValueError(f"t_start must be in [0, {self.T - 1}], got {t_start}")
        check_guidance(cfg_interval, apg, apg_norm, apg_momentum, cfg_zero_star, guidance_rescale, self.prediction)
        if cfg == 1:  # scale 1 is the conditional model alone, for every method: skip the unconditional half
            uncond = None
        g = Guidance(cfg, guidance_rescale, None if cfg_interval is None else tuple(cfg_interval), apg, apg_norm,
                     apg_momentum, cfg_zero_star)
        if self.flow:
            return self._sample_flow(model_fn, x_T, cond, uncond, g, steps, sampler, t_start)
        ts = self.timesteps(steps, spacing).tolist()
        if t_start is not None:
            ts = [t_start] + [t for t in ts if t < t_start]
        ab = self.alphas_cumprod.tolist()  # python floats (double); scalar * tensor keeps the tensor's dtype
        if sampler == "dpmpp_2m" and self.zero_terminal_snr:
            ab[-1] = 2.0 ** -24  # as DPMSolverMultistepScheduler: keeps lambda_{T-1} = log(alpha/sigma) finite
        x, B = x_T, x_T.shape[0]
        x0_prev = h_prev = None
        for i, t in enumerate(ts):
            s = ts[i + 1] if i + 1 < len(ts) else -1  # the next, less noisy timestep; -1: clean data
            a_t, a_s = ab[t], (ab[s] if s >= 0 else 1.0)
            t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
            out = self._guided_output(model_fn, x, t_batch, t / self.T, cond, uncond, g)
            x0, eps = self._x0_eps(out, x, a_t ** 0.5, (1 - a_t) ** 0.5, self.prediction)
            if sampler == "ddim":
                std = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5  # DDIM eq. 16: eta * posterior std
                x = a_s ** 0.5 * x0 + max(1 - a_s - std ** 2, 0.0) ** 0.5 * eps  # DDIM eq. 12
                if std > 0:
                    x = x + std * _draw(generator, x.shape, x.device, x.dtype)
            elif sampler == "ddpm":
                beta = 1 - a_t / a_s  # the beta of this (possibly strided) step, as DDPMScheduler.step
                # DDPM eq. 7, posterior mean of q(x_s | x_t, x0)
                x = (a_s ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_s) / (1 - a_t)) * x
                if s >= 0:  # DDPM eq. 7 variance ("fixed_small"), clamped at 1e-20 as diffusers does
                    std = max((1 - a_s) / (1 - a_t) * beta, 1e-20) ** 0.5
                    x = x + std * _draw(generator, x.shape, x.device, x.dtype)
            elif s < 0:  # dpmpp_2m's last step: first order to sigma = 0 is x0 (diffusers final_sigmas_type="zero")
                x = x0
            else:  # dpmpp_2m: DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2), diffusers' "midpoint"
                # h = lambda_s - lambda_t, lambda = log(alpha / sigma)
                h = 0.5 * math.log(a_s / (1 - a_s)) - 0.5 * math.log(a_t / (1 - a_t))
                # first step first order (D = x0); then D = D0 + D1 / 2 with D1 = (x0 - x0_prev) / r, r = h_prev / h
                d = x0 if x0_prev is None else x0 + 0.5 * (h / h_prev) * (x0 - x0_prev)
                # sigma_s / sigma_t x - alpha_s (e^-h - 1) D
                x = ((1 - a_s) / (1 - a_t)) ** 0.5 * x - a_s ** 0.5 * math.expm1(-h) * d
                x0_prev, h_prev = x0, h
        return x

    def _sample_flow(self, model_fn, x, cond, uncond, g, steps, sampler, t_start):
        """Euler (FlowMatchEulerDiscreteScheduler.step: x + (sigma_next - sigma) v) or Heun (its second-order
        correction, as FlowMatchHeunDiscreteScheduler: the last step, to sigma = 0, is Euler) over flow_sigmas."""
        sigmas = self.flow_sigmas(steps).tolist()
        if t_start is not None:  # SDEdit: x is x_sigma at sigma = t_start / T
            sigmas = [t_start / self.T] + [s for s in sigmas if s < t_start / self.T]
        if g.cfg_zero_star and uncond is not None and len(sigmas) - 1 <= CFG_ZERO_INIT_STEPS:
            raise ValueError(f"CFG-Zero* zeroes the first {CFG_ZERO_INIT_STEPS} step(s): with {len(sigmas) - 1} "
                             "step(s) to run the sample would be its start")
        B = x.shape[0]
        def velocity(x, sigma):
            t = torch.full((B,), self.T * sigma, dtype=torch.float32, device=x.device)
            return self._guided_output(model_fn, x, t, sigma, cond, uncond, g)
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            if g.cfg_zero_star and uncond is not None and i < CFG_ZERO_INIT_STEPS:
                continue  # CFG-Zero*'s zero-init (sec. 4.2): v = 0, so x + (sigma_next - sigma) * 0 = x
            v = velocity(x, sigma)
            x_next = x + (sigma_next - sigma) * v
            if sampler == "heun" and sigma_next > 0:  # trapezoid: the mean of the slopes at both ends
                x_next = x + (sigma_next - sigma) * 0.5 * (v + velocity(x_next, sigma_next))
            x = x_next
        return x
