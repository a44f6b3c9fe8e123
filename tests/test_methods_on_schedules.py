"""Every method on every schedule: fast rotation by default, the full product under -m slow."""

import itertools
from functools import partial

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd

SCHEDULES = [sd.VP(), sd.SubVP(), sd.VE(), sd.EDM(), sd.CosineVP(), sd.RectifiedFlow()]
METHODS = [
    sd.DDIM(12),
    sd.DPMSolverPP(12, order=2),
    sd.DPMSolverPP(12, order=3),
    sd.UniPC(12, order=3),
    sd.DEIS(12, order=3),
    sd.DPMSolverPP2S(6),
    sd.EDMHeun(12, grid=sd.UniformLogSNR()),
    sd.AdaptiveDPMSolverPP(rtol=1e-4, atol=1e-4),
    sd.ProbabilityFlow(diffrax.Tsit5(), grid=sd.UniformLogSNR(), rtol=1e-5, atol=1e-5),
    sd.DDIM(12, eta=1.0),
    sd.DPMSolverPP2MSDE(12),
    sd.EDMHeun(12, grid=sd.UniformLogSNR(), churn=5.0),
    sd.PredictorCorrector(12, grid=sd.UniformLogSNR()),
    sd.ReverseDiffusion(12, grid=sd.UniformLogSNR()),
]
DETERMINISTIC = 9  # the first nine


def run(x64, sde, method):
    data = sd.GaussianMixture.ring(jax.random.key(0))
    model = sd.Denoiser(partial(data.denoiser, sde))
    t_end = sde.t0 + 0.01 * (sde.t1 - sde.t0)
    start = data.marginal_sample(sde, sde.t1, jax.random.key(1), 256)
    x, info = sd.sample(sde, model, jax.random.key(2), method=method, x_start=start, t_end=t_end)
    assert np.all(np.isfinite(np.asarray(x))) and info.nfe > 0
    if METHODS.index(method) < DETERMINISTIC:
        exact = sd.ProbabilityFlow(diffrax.Dopri8(), grid=sd.UniformLogSNR(), rtol=1e-10, atol=1e-10)
        reference, _ = sd.sample(sde, model, jax.random.key(2), method=exact, x_start=start, t_end=t_end)
        # 6–12 steps on the d = 2 ring: errors are a few percent of the data scale (≈ 0.7 α(t_end))
        scale = 0.7 * float(sde.alpha(t_end))
        assert float(jnp.sqrt(jnp.mean((x - reference) ** 2))) < 0.1 * scale
    else:
        target = data.marginal_sample(sde, t_end, jax.random.key(3), 256)
        floor = float(sd.sliced_wasserstein(data.marginal_sample(sde, t_end, jax.random.key(4), 256), target, jax.random.key(5)))
        assert float(sd.sliced_wasserstein(x, target, jax.random.key(5))) < 4 * floor + 0.05 * float(sde.alpha(t_end))


@pytest.mark.parametrize(
    "sde, method", [(SCHEDULES[i % len(SCHEDULES)], m) for i, m in enumerate(METHODS)],
    ids=[f"{type(m).__name__}-{type(SCHEDULES[i % len(SCHEDULES)]).__name__}" for i, m in enumerate(METHODS)],
)
def test_each_method_on_a_schedule(x64, sde, method):
    run(x64, sde, method)


@pytest.mark.slow
@pytest.mark.parametrize("sde, method", list(itertools.product(SCHEDULES, METHODS)))
def test_every_method_on_every_schedule(x64, sde, method):
    run(x64, sde, method)
