"""diffusion.py against diffusers (the oracle), float64 recomputations, and closed-form invariants. CPU, seconds."""
import math

import pytest
import torch
import diffusers.schedulers.scheduling_ddim as ddim_module
import diffusers.schedulers.scheduling_ddpm as ddpm_module
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler)
# rescale_noise_cfg = StableDiffusionPipeline's (whose module needs transformers)
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.training_utils import compute_snr
from scipy.stats import norm

from diffusion import (Diffusion, Guidance, Levers, check_guidance, derangement, dispersive_loss, parse_cfg_interval,
                       rescale_cfg, sra_loss)

T = 1000
BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 0.02)}
DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE_CASES = [(s, z) for s in BETAS for z in (False, True)]


def ours(schedule="scaled_linear", prediction="v", zero_terminal_snr=False):
    b0, b1 = BETAS[schedule]
    return Diffusion(schedule, T, b0, b1, prediction=prediction, zero_terminal_snr=zero_terminal_snr)


def theirs(cls, schedule="scaled_linear", prediction="v", zero_terminal_snr=False, **kw):
    b0, b1 = BETAS[schedule]
    return cls(num_train_timesteps=T, beta_start=b0, beta_end=b1, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
               prediction_type=DIFFUSERS_PREDICTION[prediction], rescale_betas_zero_snr=zero_terminal_snr, **kw)


class _Float64Torch:
    """`torch` as a diffusers scheduler module sees it, with float32 meaning float64: diffusers hard-codes float32
    betas, whose rounding alone exceeds 1e-6 relative (e.g. SNR near t=0); this runs diffusers' own code in double."""
    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.fixture
def float64_diffusers(monkeypatch):
    for module in (ddpm_module, ddim_module):
        monkeypatch.setattr(module, "torch", _Float64Torch())


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def toy_model(d):
    """A deterministic stand-in for a trained model of d.prediction's kind: the optimal denoiser for N(0, 1) data
    (x0 = a x_t) plus a term nonlinear in x_t and depending on t and cond ((B, C), or a tuple whose first item is)."""
    def model_fn(x, t, cond):
        c = cond[0] if isinstance(cond, (tuple, list)) else cond
        a, s = d.sqrt_ab[t].to(x.dtype).view(-1, 1, 1, 1), d.sqrt_1m_ab[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = a * x + s * (0.5 * torch.tanh(2 * x + c.view(*c.shape, 1, 1)) + 0.2 * torch.sin(3 * x + s))
        eps = (x - a * x0) / s
        return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[d.prediction]
    return model_fn


# -----------------------------------------------------------------------------
# schedule, noising, SNR

@pytest.mark.parametrize("schedule,zts", SCHEDULE_CASES)
def test_schedule_matches_diffusers(float64_diffusers, schedule, zts):
    d = ours(schedule, "v", zts)
    ddpm, ddim = theirs(DDPMScheduler, schedule, "v", zts), theirs(DDIMScheduler, schedule, "v", zts)
    assert ddpm.alphas_cumprod.dtype == torch.float64  # the float64 patch took effect
    torch.testing.assert_close(d.betas, ddpm.betas, rtol=1e-6, atol=0)
    for ref in (ddpm.alphas_cumprod, ddim.alphas_cumprod):
        torch.testing.assert_close(d.alphas_cumprod, ref, rtol=1e-6, atol=0)
    t = torch.arange(T)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, T, 2, 2, 2, generator=g, dtype=torch.float64)
    for ref in (ddpm, ddim):
        assert rel_err(d.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) < 1e-6
        assert rel_err(d.velocity(x0, noise, t), ref.get_velocity(x0, noise, t)) < 1e-6
    torch.testing.assert_close(d.snr(t), compute_snr(ddpm, t), rtol=1e-6, atol=0)
    if zts:
        assert d.alphas_cumprod[-1] == 0 and d.snr(t)[-1] == 0
        assert d.alphas_cumprod[0] == pytest.approx(ours(schedule, "v").alphas_cumprod[0].item(), rel=1e-12)


@pytest.mark.parametrize("schedule,zts", SCHEDULE_CASES)
def test_stock_float32_diffusers_agrees_to_float32_rounding(schedule, zts):
    d, ref = ours(schedule, "v", zts), theirs(DDPMScheduler, schedule, "v", zts)
    assert (d.alphas_cumprod.sqrt() - ref.alphas_cumprod.double().sqrt()).abs().max() < 1e-6  # signal scale
    x0 = torch.randn(T, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    noise, t = torch.randn_like(x0), torch.arange(T)
    assert rel_err(d.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) < 1e-5
    assert rel_err(d.velocity(x0, noise, t), ref.get_velocity(x0, noise, t)) < 1e-5


def test_zero_terminal_snr_with_eps_is_refused():
    with pytest.raises(ValueError, match="ill-posed"):
        ours("scaled_linear", "eps", True)
    for bad in (dict(schedule="sigmoid"), dict(prediction="epsilon")):
        with pytest.raises(ValueError):
            Diffusion(**bad)


@pytest.mark.parametrize("schedule,zts", [("scaled_linear", False), ("scaled_linear", True), ("cosine", False)])
def test_prediction_conversions(schedule, zts):
    d = ours(schedule, "v", zts)
    g = torch.Generator().manual_seed(2)
    t = torch.arange(0, T, 37).long()
    x0, noise = torch.randn(2, len(t), 3, 2, 2, generator=g, dtype=torch.float64)
    x_t = d.add_noise(x0, noise, t)
    a = d.alphas_cumprod[t].to(torch.float64).view(-1, 1, 1, 1)
    truth = {"eps": noise, "v": a.sqrt() * noise - (1 - a).sqrt() * x0, "x0": x0}  # v (Salimans & Ho 2022), by hand
    for kind in ("eps", "v", "x0"):
        if not (zts and kind == "eps"):
            torch.testing.assert_close(ours(schedule, kind, zts).target(x0, noise, t), truth[kind],
                                       rtol=1e-12, atol=1e-12)
        for to in ("eps", "v", "x0"):
            # eps -> x0 needs SNR > 0
            ok = d.alphas_cumprod[t] > 0 if kind == "eps" else torch.ones(len(t), dtype=torch.bool)
            got = d.convert(truth[kind], x_t, t, to, kind=kind)
            torch.testing.assert_close(got[ok], truth[to][ok], rtol=1e-8, atol=1e-8)


# -----------------------------------------------------------------------------
# timesteps

def test_timesteps_match_set_timesteps_for_every_step_count():
    d = ours()
    spurious = []
    for spacing in ("leading", "trailing", "linspace"):
        ref = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
        for n in range(1, T + 1):
            ref.set_timesteps(n)
            got, want = d.timesteps(n, spacing), ref.timesteps
            assert len(got) == n and got.dtype == torch.long and 0 <= got.min() and got.max() < T
            assert n == 1 or bool((got[1:] < got[:-1]).all())
            if len(want) == n + 1:  # diffusers' trailing sometimes appends a spurious -1 (np.arange rounding)
                assert spacing == "trailing" and want[-1] == -1
                spurious.append(n)
                want = want[:-1]
            assert torch.equal(got, want), (spacing, n)
    assert 61 in spurious  # the known case, documented in Diffusion.timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 13, 25, 50, 999, 1000])
def test_timesteps_match_ddim_set_timesteps(spacing, n):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(n)
    assert torch.equal(ours().timesteps(n, spacing), ref.timesteps)


def test_trailing_timesteps_match_dpm_solver():
    ref = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    for n in (1, 7, 10, 20, 25, 50):
        ref.set_timesteps(n)
        assert torch.equal(ours().timesteps(n, "trailing"), ref.timesteps)


# -----------------------------------------------------------------------------
# samplers vs a hand-written loop over the diffusers scheduler

MODEL_CASES = [("scaled_linear", "eps", False), ("scaled_linear", "v", False), ("scaled_linear", "v", True),
               ("cosine", "x0", False), ("linear", "eps", False)]
SAMPLER_CASES = [  # (sampler, spacing, steps, eta): DDIMScheduler steps to t - T//n, so its grids must be regular
    ("ddim", "trailing", 10, 0.0), ("ddim", "leading", 7, 0.0), ("ddim", "trailing", 20, 0.7),
    ("ddpm", "trailing", 10, 0.0), ("ddpm", "linspace", 13, 0.0), ("ddpm", "leading", 7, 0.0),
    ("dpmpp_2m", "trailing", 10, 0.0), ("dpmpp_2m", "trailing", 20, 0.0), ("dpmpp_2m", "linspace", 13, 0.0),
    ("dpmpp_2m", "leading", 7, 0.0), ("dpmpp_2m", "trailing", 1, 0.0), ("dpmpp_2m", "trailing", 2, 0.0)]


def diffusers_loop(sched, model_fn, x, cond, seed, **step_kw):
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        out = model_fn(x, torch.full((x.shape[0],), int(t)), cond)
        x = sched.step(out, t, x, generator=g, **step_kw).prev_sample
    return x


def reference_sample(model_fn, sampler, spacing, steps, eta, schedule, prediction, zts, x, cond, seed):
    if sampler == "ddim":
        ref = theirs(DDIMScheduler, schedule, prediction, zts, clip_sample=False, set_alpha_to_one=True,
                     steps_offset=0, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        return diffusers_loop(ref, model_fn, x, cond, seed, eta=eta)
    if sampler == "ddpm":
        ref = theirs(DDPMScheduler, schedule, prediction, zts, clip_sample=False, variance_type="fixed_small",
                     steps_offset=0, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        return diffusers_loop(ref, model_fn, x, cond, seed)
    ref = theirs(DPMSolverMultistepScheduler, schedule, prediction, zts, algorithm_type="dpmsolver++", solver_order=2,
                 solver_type="midpoint", lower_order_final=True, timestep_spacing=spacing, steps_offset=0)
    if spacing == "trailing":  # DPMSolverMultistepScheduler's own trailing grid equals ours
        ref.set_timesteps(steps)
        assert torch.equal(ref.timesteps, ours(schedule, "v").timesteps(steps, spacing))
    else:  # its leading / linspace are defined differently (steps + 1 points): hand it ours
        ref.set_timesteps(timesteps=ours(schedule, "v").timesteps(steps, spacing).tolist())
    return diffusers_loop(ref, model_fn, x, cond, seed)


@pytest.mark.parametrize("schedule,prediction,zts", MODEL_CASES)
@pytest.mark.parametrize("sampler,spacing,steps,eta", SAMPLER_CASES)
def test_sampler_matches_diffusers_loop(sampler, spacing, steps, eta, schedule, prediction, zts):
    g = torch.Generator().manual_seed(3)
    x_T, cond = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, generator=g)
    d = ours(schedule, prediction, zts)
    got = d.sample(toy_model(d), x_T, cond, steps=steps, sampler=sampler, eta=eta, spacing=spacing,
                   generator=torch.Generator().manual_seed(4))
    want = reference_sample(toy_model(d), sampler, spacing, steps, eta, schedule, prediction, zts, x_T, cond, seed=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("schedule,prediction,zts", MODEL_CASES)
@pytest.mark.parametrize("spacing,steps", [("linspace", 13), ("trailing", 7), ("trailing", 61)])
def test_ddim_on_irregular_grids(spacing, steps, schedule, prediction, zts):
    """DDIMScheduler steps to t - T//steps, off our grid here; we step to the next listed timestep, which diffusers
    checks two ways: eta=0 is DPM-Solver first order (DDIM = DPM-Solver-1), eta=1 is DDPM (DDIM paper sec. 4.1)."""
    g = torch.Generator().manual_seed(5)
    x_T, cond = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, generator=g)
    d = ours(schedule, prediction, zts)
    grid = d.timesteps(steps, spacing).tolist()
    dpm1 = theirs(DPMSolverMultistepScheduler, schedule, prediction, zts, algorithm_type="dpmsolver++", solver_order=1)
    dpm1.set_timesteps(timesteps=grid)
    got = d.sample(toy_model(d), x_T, cond, steps=steps, sampler="ddim", eta=0.0, spacing=spacing)
    if not zts:  # DPMSolver clips a_{T-1} to 2**-24 under zero terminal SNR, DDIM does not
        torch.testing.assert_close(got, diffusers_loop(dpm1, toy_model(d), x_T, cond, 0), rtol=1e-4, atol=2e-5)
    ddpm = theirs(DDPMScheduler, schedule, prediction, zts, clip_sample=False)
    ddpm.set_timesteps(timesteps=grid)
    got = d.sample(toy_model(d), x_T, cond, steps=steps, sampler="ddim", eta=1.0, spacing=spacing,
                   generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(got, diffusers_loop(ddpm, toy_model(d), x_T, cond, 6), rtol=1e-4, atol=2e-5)


def test_sampler_rejects_unknown_names():
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError):
        ours().sample(toy_model(ours()), x, torch.zeros(1, 3), sampler="euler")
    with pytest.raises(ValueError):
        ours().timesteps(10, "uniform")


def test_bad_arguments_raise_value_error():
    """Callers catch ValueError only: every bad constructor, sample() or loss() argument raises one, not an assert."""
    for bad in (dict(T=0), dict(T=10.5), dict(beta_start=0.0), dict(beta_end=1.5),
                dict(schedule="linear", beta_end=-1)):
        with pytest.raises(ValueError):
            Diffusion(**bad)
    assert Diffusion("cosine", beta_start=0.0, beta_end=0.0).T == T  # the cosine schedule has no betas to check
    d, x, cond = ours(), torch.zeros(2, 3, 2, 2), torch.zeros(2, 3)
    for bad in (dict(steps=0), dict(steps=T + 1), dict(spacing="uniform"), dict(sampler="euler"), dict(eta=-0.5),
                dict(t_start=T), dict(sampler="ddpm", generator=[torch.Generator()])):  # one generator for 2 samples
        with pytest.raises(ValueError):
            d.sample(toy_model(d), x, cond, **bad)
    with pytest.raises(ValueError):
        d.loss(toy_model(d), x, cond, generator=[torch.Generator()])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_sample_from_t_start(sampler):
    """SDEdit start: the steps are t_start then the grid below it; a model that knows x0 gives x0 back (float64);
    t_start = T-1 is the plain trailing-grid sample."""
    d = ours()
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    seen = []

    def oracle(x, t, c):  # the exact v of x_t for this x0
        seen.append(int(t[0]))
        a = d.alphas_cumprod[t].view(-1, 1, 1, 1).to(torch.float64)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    t0 = 437
    x_t = d.add_noise(x0, noise, torch.full((2,), t0))
    got = d.sample(oracle, x_t, None, steps=10, sampler=sampler, t_start=t0)
    assert seen == [t0] + [t for t in d.timesteps(10).tolist() if t < t0]
    torch.testing.assert_close(got, x0, rtol=1e-9, atol=1e-9)
    x_T = torch.randn(2, 3, 4, 4, generator=g)
    cond = torch.randn(2, 3, generator=g)
    torch.testing.assert_close(d.sample(toy_model(d), x_T, cond, steps=10, sampler=sampler, t_start=T - 1),
                               d.sample(toy_model(d), x_T, cond, steps=10, sampler=sampler), rtol=0, atol=0)
    with pytest.raises(ValueError):
        d.sample(oracle, x_t, None, steps=10, t_start=T)


# -----------------------------------------------------------------------------
# classifier-free guidance and generators

def test_cfg_scale_one_equals_conditional():
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(3, 3, 4, 4, generator=g)
    cond, uncond = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    d = ours()
    plain = d.sample(toy_model(d), x_T, cond, steps=10)
    guided = d.sample(toy_model(d), x_T, cond, uncond=uncond, cfg=1.0, steps=10)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(d.sample(toy_model(d), x_T, cond, uncond=uncond, cfg=3.0, steps=10), plain, atol=1e-3)


@pytest.mark.parametrize("prediction,guidance_rescale", [("v", 0.0), ("v", 0.7), ("eps", 0.5)])
def test_cfg_one_batched_call_equals_diffusers_pipeline_loop(prediction, guidance_rescale):
    g = torch.Generator().manual_seed(8)
    B, cfg, steps = 2, 4.0, 10
    x_T = torch.randn(B, 3, 4, 4, generator=g)
    cond = (torch.randn(B, 3, generator=g), torch.randn(B, 5, generator=g))  # (text states, pooled) stand-ins
    uncond = (torch.randn(1, 3, generator=g), torch.randn(1, 5, generator=g))  # batch 1: broadcast over the batch
    calls = []

    def model_fn(x, t, c):
        calls.append((x.shape[0], t.shape[0], c[0].shape[0], c[1].shape[0]))
        return toy(x, t, c) + 0.1 * c[1][:, :3].view(-1, 3, 1, 1)

    d = ours("scaled_linear", prediction)
    toy = toy_model(d)
    got = d.sample(model_fn, x_T, cond, uncond=uncond, cfg=cfg, guidance_rescale=guidance_rescale, steps=steps)
    assert calls == [(2 * B,) * 4] * steps  # one batched call per step
    ref = theirs(DDIMScheduler, "scaled_linear", prediction, clip_sample=False, set_alpha_to_one=True,
                 steps_offset=0, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    x, u = x_T, tuple(a.expand(B, -1) for a in uncond)
    for t in ref.timesteps:
        tb = torch.full((B,), int(t))
        out_c, out_u = model_fn(x, tb, cond), model_fn(x, tb, u)
        out = out_u + cfg * (out_c - out_u)  # as StableDiffusionPipeline
        if guidance_rescale > 0:
            out = rescale_noise_cfg(out, out_c, guidance_rescale=guidance_rescale)
        x = ref.step(out, t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-4, atol=2e-5)


def test_rescale_cfg_equals_rescale_noise_cfg():
    g = torch.Generator().manual_seed(9)
    out, out_cond = 3 * torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    for phi in (0.0, 0.3, 0.7, 1.0):
        torch.testing.assert_close(rescale_cfg(out, out_cond, phi), rescale_noise_cfg(out, out_cond, phi))


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5), ("dpmpp_2m", 0.0)])
def test_list_of_generators_makes_each_sample_independent_of_its_batch(sampler, eta):
    g = torch.Generator().manual_seed(10)
    x_T = torch.randn(3, 3, 4, 4, generator=g)
    cond, uncond = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    d = ours()
    kw = dict(cfg=2.0, guidance_rescale=0.5, steps=8, sampler=sampler, eta=eta)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = d.sample(toy_model(d), x_T, cond, uncond=uncond, generator=gens((11, 12, 13)), **kw)
    for i, s in enumerate((11, 12, 13)):
        alone = d.sample(toy_model(d), x_T[i:i + 1], cond[i:i + 1], uncond=uncond[i:i + 1], generator=gens((s,)), **kw)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-6, atol=1e-6)
    if sampler == "ddpm":  # and the noise really comes from the generators
        other = d.sample(toy_model(d), x_T, cond, uncond=uncond, generator=gens((11, 12, 14)), **kw)
        assert torch.equal(other[:2], batch[:2]) and not torch.allclose(other[2], batch[2])


# -----------------------------------------------------------------------------
# end to end, independent of diffusers: for these data the optimal denoiser E[x0 | x_t] is known in closed form

def exact_denoiser(d, posterior_mean):
    """model_fn returning the optimal prediction of d.prediction's kind, from
    E[x0 | x_t] = posterior_mean(x_t, a, s)."""
    def model_fn(x, t, cond):
        a, s = d.sqrt_ab[t].view(-1, 1).float(), d.sqrt_1m_ab[t].view(-1, 1).float()
        x0 = posterior_mean(x, a, s)
        eps = (x - a * x0) / s
        return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[d.prediction]
    return model_fn


@pytest.mark.parametrize("schedule,prediction,zts,sampler", [
    ("scaled_linear", "eps", False, "ddim"), ("scaled_linear", "v", True, "ddim"), ("cosine", "x0", False, "ddim"),
    ("linear", "v", False, "ddim"), ("scaled_linear", "v", False, "dpmpp_2m"), ("cosine", "eps", False, "dpmpp_2m")])
def test_two_point_mixture_50_steps_reproduce_mean_and_std(schedule, prediction, zts, sampler):
    p, n = 0.7, 20_000  # x0 = +1 with probability p, else -1: mean 2p - 1, std 2 sqrt(p (1 - p))
    d = ours(schedule, prediction, zts)
    # posterior log-odds of +1 given x_t = a x0 + s eps: log(p / (1 - p)) + 2 a x_t / s^2
    model_fn = exact_denoiser(d, lambda x, a, s: torch.tanh(0.5 * math.log(p / (1 - p)) + a * x / s ** 2))
    # stratified draw of x_T from its exact marginal: x0 in proportion, Gaussian quantiles as noise
    n_plus = round(p * n)
    quantiles = lambda m: torch.special.ndtri((torch.arange(m, dtype=torch.float64) + 0.5) / m).float()
    x0 = torch.cat([torch.ones(n_plus), -torch.ones(n - n_plus)])
    z = torch.cat([quantiles(n_plus), quantiles(n - n_plus)])
    a_T = d.alphas_cumprod[d.timesteps(50)[0]].item()  # the first timestep's signal level (0 with zero terminal SNR)
    x = d.sample(model_fn, (a_T ** 0.5 * x0 + (1 - a_T) ** 0.5 * z).view(n, 1), None, steps=50, sampler=sampler)
    mean, std = 2 * p - 1, 2 * (p * (1 - p)) ** 0.5
    assert abs(x.mean().item() - mean) < 0.02 * mean and abs(x.std().item() - std) < 0.02 * std


@pytest.mark.parametrize("schedule,prediction,zts", [("scaled_linear", "eps", False), ("scaled_linear", "v", True),
                                                      ("cosine", "x0", False)])
def test_gaussian_data_ddim_trajectory_is_the_closed_form_affine_map(schedule, prediction, zts):
    """x0 ~ N(mu, sd^2): E[x0 | x_t] = mu + a sd^2 / V_t (x_t - a mu), V_t = a^2 sd^2 + s^2, and one DDIM step
    (x_s = a_s x0 + s_s eps) gives x_s - a_s mu = c (x_t - a_t mu), c = (a_s a_t sd^2 + s_s s_t) / V_t. By
    Cauchy-Schwarz c^2 V_t <= V_s: DDIM shrinks the variance a little each step (about 3% in std over 50 steps at
    sd = 1)."""
    mu, sd = 0.5, 1.0
    d = ours(schedule, prediction, zts)
    model_fn = exact_denoiser(d, lambda x, a, s: mu + a * sd ** 2 / (a ** 2 * sd ** 2 + s ** 2) * (x - a * mu))
    ts = d.timesteps(50).tolist()
    x_T = torch.randn(1000, 1, generator=torch.Generator().manual_seed(17))
    c = 1.0
    for t, s in zip(ts, ts[1:] + [-1]):
        a_t, a_s = d.alphas_cumprod[t].item(), (d.alphas_cumprod[s].item() if s >= 0 else 1.0)
        c *= (a_s ** 0.5 * a_t ** 0.5 * sd ** 2 + ((1 - a_s) * (1 - a_t)) ** 0.5) / (a_t * sd ** 2 + 1 - a_t)
    want = mu + c * (x_T.double() - d.alphas_cumprod[ts[0]].item() ** 0.5 * mu)
    torch.testing.assert_close(d.sample(model_fn, x_T, None, steps=50).double(), want, rtol=1e-5, atol=1e-5)
    assert 0.95 < c * (d.alphas_cumprod[ts[0]].item() * sd ** 2 + 1 - d.alphas_cumprod[ts[0]].item()) ** 0.5 / sd < 0.99


# -----------------------------------------------------------------------------
# min-SNR weights and the loss

@pytest.mark.parametrize("schedule,prediction,zts", [(s, p, z) for s, z in SCHEDULE_CASES for p in ("eps", "v")
                                                     if not (z and p == "eps")])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_equal_train_text_to_image(float64_diffusers, schedule, prediction, zts, gamma):
    d, sched = ours(schedule, prediction, zts), theirs(DDPMScheduler, schedule, prediction, zts)
    timesteps = torch.arange(T)
    # diffusers examples/text_to_image/train_text_to_image.py, recomputed:
    snr = compute_snr(sched, timesteps)
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if sched.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif sched.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    torch.testing.assert_close(d.loss_weight(timesteps, gamma), mse_loss_weights, rtol=1e-6, atol=0)
    assert torch.equal(d.loss_weight(timesteps, 0.0), torch.ones(T))


def test_min_snr_weight_for_x0_prediction():
    """diffusers has no x0 case: the reference is the Min-SNR paper's weight for x0 targets, min(SNR, gamma)
    (Hang et al. 2023, arXiv 2303.09556, Sec. 3.4), with SNR from the schedule in float64."""
    d = ours("scaled_linear", "x0")
    t = torch.arange(T)
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    torch.testing.assert_close(d.loss_weight(t, 5.0),
                               torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)).float())


def linear_model(x, t, cond):
    return 0.7 * x - 0.2 * x.flip(1) + (t.to(x.dtype) / T).view(-1, 1, 1, 1) + 0.1 * cond.view(-1, 1, 1, 1)


def loss_inputs(B=4, seed=15):
    g = torch.Generator().manual_seed(seed)
    return dict(x0=torch.randn(B, 3, 4, 4, generator=g), cond=torch.randn(B, generator=g),
                t=torch.tensor([0, 999, 500, 17, 250, 998][:B]), noise=torch.randn(B, 3, 4, 4, generator=g),
                offset_noise=torch.randn(B, 3, 1, 1, generator=g), perturb_noise=torch.randn(B, 3, 4, 4, generator=g))


@pytest.mark.parametrize("prediction,zts", [("eps", False), ("v", False), ("v", True), ("x0", False)])
@pytest.mark.parametrize("gamma,offset,rho", [(0.0, 0.0, 0.0), (5.0, 0.1, 0.0), (5.0, 0.1, 0.2), (1.0, 0.0, 0.3)])
def test_loss_equals_float64_recomputation(prediction, zts, gamma, offset, rho):
    d, k = ours("scaled_linear", prediction, zts), loss_inputs()
    loss, per_sample, t = d.loss(linear_model, k["x0"], k["cond"], min_snr_gamma=gamma, noise_offset=offset,
                                 input_perturbation=rho, t=k["t"], noise=k["noise"], offset_noise=k["offset_noise"],
                                 perturb_noise=k["perturb_noise"])
    x0, ab = k["x0"].double(), d.alphas_cumprod[k["t"]].view(-1, 1, 1, 1)
    noise = k["noise"].double() + offset * k["offset_noise"].double()
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * (noise + rho * k["perturb_noise"].double())
    target = {"eps": noise, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0, "x0": x0}[prediction]
    mse = ((linear_model(x_t, k["t"], k["cond"].double()) - target) ** 2).mean(dim=(1, 2, 3))
    snr = (ab / (1 - ab)).flatten()
    w = {"eps": snr.clamp(max=gamma) / snr, "v": snr.clamp(max=gamma) / (snr + 1),
         "x0": snr.clamp(max=gamma)}[prediction]
    w = w if gamma > 0 else torch.ones_like(snr)
    assert per_sample.dtype == torch.float32 and not per_sample.requires_grad and torch.equal(t, k["t"])
    torch.testing.assert_close(per_sample.double(), mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.double(), (mse * w).mean(), rtol=1e-5, atol=1e-7)


def test_loss_of_half_batches_equals_full_batch():
    d, k = ours("scaled_linear", "v"), loss_inputs(B=6)
    kw = dict(min_snr_gamma=5.0, noise_offset=0.1, input_perturbation=0.1)
    run = lambda rows: d.loss(linear_model, k["x0"][rows], k["cond"][rows], t=k["t"][rows], noise=k["noise"][rows],
                              offset_noise=k["offset_noise"][rows], perturb_noise=k["perturb_noise"][rows], **kw)
    full, halves = run(slice(0, 6)), (run(slice(0, 3)), run(slice(3, 6)))
    torch.testing.assert_close(torch.cat([h[1] for h in halves]), full[1], rtol=1e-6, atol=0)
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, full[0], rtol=1e-6, atol=0)


def test_loss_draws_t_noise_offset_perturb_from_generator_in_order():
    d, k = ours("scaled_linear", "v"), loss_inputs()
    scale = torch.nn.Parameter(torch.tensor(1.0))
    model_fn = lambda x, t, c: scale * linear_model(x, t, c)
    kw = dict(min_snr_gamma=5.0, noise_offset=0.1, input_perturbation=0.1)
    loss, per_sample, t = d.loss(model_fn, k["x0"], k["cond"], generator=torch.Generator().manual_seed(16), **kw)
    g = torch.Generator().manual_seed(16)
    t2 = torch.randint(0, T, (4,), generator=g)
    noise, offset = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 1, 1, generator=g)
    perturb = torch.randn(4, 3, 4, 4, generator=g)
    loss2, per_sample2, _ = d.loss(model_fn, k["x0"], k["cond"], t=t2, noise=noise, offset_noise=offset,
                                   perturb_noise=perturb, **kw)
    assert torch.equal(t, t2) and torch.equal(per_sample, per_sample2) and torch.equal(loss, loss2)
    loss.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


# ----------------------------------------------------------------------------- rectified flow
# against diffusers' FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler (the oracle), float64
# recomputations, and the closed-form flow of Gaussian data


def flow_model(x, t, cond):
    """A deterministic stand-in for a trained flow model: nonlinear in x, depending on t (float, (B,)) and cond."""
    c = cond[0] if isinstance(cond, (tuple, list)) else cond
    s = (t / T).to(x.dtype).view(-1, 1, 1, 1)
    return 0.8 * x - 0.3 * torch.tanh(2 * x + c.view(*c.shape, 1, 1)) + 0.2 * torch.sin(3 * x + s) * s


def flow_diffusers_loop(sched, model_fn, x, cond, uncond=None, cfg=1.0):
    """The loop of diffusers' SD3 pipeline: CFG on one batched [uncond; cond] call, then scheduler.step."""
    for t in sched.timesteps:
        tb = t.expand(x.shape[0])
        if uncond is None:
            out = model_fn(x, tb, cond)
        else:
            u, c = model_fn(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([uncond, cond])).chunk(2)
            out = u + cfg * (c - u)
        x = sched.step(out, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 7, 28, 50])
def test_sigma_grid_is_set_timesteps(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    sched.set_timesteps(steps)
    ours = Diffusion(prediction="flow", flow_shift=shift).flow_sigmas(steps)
    torch.testing.assert_close(ours.float(), sched.sigmas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close((T * ours[:-1]).float(), sched.timesteps, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_add_noise_is_scale_noise(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 10, 3, 4, 4, generator=g)
    t = sched.timesteps  # one sample per timestep of the grid
    ref = torch.cat([sched.scale_noise(x0[i:i + 1], t[i:i + 1], noise[i:i + 1]) for i in range(10)])
    d = Diffusion(prediction="flow", flow_shift=shift)
    torch.testing.assert_close(d.add_noise(x0, noise, t), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler,cls", [("euler", FlowMatchEulerDiscreteScheduler),
                                         ("heun", FlowMatchHeunDiscreteScheduler)])
@pytest.mark.parametrize("shift,steps,cfg", [(1.0, 10, None), (3.0, 10, None), (1.0, 7, 4.0), (3.0, 25, 2.5)])
def test_flow_sampler_matches_diffusers_loop(sampler, cls, shift, steps, cfg):
    g = torch.Generator().manual_seed(1)
    x_T, cond, uncond = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 1, generator=g), torch.zeros(3, 1)
    sched = cls(num_train_timesteps=T, shift=shift)
    sched.set_timesteps(steps)
    ref = flow_diffusers_loop(sched, flow_model, x_T, cond, None if cfg is None else uncond, cfg or 1.0)
    d = Diffusion(prediction="flow", flow_shift=shift)
    ours = d.sample(flow_model, x_T, cond, None if cfg is None else uncond, cfg or 1.0, steps=steps, sampler=sampler)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_gaussian_data_flow_reaches_the_closed_form(sampler, order):
    """x0 ~ N(0, c^2): the exact velocity is E[eps - x0 | x_sigma] = x (sigma - (1 - sigma) c^2) / var(sigma), var =
    (1 - sigma)^2 c^2 + sigma^2, whose ODE maps x_1 to x_1 sqrt(var(sigma)): at sigma = 0, c x_1. The error falls
    with the step count at the sampler's order (the grid's uneven last step, 1/T to 0, is in both counts)."""
    c = 0.5
    def exact(x, t, cond):
        s = (t.double() / T).view(-1, 1, 1, 1)
        return x * (s - (1 - s) * c ** 2) / ((1 - s) ** 2 * c ** 2 + s ** 2)
    x1 = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    d = Diffusion(prediction="flow")
    err = [(d.sample(exact, x1, None, steps=n, sampler=sampler) - c * x1).abs().max().item() for n in (25, 50)]
    assert err[0] < 0.1 ** order and err[1] < err[0] * 0.5 ** order * 1.2, err


def test_sdedit_start_matches_the_trimmed_grid():
    """t_start: the steps run from sigma = t_start / T, then every grid sigma below it (the model is called there)."""
    d = Diffusion(prediction="flow")
    seen = []
    def model(x, t, cond):
        seen.append(round(float(t[0]), 3))
        return torch.zeros_like(x)
    d.sample(model, torch.zeros(1, 1, 2, 2), None, steps=10, t_start=450)
    grid = [round(float(s), 3) for s in T * d.flow_sigmas(10)[:-1] if s < 450]
    assert seen == [450.0] + grid


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("offset,rho", [(0.0, 0.0), (0.1, 0.2)])
def test_flow_loss_equals_float64_recomputation(shift, offset, rho):
    g = torch.Generator().manual_seed(3)
    x0, noise, perturb = torch.randn(3, 4, 2, 4, 4, generator=g)
    off = torch.randn(4, 2, 1, 1, generator=g)
    t = torch.tensor([1.0, 250.5, 731.2, 1000.0])
    d = Diffusion(prediction="flow", flow_shift=shift)
    loss, per_sample, t_out = d.loss(flow_model, x0, torch.ones(4, 1), noise_offset=offset, input_perturbation=rho,
                                     t=t, noise=noise, offset_noise=off, perturb_noise=perturb)
    x0d, nd = x0.double(), noise.double() + offset * off.double()
    s = (t.double() / T).view(-1, 1, 1, 1)
    x_in = (1 - s) * x0d + s * (nd + rho * perturb.double())
    ref = ((flow_model(x_in.float(), t, torch.ones(4, 1)).double() - (nd - x0d)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref.mean(), rtol=1e-5, atol=1e-6)
    assert t_out.dtype == torch.float32


@pytest.mark.parametrize("shift,mean,std", [(1.0, 0.0, 0.0), (3.0, 0.0, 0.0), (1.0, 0.5, 1.0), (3.0, -0.5, 0.8)])
def test_draw_t_follows_the_shifted_law(shift, mean, std):
    """The empirical CDF of T * shift(sigma) against the exact one in float64 (Kolmogorov distance)."""
    d = Diffusion(prediction="flow", flow_shift=shift)
    t = d.draw_t(200_000, torch.Generator().manual_seed(4), logit_mean=mean, logit_std=std).double()
    assert t.dtype == torch.float64 and 0 < t.min() and t.max() <= T
    y = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    u = y / (shift - (shift - 1) * y)  # the inverse of the shift: sigma with shift(sigma) = y
    exact = u if std == 0 else torch.from_numpy(norm.cdf(((u / (1 - u)).log() - mean) / std).copy())
    empirical = (t[None] / T <= y[:, None]).double().mean(1)
    assert (empirical - exact).abs().max() < 0.005


def test_refusals():
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        Diffusion(prediction="flow", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="flow_shift"):
        Diffusion(prediction="flow", flow_shift=0.0)
    d = Diffusion(prediction="flow")
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="min_snr_gamma 0"):
        d.loss(flow_model, x, torch.zeros(2, 1), min_snr_gamma=5.0)
    for bad in ("ddim", "ddpm", "dpmpp_2m"):
        with pytest.raises(ValueError, match="flow model"):
            d.sample(flow_model, x, torch.zeros(2, 1), sampler=bad)
    with pytest.raises(ValueError, match="eta"):
        d.sample(flow_model, x, torch.zeros(2, 1), eta=0.5)
    with pytest.raises(ValueError, match="for flow models"):
        Diffusion(prediction="v").sample(flow_model, x, torch.zeros(2, 1), sampler="euler")
    assert d.check_sampler(None) == "euler" and Diffusion().check_sampler(None) == "ddim"


def test_convert_inverts_the_noising():
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 3, 2, 4, 4, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])
    d = Diffusion(prediction="flow", flow_shift=2.0)
    x_t, v = d.add_noise(x0, noise, t), d.target(x0, noise, t)
    torch.testing.assert_close(d.convert(v, x_t, t, "x0"), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.convert(v, x_t, t, "eps"), noise, rtol=1e-5, atol=1e-5)
    assert math.isclose(d.shift(0.5), 2.0 * 0.5 / 1.5)


# ----------------------------------------------------------------------------- guidance at sampling
# the guidance interval (arXiv 2404.07724), APG (arXiv 2410.02416), CFG-Zero* (arXiv 2503.18886): against today's
# CFG bitwise, forward counts, and float64 recomputations of the papers' formulas written here

GUIDED_CASES = [(p, s) for p in ("eps", "v", "x0") for s in ("ddim", "ddpm", "dpmpp_2m")] + [
    ("flow", "euler"), ("flow", "heun")]


def guided_setup(prediction, B=3, seed=20):
    """(Diffusion, model_fn, x_T, cond, uncond) for a prediction kind: toy_model / flow_model and their shapes."""
    g = torch.Generator().manual_seed(seed)
    if prediction == "flow":
        d = Diffusion(prediction="flow", flow_shift=3.0)
        return d, flow_model, torch.randn(B, 1, 4, 4, generator=g), torch.randn(B, 1, generator=g), torch.zeros(B, 1)
    d = ours("scaled_linear", prediction)
    return (d, toy_model(d), torch.randn(B, 3, 4, 4, generator=g), torch.randn(B, 3, generator=g),
            torch.randn(B, 3, generator=g))


def s_of(d, t):
    """The interval's coordinate of a model call's t (B,): sigma = t / T for flow, t / T for eps / v / x0."""
    return float(t[0]) / d.T


def cfg_today(d, model_fn, uncond, cfg, guidance_rescale=0.0, inside=lambda s: True):
    """Today's CFG (before the guidance options) as a model of its own, called with uncond=None: one batched call on
    [uncond; cond], u + cfg (c - u), rescale; where inside(s) is false the conditional model alone."""
    def guided(x, t, c):
        if not inside(s_of(d, t)):
            return model_fn(x, t, c).to(x.dtype)
        u, cc = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, c])).to(x.dtype).chunk(2)
        out = u + cfg * (cc - u)
        return rescale_cfg(out, cc, guidance_rescale) if guidance_rescale > 0 else out
    return guided


@pytest.mark.parametrize("prediction,sampler", GUIDED_CASES)
def test_interval_zero_one_is_todays_cfg_bitwise(prediction, sampler):
    d, model_fn, x_T, cond, uncond = guided_setup(prediction)
    phi = 0.0 if prediction == "flow" else 0.6
    kw = dict(steps=6, sampler=sampler)
    gen = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731 (ddpm draws noise)
    want = d.sample(cfg_today(d, model_fn, uncond, 3.0, phi), x_T, cond, generator=gen(), **kw)
    for interval in ((0.0, 1.0), None):
        got = d.sample(model_fn, x_T, cond, uncond, 3.0, phi, generator=gen(), cfg_interval=interval, **kw)
        assert torch.equal(got, want), interval


@pytest.mark.parametrize("prediction,sampler", GUIDED_CASES)
def test_interval_guides_only_the_evaluations_inside_it(prediction, sampler):
    """Outside the interval one call of batch B (the conditional model); inside one call of 2B, guided; judged at
    each evaluation by its own s (Heun's second by sigma_next). An interval without any evaluation is cfg 1."""
    d, model_fn, x_T, cond, uncond = guided_setup(prediction)
    B, calls = x_T.shape[0], []

    def counting(x, t, c):
        calls.append((x.shape[0], s_of(d, t)))
        return model_fn(x, t, c)

    kw = dict(steps=8, sampler=sampler, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    lo, hi = 0.3, 0.71  # no grid point on either edge
    got = d.sample(counting, x_T, cond, uncond, 4.0, cfg_interval=(lo, hi), **kw)
    assert len(calls) == (15 if sampler == "heun" else 8)  # Heun: two evaluations a step, the last step one
    assert all(n == (2 * B if lo <= s <= hi else B) for n, s in calls), calls
    assert 0 < sum(n == 2 * B for n, _ in calls) < len(calls)
    kw["generator"] = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    want = d.sample(cfg_today(d, model_fn, uncond, 4.0, inside=lambda s: lo <= s <= hi), x_T, cond, **kw)
    assert torch.equal(got, want)
    calls.clear()
    kw["generator"] = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    none_inside = d.sample(counting, x_T, cond, uncond, 4.0, cfg_interval=(0.0, 0.005), **kw)
    assert [n for n, _ in calls] == [B] * len(calls)
    kw["generator"] = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    assert torch.equal(none_inside, d.sample(model_fn, x_T, cond, **kw))


def x0_of(prediction, out, x, t, d):
    """float64: the x0 of a model output at (x, t) (written apart from diffusion.py's convert)."""
    if prediction == "flow":
        return x - (t / T).view(-1, 1, 1, 1) * out  # x = (1 - sigma) x0 + sigma eps, out = eps - x0
    ab = d.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    return {"eps": (x - s * out) / a, "v": a * x - s * out, "x0": out}[prediction]


def out_of(prediction, x0, x, t, d):
    """float64: an x0 at (x, t) as the output of the prediction kind (x0_of's inverse)."""
    if prediction == "flow":
        return (x - x0) / (t / T).view(-1, 1, 1, 1)
    ab = d.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    eps = (x - a * x0) / s
    return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
@pytest.mark.parametrize("eta,beta", [(0.0, -0.75), (0.5, -0.5), (1.0, 0.0)])
def test_apg_update_equals_float64_recomputation(prediction, eta, beta):
    """Four evaluations of one call on fixed tensors: D = x0_c - x0_u, running D_k + beta running_{k-1}, scaled by
    min(1, r / ||.||) per sample, split along x0_c, x0 = x0_c + (w - 1) (D_orth + eta D_par), back to the output."""
    d = Diffusion(prediction="flow") if prediction == "flow" else ours("scaled_linear", prediction)
    gen = torch.Generator().manual_seed(21)
    w, r, B, K = 4.0, 3.0, 3, 4
    x = torch.randn(K, B, 2, 4, 4, generator=gen)
    out_c = torch.randn(K, B, 2, 4, 4, generator=gen)
    out_u = out_c + torch.tensor([0.05, 0.4, 2.0]).view(1, B, 1, 1, 1) * torch.randn(K, B, 2, 4, 4, generator=gen)
    ts = [torch.tensor([900.0, 600.5, 250.0]), torch.tensor([700.0, 450.0, 120.0]),
          torch.tensor([500.0, 300.0, 60.0]), torch.tensor([300.0, 150.0, 20.0])]
    if prediction != "flow":
        ts = [t.long() for t in ts]
    g = Guidance(cfg=w, apg=eta, apg_norm=r, apg_momentum=beta)
    running, clipped = None, []
    for k in range(K):
        got = d.guide(out_c[k], out_u[k], x[k], ts[k], g)
        xd, td = x[k].double(), ts[k].double()
        x0c = x0_of(prediction, out_c[k].double(), xd, td, d)
        diff = x0c - x0_of(prediction, out_u[k].double(), xd, td, d)
        running = diff if running is None else diff + beta * running
        norm = running.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        clipped += (norm > r).flatten().tolist()
        scaled = running * torch.clamp(r / norm, max=1.0)
        par = (scaled * x0c).sum(dim=(1, 2, 3), keepdim=True) / (x0c * x0c).sum(dim=(1, 2, 3), keepdim=True) * x0c
        x0g = x0c + (w - 1) * ((scaled - par) + eta * par)
        want = out_of(prediction, x0g, xd, td, d)
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)
    assert any(clipped) and not all(clipped)  # both sides of the norm threshold are exercised


@pytest.mark.parametrize("prediction,sampler", GUIDED_CASES)
def test_apg_without_its_changes_is_cfg_and_its_momentum_is_per_call(prediction, sampler):
    """eta 1, r = inf, beta 0: x0_c + (w - 1) D is CFG (the conversions are affine in the output); the momentum
    starts afresh in every sampling call (two calls, the same result)."""
    d, model_fn, x_T, cond, uncond = guided_setup(prediction)
    kw = dict(steps=6, sampler=sampler)
    gen = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    cfg = d.sample(model_fn, x_T, cond, uncond, 3.0, generator=gen(), **kw)
    plain = d.sample(model_fn, x_T, cond, uncond, 3.0, generator=gen(), apg=1.0, apg_norm=math.inf, apg_momentum=0.0,
                     **kw)
    torch.testing.assert_close(plain, cfg, rtol=1e-4, atol=1e-4)
    first = d.sample(model_fn, x_T, cond, uncond, 3.0, generator=gen(), apg=0.0, **kw)
    assert torch.equal(first, d.sample(model_fn, x_T, cond, uncond, 3.0, generator=gen(), apg=0.0, **kw))
    assert not torch.allclose(first, cfg, atol=1e-3)


def test_cfg_zero_star_scale_equals_float64_recomputation():
    """s* = <v_c, v_u> / ||v_u||^2 per sample, v = s* v_u + w (v_c - s* v_u) (arXiv 2503.18886 sec. 4.1)."""
    d, gen, w = Diffusion(prediction="flow"), torch.Generator().manual_seed(22), 5.0
    v_c = torch.randn(3, 2, 4, 4, generator=gen)
    v_u = torch.tensor([0.5, 1.0, -2.0]).view(3, 1, 1, 1) * v_c + 0.3 * torch.randn(3, 2, 4, 4, generator=gen)
    got = d.guide(v_c, v_u, torch.zeros_like(v_c), torch.full((3,), 500.0), Guidance(cfg=w, cfg_zero_star=True))
    c, u = v_c.double(), v_u.double()
    s_star = (c * u).sum(dim=(1, 2, 3), keepdim=True) / (u * u).sum(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(got.double(), s_star * u + w * (c - s_star * u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_cfg_zero_star_sampling_zeroes_the_first_step(sampler):
    """A loop written here in float64 guidance: the first step has velocity 0 and calls no model, every later
    evaluation is the optimised-scale CFG; at cfg 1 the conditional sampler (nothing zeroed)."""
    d, model_fn, x_T, cond, uncond = guided_setup("flow")
    w, steps, seen = 4.0, 6, []

    def recording(x, t, c):
        seen.append(float(t[0]) / T)
        return model_fn(x, t, c)

    got = d.sample(recording, x_T, cond, uncond, w, steps=steps, sampler=sampler, cfg_zero_star=True)
    sigmas = d.flow_sigmas(steps).tolist()
    assert min(abs(s - sigmas[0]) for s in seen) > 1e-3  # sigma = 1 is never evaluated

    def velocity(x, sigma):
        t = torch.full((x.shape[0],), T * sigma, dtype=torch.float32)
        u, c = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).double().chunk(2)
        s_star = (c * u).sum(dim=(1, 2, 3), keepdim=True) / (u * u).sum(dim=(1, 2, 3), keepdim=True)
        return (s_star * u + w * (c - s_star * u)).float()

    x = x_T
    for sigma, sigma_next in list(zip(sigmas[:-1], sigmas[1:]))[1:]:  # step 0: x stays
        v = velocity(x, sigma)
        x_next = x + (sigma_next - sigma) * v
        if sampler == "heun" and sigma_next > 0:
            x_next = x + (sigma_next - sigma) * 0.5 * (v + velocity(x_next, sigma_next))
        x = x_next
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    at_one = d.sample(model_fn, x_T, cond, uncond, 1.0, steps=steps, sampler=sampler, cfg_zero_star=True)
    assert torch.equal(at_one, d.sample(model_fn, x_T, cond, steps=steps, sampler=sampler))


def test_guidance_methods_at_cfg_one_are_the_conditional_model():
    for prediction, sampler in (("v", "ddim"), ("flow", "euler")):
        d, model_fn, x_T, cond, uncond = guided_setup(prediction)
        calls = []
        def counting(x, t, c):
            calls.append(x.shape[0])
            return model_fn(x, t, c)
        want = d.sample(model_fn, x_T, cond, steps=5, sampler=sampler)
        for kw in (dict(apg=0.0), dict(cfg_interval=(0.2, 0.9)), dict(cfg_zero_star=prediction == "flow"), {}):
            assert torch.equal(d.sample(counting, x_T, cond, uncond, 1.0, steps=5, sampler=sampler, **kw), want)
        assert set(calls) == {x_T.shape[0]}  # no unconditional forward at all


def test_guidance_refusals():
    """Every bad setting raises ValueError before the model is called."""
    def never(x, t, c):
        raise AssertionError("the model was called")
    flow, v = Diffusion(prediction="flow"), ours()
    x, c = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1)
    bad = [(flow, dict(apg=0.0, cfg_zero_star=True), "choose one"), (v, dict(apg=0.0), "guidance_rescale"),
           (v, dict(cfg_zero_star=True), "flow models"), (flow, dict(cfg_interval=(0.6, 0.2)), "LO <= HI"),
           (flow, dict(cfg_interval=(-0.1, 0.5)), "LO <= HI"), (flow, dict(cfg_interval=(0.2, 1.5)), "LO <= HI"),
           (flow, dict(cfg_interval=(0.2,)), "LO <= HI"), (flow, dict(apg=0.0, apg_norm=0.0), "apg_norm"),
           (flow, dict(apg=0.0, apg_norm=-1.0), "apg_norm"), (flow, dict(apg=-0.5), "apg"),
           (flow, dict(apg=math.nan), "apg"), (flow, dict(apg=0.0, apg_momentum=math.inf), "apg_momentum")]
    for d, kw, match in bad:
        phi = 0.5 if d is v else 0.0
        with pytest.raises(ValueError, match=match):
            d.sample(never, x, c, torch.zeros(2, 1), 3.0, phi, steps=3, **kw)
    for kw in (dict(steps=1), dict(steps=10, t_start=1)):  # SDEdit from t 1 of 1000: one of the 10 steps left
        with pytest.raises(ValueError, match="with 1 step\\(s\\) to run the sample would be its start"):
            flow.sample(never, x, c, torch.zeros(2, 1), 3.0, cfg_zero_star=True, **kw)
    with pytest.raises(ValueError, match="flow models"):
        check_guidance(cfg_zero_star=True, prediction="eps")
    check_guidance(cfg_zero_star=True)  # the kind not known yet: checked again with it
    check_guidance(cfg_interval=(0.0, 1.0), apg=0.0)  # the interval combines with APG, and with CFG-Zero*
    check_guidance(cfg_interval=(0.3, 0.3), cfg_zero_star=True, guidance_rescale=0.7, prediction="flow")
    assert parse_cfg_interval("") is None and parse_cfg_interval(" 0.2, 0.8 ") == (0.2, 0.8)
    for text in ("0.2", "0.2,0.5,0.8", "a,b", "0.2;0.8"):
        with pytest.raises(ValueError, match="LO,HI"):
            parse_cfg_interval(text)


#################################################################################
#        Training levers: each term against a float64 recomputation            #
#################################################################################


def lever_batch(B=4, seed=21):
    """A hand-built flow batch: x0, noise (B, 2, 4, 4), cond (B, 1), t (flow, float), and U(0, 1) draws."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, B, 2, 4, 4, generator=g)
    return dict(x0=x0, noise=noise, cond=torch.randn(B, 1, generator=g), u=torch.rand(B, generator=g),
                t=torch.tensor([1.0, 250.5, 731.2, 1000.0, 90.0, 500.0][:B]))


def lever_model(x, t, cond, hidden=(), output=True):
    """flow_model with hidden "block outputs" (B, 8, 4): block b's is (b + 1) x's values plus t / T."""
    states = {b: x.reshape(x.shape[0], 8, 4) * (b + 1) + (t / T).view(-1, 1, 1) for b in hidden}
    if not output:
        return states
    return (flow_model(x, t, cond), states) if hidden else flow_model(x, t, cond)


def fm_reference(k, t=None, noise=None):
    """Float64: the flow input x_sigma, the target eps - x0 and the model's prediction (run in float32 as in the
    loss) for batch k."""
    t = k["t"] if t is None else t
    x0, eps = k["x0"].double(), (k["noise"] if noise is None else noise).double()
    s = (t.double() / T).view(-1, 1, 1, 1)
    x_in = (1 - s) * x0 + s * eps
    return x_in, eps - x0, flow_model(x_in.float(), t, k["cond"]).double()


def test_derangement_is_a_permutation_without_fixed_points_and_uniform_over_the_others():
    g = torch.Generator().manual_seed(5)
    for B in range(2, 9):
        for _ in range(20):
            neg = derangement(torch.rand(B, generator=g))
            assert sorted(neg.tolist()) == list(range(B)) and all(neg[i] != i for i in range(B))
    counts = torch.bincount(torch.stack([derangement(torch.rand(4, generator=g))[0] for _ in range(6000)]), minlength=4)
    assert counts[0] == 0 and ((counts[1:] / 6000 - 1 / 3).abs() < 0.025).all(), counts  # neg[0]: 1, 2, 3 alike


@pytest.mark.parametrize("lam", [0.05, 0.5])
def test_contrastive_flow_matching_equals_float64_recomputation(lam):
    """arXiv 2506.05350's objective: mean_i [ ||v_i - (eps_i - x0_i)||^2 - lambda ||v_i - (eps_j - x0_j)||^2 ] with
    j the successor of i in the cyclic order of the draws u (a derangement); the per-sample values and the terms'
    "cfm" are the unweighted errors."""
    d, k = Diffusion(prediction="flow"), lever_batch()
    loss, per_sample, _, terms = d.loss(lever_model, k["x0"], k["cond"], t=k["t"], noise=k["noise"],
                                        levers=Levers(cfm_weight=lam), cfm_u=k["u"])
    _, target, pred = fm_reference(k)
    order = sorted(range(4), key=lambda i: float(k["u"][i]))
    neg = {order[n]: order[(n + 1) % 4] for n in range(4)}
    fm = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    away = torch.stack([((pred[i] - target[neg[i]]) ** 2).mean() for i in range(4)])
    torch.testing.assert_close(per_sample.double(), fm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["cfm"].double(), away.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), fm.mean() - lam * away.mean(), rtol=1e-5, atol=1e-6)
    assert set(terms) == {"cfm"} and not terms["cfm"].requires_grad


def test_dispersive_loss_equals_float64_recomputation():
    """arXiv 2506.09027's InfoNCE-L2 form as the authors' code: z flattened per sample (D values), d_ij = ||z_i -
    z_j||^2 / D, log (1 / B^2) sum over every (i, j) of exp(-d_ij / tau); in float32 whatever z's dtype."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 3, 4, generator=g) * torch.tensor([0.2, 1.0, 0.5, 2.0, 0.1]).view(-1, 1, 1)
    for zz in (z, z.bfloat16()):
        zd = zz.double().flatten(1)
        dist = ((zd[:, None] - zd[None]) ** 2).sum(-1) / zd.shape[1]                      # (5, 5)
        for tau in (1.0, 0.5):
            ref = torch.log(torch.exp(-dist / tau).mean())
            got = dispersive_loss(zz, temperature=tau)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    twins = torch.cat([z[:1], z[:1], z[1:]]).requires_grad_()  # two equal samples: a finite gradient
    dispersive_loss(twins).backward()
    assert torch.isfinite(twins.grad).all()
    d, k = Diffusion(prediction="flow"), lever_batch()  # in the loss: one block's output, times the weight
    loss, per_sample, _, terms = d.loss(lever_model, k["x0"], k["cond"], t=k["t"], noise=k["noise"],
                                        levers=Levers(disp_weight=0.25, disp_block=1))
    x_in, _, _ = fm_reference(k)
    states = lever_model(x_in.float(), k["t"], k["cond"], hidden=(1,), output=False)
    torch.testing.assert_close(terms["disp"], dispersive_loss(states[1]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, per_sample.mean() + 0.25 * terms["disp"], rtol=1e-6, atol=1e-7)


def test_sra_loss_equals_float64_recomputation_and_the_teacher_sees_an_earlier_t():
    """arXiv 2505.02831 as the authors' loss.py: smooth-L1 (beta 0.05) of head(student block) to the EMA teacher's
    block, the teacher called without gradients on the same noise and caption at earlier_t; mean over elements."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 3, 8, 4, generator=g) * 0.1  # differences on both sides of beta
    diff = (a.double() - b.double()).abs()
    ref = torch.where(diff < 0.05, 0.5 * diff ** 2 / 0.05, diff - 0.5 * 0.05).mean()
    assert ((diff < 0.05).any() and (diff > 0.05).any())
    torch.testing.assert_close(sra_loss(a, b).double(), ref, rtol=1e-6, atol=1e-8)
    d, k = Diffusion(prediction="flow"), lever_batch()
    seen = {}
    def teacher(x, t, cond, **kw):
        seen.update(x=x, t=t, cond=cond, kw=kw, grad=torch.is_grad_enabled())
        return {b: s - 0.5 for b, s in lever_model(x, t, cond, **kw).items()}  # "the EMA": another function
    head = lambda z: 1.5 * z
    levers = Levers(sra_weight=0.7, sra_block=0, sra_target_block=2, sra_gap=0.3, teacher=teacher, head=head)
    loss, per_sample, _, terms = d.loss(lever_model, k["x0"], k["cond"], t=k["t"], noise=k["noise"], levers=levers,
                                        sra_u=k["u"])
    t_ref = (k["t"].double() - 0.3 * T * k["u"].double()).clamp(min=0)
    x_in, _, _ = fm_reference(k)
    x_teacher, _, _ = fm_reference(k, t=t_ref)
    torch.testing.assert_close(seen["t"].double(), t_ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(seen["x"].double(), x_teacher, rtol=1e-5, atol=1e-6)
    assert seen["kw"] == dict(hidden=(2,), output=False) and not seen["grad"] and seen["cond"] is k["cond"]
    student = 1.5 * lever_model(x_in.float(), k["t"], k["cond"], hidden=(0,), output=False)[0].double()
    aim = lever_model(x_teacher.float(), t_ref.float(), k["cond"], hidden=(2,), output=False)[2].double() - 0.5
    diff = (student - aim).abs()
    ref = torch.where(diff < 0.05, 0.5 * diff ** 2 / 0.05, diff - 0.025).mean()
    torch.testing.assert_close(terms["sra"].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), per_sample.double().mean() + 0.7 * ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction", ["flow", "v", "eps"])
def test_sra_teacher_time_is_earlier_by_up_to_the_gap_and_clamped_at_0(prediction):
    """t - gap * u * T, clamped at 0 (sigma units for flow; rounded to a step for the others): never later than t,
    never more than gap * T earlier, 0 where that would go below."""
    d = Diffusion(prediction=prediction)
    g = torch.Generator().manual_seed(8)
    t = d.draw_t(4000, g)
    u = torch.rand(4000, generator=g)
    for gap in (0.05, 0.2, 1.0):
        early = d.earlier_t(t, u, gap)
        ref = (t.double() - gap * u.double() * T).clamp(min=0)
        assert early.dtype == t.dtype
        if prediction == "flow":
            torch.testing.assert_close(early.double(), ref, rtol=0, atol=1e-3)
        else:
            assert (early.double() - ref).abs().max() <= 0.5 + 1e-4
        assert (early <= t).all() and (early >= 0).all() and (early.double() >= t.double() - gap * T - 0.5).all()
        assert (early[t.double() < gap * T * u.double() - 0.5] == 0).all() and (early == 0).any()


def test_levers_off_compute_and_draw_nothing():
    """Levers with every weight 0: the model is called as without levers (no `hidden`), the loss and per-sample
    values are bitwise those without, no term, and the generator gives no extra draw."""
    d, k = Diffusion(prediction="flow"), lever_batch()
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    plain = d.loss(flow_model, k["x0"], k["cond"], generator=g1, noise_offset=0.1)
    off = d.loss(flow_model, k["x0"], k["cond"], generator=g2, noise_offset=0.1, levers=Levers(sra_gap=0.5))
    assert len(plain) == 3 and off[3] == {}
    assert all(torch.equal(a, b) for a, b in zip(plain, off[:3]))
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_lever_draws_come_from_the_generator_after_todays():
    d, k = Diffusion(prediction="flow"), lever_batch()
    levers = Levers(cfm_weight=0.3, sra_weight=0.5, teacher=lever_model, head=lambda z: z)
    drawn = d.loss(lever_model, k["x0"], k["cond"], generator=torch.Generator().manual_seed(10), levers=levers)
    g = torch.Generator().manual_seed(10)
    t = T * (1 - torch.rand(4, generator=g))
    noise = torch.randn(4, 2, 4, 4, generator=g)
    cfm_u, sra_u = torch.rand(4, generator=g), torch.rand(4, generator=g)
    given = d.loss(lever_model, k["x0"], k["cond"], t=t, noise=noise, levers=levers, cfm_u=cfm_u, sra_u=sra_u)
    assert torch.equal(drawn[0], given[0]) and all(torch.equal(drawn[3][n], given[3][n]) for n in ("cfm", "sra"))
