"""Sampling with exact scores: the reverse SDE and the PF ODE must give back the data law."""

from functools import partial

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import sde_diffusion as sd


def noise_floor(draw, key, n, reps=8):
    """Mean + 5 std of SW2 between two independent exact samples of size n: any sampler whose
    law equals the target stays below it with overwhelming probability."""
    values = []
    for k in jax.random.split(key, reps):
        k1, k2, k3 = jax.random.split(k, 3)
        values.append(float(sd.sliced_wasserstein(draw(k1, n), draw(k2, n), k3)))
    return np.mean(values) + 5 * np.std(values)


@pytest.mark.parametrize(
    "method, sde",
    [
        pytest.param(sd.ReverseDiffusion(1000), sd.VP(), id="reverse_sde-VP"),
        pytest.param(sd.ReverseDiffusion(1000), sd.EDM(t0=0.0), id="reverse_sde-EDM", marks=pytest.mark.slow),
        pytest.param(sd.ProbabilityFlow(rtol=1e-6, atol=1e-6), sd.VP(), id="pf_ode-VP", marks=pytest.mark.slow),
        pytest.param(sd.ProbabilityFlow(rtol=1e-6, atol=1e-6), sd.EDM(t0=0.0), id="pf_ode-EDM"),
    ],
)
def test_exact_score_recovers_data(x64, sde, method):
    n = 4000
    data = sd.GaussianMixture.ring(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 4)
    start = data.marginal_sample(sde, sde.t1, keys[0], n)
    x, info = sd.sample(sde, partial(data.marginal_score, sde), keys[1], method=method, x_start=start)
    threshold = noise_floor(data.sample, keys[2], n)
    assert float(sd.sliced_wasserstein(x, data.sample(keys[3], n), keys[2])) < threshold
    assert info.nfe > 0


@pytest.mark.slow
def test_exact_score_recovers_data_linear_sde_with_matrix_noise(x64):
    """Critically-damped Langevin: 2-D state (x, v), one noise channel, exact mixture score."""
    cld = sd.CriticallyDampedLangevin(n=1)
    # data: x ~ 2-component mixture, v ~ N(0, γM) independent: a mixture on (x, v)
    vv = cld.velocity_std**2
    data = sd.GaussianMixture(
        jnp.array([0.4, 0.6]), jnp.array([[-1.0, 0.0], [1.0, 0.0]]), jnp.array([[0.05, vv], [0.1, vv]])
    )
    n = 1000
    keys = jax.random.split(jax.random.key(2), 4)
    start = data.marginal_sample(cld, cld.t1, keys[0], n)
    score = partial(data.marginal_score, cld)
    threshold = noise_floor(data.sample, keys[2], n)
    for method in [sd.ReverseDiffusion(200), sd.ProbabilityFlow(rtol=1e-5, atol=1e-5)]:
        x, _ = sd.sample(cld, score, keys[1], method=method, x_start=start)
        assert float(sd.sliced_wasserstein(x, data.sample(keys[3], n), keys[2])) < threshold


MU, S, M0, V0 = 0.3, 0.5, 0.0, 0.25**2


def gbm_score(t, x):
    """log x_t ~ N(m_t, v_t), m_t = m0 + (μ − s²/2) t, v_t = v0 + s² t: p(x) = N(log x; m, v)/x."""
    m, v = M0 + (MU - S**2 / 2) * t, V0 + S**2 * t
    return -(jnp.log(x) - m) / (v * x) - 1 / x


class WithoutDivergence(sd.SDE):
    """The same GBM, wrongly declared state-independent: the reverse dynamics drop ∇·(LLᵀ)."""

    def diffusion_depends_on_x(self, x):
        return False


@pytest.mark.parametrize(
    "method", [sd.ReverseDiffusion(1000), sd.ProbabilityFlow(rtol=1e-7, atol=1e-7)], ids=["reverse_sde", "pf_ode"]
)
def test_state_dependent_diffusion_geometric_brownian_motion(x64, method):
    """dx = μx dt + s x dw: started from the exact log-normal p_1, the reverse dynamics with the
    exact score recover p_0 (KS test on log x at level 1e-3); without ∇·(LLᵀ) they do not."""
    n = 4000
    key_start, key_run = jax.random.split(jax.random.key(3))
    log_x1 = M0 + (MU - S**2 / 2) + jnp.sqrt(V0 + S**2) * jax.random.normal(key_start, (n, 1))
    critical = scipy.stats.kstwo.ppf(1 - 1e-3, n)
    target = scipy.stats.norm(M0, np.sqrt(V0)).cdf
    statistics = {}
    for cls in (sd.SDE, WithoutDivergence):
        gbm = cls(lambda t, x: MU * x, lambda t, x: S * x)
        x, _ = sd.sample(gbm, gbm_score, key_run, method=method, x_start=jnp.exp(log_x1))
        statistics[cls] = scipy.stats.kstest(np.log(np.asarray(x[:, 0])), target).statistic
    assert statistics[sd.SDE] < critical
    assert statistics[WithoutDivergence] > 5 * critical


def counting(score, calls):
    def counted(t, x):
        jax.debug.callback(lambda: calls.append(1))  # once per evaluation on the batch
        return score(t, x)

    return counted


@pytest.mark.parametrize(
    "method",
    [
        sd.ReverseDiffusion(17),
        sd.ReverseDiffusion(9, solver=diffrax.Heun()),
        sd.ReverseDiffusion(6, solver=diffrax.ShARK()),
        sd.ReverseDiffusion(6, solver=diffrax.SRA1()),
        sd.ReverseDiffusion(6, solver=diffrax.SEA()),
        sd.ReverseDiffusion(6, solver=diffrax.ItoMilstein()),
        sd.ReverseDiffusion(6, solver=diffrax.EulerHeun()),
        sd.ProbabilityFlow(diffrax.Euler(), num_steps=13),
        sd.ProbabilityFlow(diffrax.Heun(), num_steps=13),
        sd.ProbabilityFlow(diffrax.Tsit5(), num_steps=5),
        sd.ProbabilityFlow(diffrax.Heun(), rtol=1e-3, atol=1e-3),
        sd.ProbabilityFlow(diffrax.Bosh3(), rtol=1e-4, atol=1e-4),
        sd.ProbabilityFlow(diffrax.Tsit5(), rtol=1e-6, atol=1e-6),
        sd.ProbabilityFlow(diffrax.Dopri5(), rtol=1e-5, atol=1e-5),
        sd.ProbabilityFlow(diffrax.Dopri8(), rtol=1e-7, atol=1e-7),
    ],
    ids=lambda m: f"{type(m).__name__}-{type(m.solver).__name__}-{m.num_steps}",
)
def test_reported_nfe_equals_counted_calls(method):
    sde = sd.VP()
    data = sd.GaussianMixture.ring(jax.random.key(0))
    calls = []
    _, info = sd.sample(sde, counting(partial(data.marginal_score, sde), calls), jax.random.key(1), (64, 2), method=method)
    jax.effects_barrier()
    assert info.nfe == len(calls)
    assert info.num_steps == info.num_accepted_steps + info.num_rejected_steps


def test_sample_errors():
    sde = sd.VP()
    score = lambda t, x: -x
    key = jax.random.key(0)
    method = sd.ReverseDiffusion(4)
    with pytest.raises(ValueError, match="t_end < t_start"):
        sd.sample(sde, score, key, (3, 2), method=method, t_start=0.5, t_end=0.6)
    with pytest.raises(ValueError, match="t_end < t_start"):
        sd.sample(sde, score, key, (3, 2), method=method, t_start=1.5)
    with pytest.raises(ValueError, match="shape"):
        sd.sample(sde, score, key, method=method)
    with pytest.raises(ValueError, match="x_start has shape"):
        sd.sample(sde, score, key, (4, 2), method=method, x_start=jnp.zeros((3, 2)))
    with pytest.raises(RuntimeError, match="non-finite"):
        sd.sample(sde, score, key, method=method, x_start=jnp.full((3, 2), jnp.inf))
    with pytest.raises(ValueError, match="no prior"):
        sd.sample(sd.SDE(lambda t, x: -x, lambda t, x: 1.0), score, key, (3, 2), method=method)
    with pytest.raises(ValueError, match="num_steps"):
        sd.ReverseDiffusion(0)
    with pytest.raises(ValueError, match="count evaluations"):
        sd.ProbabilityFlow(diffrax.Kvaerno5())


def test_partial_time_range_matches_marginal(x64):
    """From the exact p_{0.8} to t = 0.3 under VP: samples follow the exact p_{0.3}."""
    sde = sd.VP()
    n = 4000
    data = sd.GaussianMixture.ring(jax.random.key(4))
    keys = jax.random.split(jax.random.key(5), 4)
    start = data.marginal_sample(sde, 0.8, keys[0], n)
    x, _ = sd.sample(
        sde, partial(data.marginal_score, sde), keys[1], method=sd.ProbabilityFlow(), x_start=start, t_start=0.8, t_end=0.3
    )
    draw = lambda k, m: data.marginal_sample(sde, 0.3, k, m)
    assert float(sd.sliced_wasserstein(x, draw(keys[3], n), keys[2])) < noise_floor(draw, keys[2], n)


def test_each_configuration_compiles_once_and_vmaps():
    traces = []

    def score(t, x):
        traces.append(1)  # runs only while tracing
        return -x

    sde, model = sd.VP(), sd.Score(score)
    for method in (sd.DPMSolverPP(5, order=3), sd.ReverseDiffusion(5), sd.PredictorCorrector(5)):
        sd.sample(sde, model, jax.random.key(0), (8, 2), method=method, t_end=1e-3)
        traced = len(traces)
        sd.sample(sde, model, jax.random.key(1), (8, 2), method=method, t_end=1e-3)
        assert len(traces) == traced, type(method).__name__
    # a method is a pure function of its inputs: it vmaps over keys
    x = jnp.zeros((8, 2))
    method = sd.DDIM(5, eta=1.0)
    many = jax.vmap(lambda k: method(sde, model, k, x, 1.0, 1e-3)[0])(jax.random.split(jax.random.key(2), 3))
    assert many.shape == (3, 8, 2) and not np.allclose(many[0], many[1])


def test_adaptive_reverse_sde_counts_the_longest_solve_and_recovers_data(x64):
    """Per-sample PID steps on a Brownian tree (ShARK, additive noise): samples run in lockstep, so
    the batch's model calls are those of its longest solve; the law is the data's."""
    sde = sd.VP()
    data = sd.GaussianMixture.ring(jax.random.key(0))
    calls = []
    n = 4000
    keys = jax.random.split(jax.random.key(8), 4)
    start = data.marginal_sample(sde, sde.t1, keys[0], n)
    method = sd.ReverseDiffusion(None, solver=diffrax.ShARK(), rtol=1e-1, atol=1e-1)
    x, info = sd.sample(sde, counting(partial(data.marginal_score, sde), calls), keys[1], x_start=start, method=method)
    jax.effects_barrier()
    assert info.nfe == len(calls) and info.num_rejected_steps > 0
    assert float(sd.sliced_wasserstein(x, data.sample(keys[3], n), keys[2])) < noise_floor(data.sample, keys[2], n)
    with pytest.raises(ValueError, match="num_steps"):
        sd.ReverseDiffusion(0)
