import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd

PRESETS = [sd.VP(), sd.SubVP(), sd.VE(), sd.EDM(), sd.CosineVP(), sd.RectifiedFlow()]


def _interior(sde, n=7):
    return np.linspace(sde.t0, sde.t1, n + 2)[1:-1]


def paper_coefficients(sde, t):
    """f(t) and g²(t) as printed in the papers that introduced each schedule."""
    if isinstance(sde, (sd.VP, sd.SubVP)):
        beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
        if isinstance(sde, sd.SubVP):  # Song et al. 2021, eq. (29)
            integral = sde.beta_min * t + 0.5 * t**2 * (sde.beta_max - sde.beta_min)
            return -0.5 * beta, beta * (1 - math.exp(-2 * integral))
        return -0.5 * beta, beta  # eq. (11)
    if isinstance(sde, sd.VE):  # eq. (30): g = σ_min (σ_max/σ_min)^t sqrt(2 log(σ_max/σ_min))
        ratio = sde.sigma_max / sde.sigma_min
        return 0.0, (sde.sigma_min * ratio**t) ** 2 * 2 * math.log(ratio)
    if isinstance(sde, sd.EDM):  # Karras et al. 2022: g = sqrt(2 σ' σ), σ = t
        return 0.0, 2 * t
    if isinstance(sde, sd.CosineVP):  # β(t) = -2 d/dt log α = π/(1+s) tan(π/2 (t+s)/(1+s))
        beta = math.pi / (1 + sde.s) * math.tan(0.5 * math.pi * (t + sde.s) / (1 + sde.s))
        return -0.5 * beta, beta
    if isinstance(sde, sd.RectifiedFlow):  # α = 1 - t, σ = t
        return -1 / (1 - t), 2 * t / (1 - t)
    raise AssertionError(sde)


@pytest.mark.parametrize("sde", PRESETS, ids=lambda s: type(s).__name__)
def test_autodiff_coefficients_match_papers(x64, sde):
    for t in _interior(sde):
        f, g2 = paper_coefficients(sde, float(t))
        np.testing.assert_allclose(sde.f(t), f, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sde.g2(t), g2, rtol=1e-10, atol=1e-12)
        x = jnp.array([0.3, -1.2])
        np.testing.assert_allclose(sde.drift(t, x), f * x, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sde.diffusion(t, x), math.sqrt(g2), rtol=1e-10)


@pytest.mark.parametrize("sde", PRESETS, ids=lambda s: type(s).__name__)
def test_closed_form_marginal_equals_moment_ode(x64, sde):
    """x_t = α x0 + σ ε solves the moment ODEs of dx = f x dt + g dw from N(α(t0) x0, σ(t0)² I)."""
    d = 2
    eye = jnp.eye(d)
    as_linear = sd.LinearSDE(lambda t: sde.f(t) * eye, lambda t: sde.g(t) * eye, sde.t0, sde.t1)
    x0 = jnp.array([0.7, -1.3])
    alpha0, var0 = sde.transition(sde.t0)
    for t in _interior(sde, 4):
        mean, cov = as_linear.moments(t, alpha0 * x0, var0 * eye)
        closed = sde.marginal(t, x0)
        np.testing.assert_allclose(mean, closed.loc, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(cov, closed.scale**2 * eye, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("sde", PRESETS, ids=lambda s: type(s).__name__)
def test_simulate_matches_marginal(x64, sde):
    """Monte Carlo of forward paths (SRA1, fine steps) against N(α x0, σ²) within sampling error."""
    n = 4000
    x0 = jnp.array([0.7, -1.3])
    key_init, key_paths = jax.random.split(jax.random.key(0))
    start = sde.marginal(sde.t0, x0).sample(key_init, (n, 2))
    # interior times: near t1 RectifiedFlow's f = −1/(1 − t) is too stiff for a uniform grid
    ts = np.array([sde.t0, sde.t0 + 0.3 * (sde.t1 - sde.t0), sde.t0 + 0.8 * (sde.t1 - sde.t0)])
    xs = sd.simulate(sde, start, key_paths, ts, solver=diffrax.SRA1(), dt0=(ts[-1] - ts[0]) / 400)
    for t, x in zip(ts[1:], xs[1:]):
        marginal = sde.marginal(t, x0)
        sd_ = float(marginal.scale)
        np.testing.assert_array_less(np.abs(x.mean(0) - marginal.loc), 5 * sd_ / math.sqrt(n))
        np.testing.assert_array_less(np.abs(x.var(0) / sd_**2 - 1), 5 * math.sqrt(2 / n) + 0.01)


@pytest.mark.parametrize("sde", PRESETS + [sd.ScheduleSDE(lambda t: jnp.exp(-t), lambda t: jnp.sqrt(-jnp.expm1(-2 * t)), 0.0, 3.0)], ids=lambda s: type(s).__name__)
def test_log_snr_inverse(x64, sde):
    ts = jnp.asarray(_interior(sde, 11))
    lam = jax.vmap(sde.log_snr)(ts)
    assert jnp.all(jnp.diff(lam) < 0)
    np.testing.assert_allclose(jax.vmap(sde.t_from_log_snr)(lam), ts, rtol=1e-9, atol=1e-12)
    # closed forms where given, the generic bisection otherwise: both invert the same λ
    generic = jax.vmap(lambda l: sd.AbstractScheduleSDE.t_from_log_snr(sde, l))(lam)
    np.testing.assert_allclose(generic, ts, rtol=1e-9, atol=1e-12)


def test_custom_schedule_matches_preset(x64):
    vp = sd.VP()
    custom = sd.ScheduleSDE(vp.alpha, vp.sigma)
    for t in [0.1, 0.5, 0.9]:
        np.testing.assert_allclose(custom.f(t), vp.f(t), rtol=1e-12)
        np.testing.assert_allclose(custom.g2(t), vp.g2(t), rtol=1e-10)
        np.testing.assert_allclose(custom.log_snr(t), vp.log_snr(t), rtol=1e-10)


def test_coefficients_finite_at_both_ends(x64):
    for sde in PRESETS:
        for t in (sde.t0, sde.t1):
            assert np.isfinite(sde.f(t)) and np.isfinite(sde.g2(t)), (type(sde).__name__, t)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: sd.VP(beta_min=-0.1), "beta_min"),
        (lambda: sd.VP(beta_max=0.0), "beta_max"),
        (lambda: sd.VE(sigma_min=0.0), "sigma_min"),
        (lambda: sd.VE(sigma_min=5.0, sigma_max=1.0), "sigma_max > sigma_min"),
        (lambda: sd.EDM(t0=-1.0), "σ_min"),
        (lambda: sd.CosineVP(t1=1.0), "t1 < 1"),
        (lambda: sd.RectifiedFlow(t1=1.0), "t1 < 1"),
        (lambda: sd.VP(t0=1.0, t1=0.5), "t0 < t1"),
        (lambda: sd.ScheduleSDE(lambda t: 1.0 + 0 * t, lambda t: -1.0 - t), "σ"),
        (lambda: sd.ScheduleSDE(lambda t: 1.0 + 0 * t, lambda t: 1.0 + jnp.sin(8 * t)), "decrease"),
        (lambda: sd.ScheduleSDE(lambda t: 1.0 - t, lambda t: t, 0.0, 1.0), "α"),
        (lambda: sd.ScheduleSDE(1.0, lambda t: t), "callables"),
    ],
)
def test_invalid_schedules_fail_at_construction(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_time_outside_domain_fails():
    with pytest.raises(RuntimeError, match="t0, t1"):
        sd.VP().marginal(1.5, jnp.zeros(2))
    with pytest.raises(RuntimeError, match="t0, t1"):
        jax.jit(lambda t: sd.VP().transition(t))(jnp.nan)


def test_prior_is_terminal_kernel_without_signal():
    for sde in PRESETS:
        np.testing.assert_allclose(sde.prior.scale, sde.sigma(sde.t1), rtol=1e-6)
