from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd


@pytest.mark.parametrize("sde", [sd.VP(), sd.EDM(), sd.RectifiedFlow(), sd.CosineVP()], ids=lambda s: type(s).__name__)
def test_every_prediction_gives_the_oracle_score_and_denoiser(x64, sde):
    data = sd.GaussianMixture.ring(jax.random.key(0))
    t = 0.3 * sde.t1 + 0.7 * sde.t0
    x = jnp.array([0.4, -0.9])
    score, denoised = data.marginal_score(sde, t, x), data.denoiser(sde, t, x)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    eps = (x - alpha * denoised) / sigma
    dalpha, dsigma = jax.grad(sde.alpha)(t), jax.grad(sde.sigma)(t)
    predictions = [
        sd.Score(lambda t_, x_: data.marginal_score(sde, t_, x_)),
        sd.Denoiser(lambda t_, x_: data.denoiser(sde, t_, x_)),
        sd.Noise(lambda t_, x_: (x_ - sde.alpha(t_) * data.denoiser(sde, t_, x_)) / sde.sigma(t_)),
        sd.Velocity(lambda t_, x_: dalpha * data.denoiser(sde, t_, x_) + dsigma * eps),
    ]
    for p in predictions:
        np.testing.assert_allclose(p.score(sde, t, x), score, rtol=1e-8, err_msg=type(p).__name__)
        np.testing.assert_allclose(p.denoiser(sde, t, x), denoised, rtol=1e-8, err_msg=type(p).__name__)


def test_rectified_flow_velocity_is_noise_minus_data(x64):
    sde = sd.RectifiedFlow()
    x0, eps, t = jnp.array([1.0, -2.0]), jnp.array([0.3, 0.5]), 0.4
    x = (1 - t) * x0 + t * eps
    np.testing.assert_allclose(sd.Velocity(lambda t_, x_: eps - x0).denoiser(sde, t, x), x0, rtol=1e-12)


def test_generic_sde_needs_a_score():
    sde = sd.SDE(lambda t, x: -x, lambda t, x: 1.0, prior=sd.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="ScheduleSDE"):
        sd.Denoiser(lambda t, x: x).score(sde, 0.5, jnp.ones(2))
    with pytest.raises(TypeError, match="prediction"):
        sd.sample(sde, 3.0, jax.random.key(0), (2, 1), method=sd.ReverseDiffusion(2))
