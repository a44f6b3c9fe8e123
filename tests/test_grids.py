import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd


def test_grids_run_from_start_to_end_and_decrease(x64):
    for sde in (sd.VP(), sd.EDM(), sd.CosineVP(), sd.RectifiedFlow()):
        t_start, t_end = sde.t1, sde.t0 + 0.01 * (sde.t1 - sde.t0)
        for grid in (sd.UniformTime(), sd.QuadraticTime(), sd.UniformLogSNR(), sd.KarrasSigma()):
            ts = grid.times(sde, t_start, t_end, 9)
            assert ts.shape == (10,) and ts[0] == t_start and ts[-1] == t_end
            assert jnp.all(jnp.diff(ts) < 0), (type(sde).__name__, type(grid).__name__)


def test_grid_definitions(x64):
    sde = sd.VP()
    t_start, t_end = 1.0, 0.01
    lam = jax.vmap(sde.log_snr)(sd.UniformLogSNR().times(sde, t_start, t_end, 8))
    np.testing.assert_allclose(np.diff(lam), (sde.log_snr(t_end) - sde.log_snr(t_start)) / 8, rtol=1e-9)
    sigma_hat = jnp.exp(-0.5 * jax.vmap(sde.log_snr)(sd.KarrasSigma(rho=7.0).times(sde, t_start, t_end, 8)))
    np.testing.assert_allclose(np.diff(sigma_hat ** (1 / 7)), np.diff(sigma_hat ** (1 / 7))[0], rtol=1e-9)
    ts = sd.QuadraticTime().times(sde, t_start, t_end, 4)
    np.testing.assert_allclose(ts, t_end + (t_start - t_end) * (1 - np.arange(5) / 4) ** 2, rtol=1e-12)


def test_karras_reaches_zero_noise(x64):
    sde = sd.EDM(t0=0.0)
    ts = sd.KarrasSigma().times(sde, 80.0, 0.0, 5)
    assert ts[-1] == 0.0 and ts[-2] > 0


def test_given_times():
    grid = sd.GivenTimes([1.0, 0.5, 0.2, 0.0])
    np.testing.assert_allclose(grid.times(sd.VP(), 1.0, 0.0, 3), [1.0, 0.5, 0.2, 0.0])
    with pytest.raises(ValueError, match="steps"):
        grid.times(sd.VP(), 1.0, 0.0, 4)
    with pytest.raises(ValueError, match="t_start and t_end"):
        grid.times(sd.VP(), 1.0, 0.1, 3)
    with pytest.raises(ValueError, match="decrease"):
        sd.GivenTimes([0.0, 1.0])


def test_noise_level_grids_need_a_schedule():
    sde = sd.SDE(lambda t, x: -x, lambda t, x: 1.0)
    with pytest.raises(TypeError, match="ScheduleSDE"):
        sd.UniformLogSNR().times(sde, 1.0, 0.0, 3)
    with pytest.raises(ValueError, match="rho"):
        sd.KarrasSigma(rho=0.0)


def test_log_snr_grid_refuses_zero_noise():
    with pytest.raises(ValueError, match="σ = 0"):
        sd.UniformLogSNR().times(sd.EDM(t0=0.0), 80.0, 0.0, 4)


def test_given_times_interpolant_is_smooth_and_monotone(x64):
    grid = sd.GivenTimes([80.0, 20.0, 3.0, 0.5, 0.002])
    time = lambda u: grid.time(sd.EDM(), 80.0, 0.002, u)
    taus = jnp.linspace(0.0, 1.0, 401)
    assert jnp.all(jnp.diff(jax.vmap(time)(taus)) < 0)
    slope = jax.grad(time)
    for knot in (0.25, 0.5, 0.75):  # dt/dτ continuous across knots
        np.testing.assert_allclose(slope(knot - 1e-9), slope(knot + 1e-9), rtol=1e-6)


def test_clipping_keeps_the_map_derivative(x64):
    """Round-off clipping at the ends must not zero or halve dt/dτ."""
    sde = sd.EDM()
    for grid in (sd.UniformTime(), sd.UniformLogSNR(), sd.KarrasSigma()):
        for tau in (0.0, 1.0):
            d_time = jax.grad(lambda u: grid.time(sde, 80.0, 0.002, u))(tau)
            d_map = jax.grad(lambda u: grid.map(sde, 80.0, 0.002, u))(tau)
            np.testing.assert_allclose(d_time, d_map, rtol=1e-12)


def test_uniform_time_of_vp_is_the_vp_linspace_carried_to_another_schedule(x64):
    """On EDM (σ = t) the grid's σ are VP's σ/α at equally spaced VP times: with
    σ/α = √(e^{½(β_max − β_min)u² + β_min u} − 1), solve for the end times in closed form."""
    beta_d, beta_min = 19.9, 0.1

    def vp_time(s):
        c = np.log1p(s**2)
        return (-beta_min + np.sqrt(beta_min**2 + 2 * beta_d * c)) / beta_d

    u = np.linspace(vp_time(80.0), vp_time(0.002), 9)
    expected = np.sqrt(np.expm1(0.5 * beta_d * u**2 + beta_min * u))
    np.testing.assert_allclose(sd.UniformTimeOf(sd.VP()).times(sd.EDM(), 80.0, 0.002, 8), expected, rtol=1e-10)
    # its own schedule: plain uniform time; a σ = 0 end is reached
    np.testing.assert_allclose(sd.UniformTimeOf(sd.VP()).times(sd.VP(), 1.0, 0.0, 4), np.linspace(1, 0, 5), atol=1e-12)
    ts = sd.UniformTimeOf().times(sd.EDM(), 80.0, 0.0, 4)
    assert ts[-1] == 0 and np.all(np.diff(ts) < 0)
    with pytest.raises(TypeError, match="ScheduleSDE"):
        sd.UniformTimeOf(sd.SDE(lambda t, x: -x, lambda t, x: 1.0))
