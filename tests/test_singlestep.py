from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd
from solver_problems import counting, smooth_problem
from test_multistep import empirical_order, problem  # noqa: F401  (shared float64 fixture)


@pytest.mark.parametrize(
    "make",
    [lambda n: sd.DPMSolverPP2S(n), lambda n: sd.EDMHeun(n), lambda n: sd.EDMHeun(n, grid=sd.UniformLogSNR())],
    ids=["DPM++2S", "EDMHeun-karras", "EDMHeun-logsnr"],
)
def test_second_order(problem, make):  # noqa: F811
    sde, model, kwargs, reference = problem
    errors = []
    for n in (16, 32, 64):
        x, info = sd.sample(sde, model, jax.random.key(3), method=make(n), **kwargs)
        assert info.nfe == 2 * n
        errors.append(float(jnp.sqrt(jnp.mean((x - reference) ** 2))))
    slope = -np.log(errors[-1] / errors[-2]) / np.log(2)
    assert errors[0] > errors[1] > errors[2] and 1.75 < slope < 2.4, (errors, slope)


@pytest.mark.parametrize("method", [sd.DPMSolverPP2S(5, grid=sd.KarrasSigma()), sd.EDMHeun(5), sd.EDMHeun(5, churn=10.0)])
@pytest.mark.parametrize("t0", [0.002, 0.0])
def test_nfe_is_counted(method, t0):
    """2 evaluations a step; a last step to σ = 0 costs one."""
    sde = sd.EDM(t0=t0)
    data = sd.GaussianMixture.ring(jax.random.key(0))
    calls = []
    model = sd.Denoiser(counting(partial(data.denoiser, sde), calls))
    x, info = sd.sample(sde, model, jax.random.key(1), (16, 2), method=method)
    jax.effects_barrier()
    assert info.nfe == len(calls) == 2 * method.num_steps - (t0 == 0.0)
    assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.slow  # churn's code path runs in the default suite (NFE count, every schedule)
def test_edm_churn_converges_in_distribution(x64):
    """Algorithm 2 with churn is stochastic: SW2 to the target falls to the noise floor."""
    sde = sd.EDM()
    data = sd.GaussianMixture.ring(jax.random.key(0))
    model = sd.Denoiser(partial(data.denoiser, sde))
    n = 4000
    keys = jax.random.split(jax.random.key(5), 5)
    start = data.marginal_sample(sde, sde.t1, keys[0], n)
    target = lambda k: data.marginal_sample(sde, sde.t0, k, n)
    fresh = target(keys[1])
    floor = [float(sd.sliced_wasserstein(target(k), fresh, keys[4])) for k in jax.random.split(keys[2], 6)]
    errors = []
    for steps in (2, 6, 60):
        method = sd.EDMHeun(steps, churn=40.0, s_tmin=0.05, s_tmax=50.0)
        x, _ = sd.sample(sde, model, keys[3], method=method, x_start=start)
        errors.append(float(sd.sliced_wasserstein(x, fresh, keys[4])))
    assert errors[0] > errors[1] > np.mean(floor) + 5 * np.std(floor) > errors[2], (errors, floor)


def test_churn_is_off_outside_its_noise_range(x64):
    """s_tmin > σ_max: no noise is added, so churn has no effect."""
    sde = sd.EDM()
    data = sd.GaussianMixture.ring(jax.random.key(0))
    model = sd.Denoiser(partial(data.denoiser, sde))
    start = data.marginal_sample(sde, sde.t1, jax.random.key(1), 64)
    run = lambda m: sd.sample(sde, model, jax.random.key(2), method=m, x_start=start)[0]
    np.testing.assert_allclose(run(sd.EDMHeun(6, churn=30.0, s_tmin=100.0)), run(sd.EDMHeun(6)), rtol=1e-12)


def test_invalid():
    with pytest.raises(ValueError, match="churn"):
        sd.EDMHeun(4, churn=-1.0)


class MidpointInSigmaHat(sd.AbstractTwoStage):
    """A user-defined method through the public extension point: the explicit midpoint rule for
    ``dx̂/dσ̂ = (x̂ − D)/σ̂`` (``x̂ = x/α``, ``σ̂ = σ/α``), second order."""

    num_steps: int = eqx.field(static=True)
    grid: sd.AbstractTimeGrid = sd.UniformLogSNR()

    def state_scale(self, c, i):
        return c.alpha[i]

    def stages(self, c, i):
        s0, s1 = jnp.exp(-c.lam[i]), jnp.exp(-c.lam[i + 1])
        h, s_mid = s1 - s0, 0.5 * (s0 + s1)
        t_mid = c.sde.t_from_log_snr(-2 * jnp.log(s_mid))
        w = sd.Evaluation.combination
        first = sd.Evaluation(c.ts[i], w(x=1 + h / (2 * s0), d=-h / (2 * s0)), False, scale=c.alpha[i])
        second = sd.Evaluation(t_mid, w(x=1.0, u=h / s_mid, d=-h / s_mid), True, scale=c.sde.alpha(t_mid))
        return first, second

    def to_data(self, c, i):
        raise NotImplementedError  # the test ends at σ > 0


def test_user_defined_two_stage_method_is_second_order(problem):  # noqa: F811
    sde, model, kwargs, reference = problem
    errors = []
    for n in (16, 32):
        x, info = sd.sample(sde, model, jax.random.key(3), method=MidpointInSigmaHat(n), **kwargs)
        assert info.nfe == 2 * n
        errors.append(float(jnp.sqrt(jnp.mean((x - reference) ** 2))))
    slope = np.log(errors[0] / errors[1]) / np.log(2)
    assert 1.75 < slope < 2.4, (errors, slope)
