"""Rectified flow in diffusion.py against diffusers' FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler
(the oracle), float64 recomputations, and the closed-form flow of Gaussian data."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from scipy.stats import norm

from diffusion import Diffusion

T = 1000


def flow_model(x, t, cond):
    """A deterministic stand-in for a trained flow model: nonlinear in x, depending on t (float, (B,)) and cond."""
    c = cond[0] if isinstance(cond, (tuple, list)) else cond
    s = (t / T).to(x.dtype).view(-1, 1, 1, 1)
    return 0.8 * x - 0.3 * torch.tanh(2 * x + c.view(*c.shape, 1, 1)) + 0.2 * torch.sin(3 * x + s) * s


def diffusers_loop(sched, model_fn, x, cond, uncond=None, cfg=1.0):
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
def test_sampler_matches_diffusers_loop(sampler, cls, shift, steps, cfg):
    g = torch.Generator().manual_seed(1)
    x_T, cond, uncond = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 1, generator=g), torch.zeros(3, 1)
    sched = cls(num_train_timesteps=T, shift=shift)
    sched.set_timesteps(steps)
    ref = diffusers_loop(sched, flow_model, x_T, cond, None if cfg is None else uncond, cfg or 1.0)
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
def test_loss_equals_float64_recomputation(shift, offset, rho):
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
