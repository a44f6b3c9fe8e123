import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd


def test_simulate_matrix_noise_covariance(x64):
    """OU with full noise: dx = −x dt + L dw has Cov(x_t) = (1 − e^{−2t})/2 · LLᵀ from x = 0."""
    lmat = jnp.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.2]])
    ou = sd.SDE(lambda t, x: -x, lambda t, x: lmat)
    n = 8000
    xs = sd.simulate(ou, jnp.zeros((n, 2)), jax.random.key(1), [0.0, 1.0], solver=diffrax.ShARK(), dt0=0.02)
    exact = (1 - np.exp(-2)) / 2 * np.asarray(lmat @ lmat.T)
    # standard error of a sample covariance entry: sqrt((Σ_ii Σ_jj + Σ_ij²)/n)
    se = np.sqrt((np.outer(np.diag(exact), np.diag(exact)) + exact**2) / n)
    assert np.all(np.abs(np.cov(np.asarray(xs[-1]).T) - exact) < 5 * se)


def test_simulate_geometric_brownian_motion(x64):
    """dx = μx dt + s x dw: log x_t ~ N((μ − s²/2) t, s² t) from x0 = 1 (state-dependent noise)."""
    mu, s, n = 0.3, 0.5, 8000
    gbm = sd.SDE(lambda t, x: mu * x, lambda t, x: s * x)
    xs = sd.simulate(gbm, jnp.ones((n, 1)), jax.random.key(2), [0.0, 1.0], solver=diffrax.ItoMilstein(), dt0=1e-3)
    logx = np.log(np.asarray(xs[-1, :, 0]))
    assert abs(logx.mean() - (mu - s**2 / 2)) < 5 * s / np.sqrt(n)
    assert abs(logx.var() / s**2 - 1) < 5 * np.sqrt(2 / n)


def test_simulate_adaptive_matches_fixed_in_distribution(x64):
    ou = sd.SDE(lambda t, x: -x, lambda t, x: 1.0)
    n = 4000
    xs = sd.simulate(
        ou, jnp.zeros((n, 2)), jax.random.key(3), [0.0, 0.5, 1.0], solver=diffrax.Heun(), dt0=0.05,
        stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3),
    )
    for t, x in zip([0.5, 1.0], xs[1:]):
        var = (1 - np.exp(-2 * t)) / 2
        assert np.all(np.abs(np.asarray(x).var(0) / var - 1) < 5 * np.sqrt(2 / n))


def test_simulate_input_errors():
    ou = sd.SDE(lambda t, x: -x, lambda t, x: 1.0)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="increasing"):
        sd.simulate(ou, jnp.zeros((2, 1)), key, [0.5, 0.1])
    with pytest.raises(ValueError, match=r"\[t0, t1\]"):
        sd.simulate(ou, jnp.zeros((2, 1)), key, [0.0, 2.0])
    with pytest.raises(ValueError, match="batch"):
        sd.simulate(ou, jnp.zeros(()), key, [0.0, 1.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        sd.simulate(ou, jnp.array([[0.0], [jnp.nan]]), key, [0.0, 1.0])
