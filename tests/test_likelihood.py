"""Log-likelihoods through the PF ODE against exact densities (Gaussian mixtures, log-normal GBM)."""

import functools
import json
import math
from functools import partial

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from solver_problems import counting

import sde_diffusion as sd
from sde_diffusion import cli
from sde_diffusion.likelihood_cli import LikelihoodCommand, build_trace, likelihood_command


@functools.cache
def _ring_problem(sde_name):
    """``(sde, ring, exact score)``, made once (in float64) per SDE: tests that call
    ``log_likelihood`` with the same score object and batch shape share one compilation."""
    sde = {"VP": sd.VP(), "EDM": sd.EDM()}[sde_name]
    ring = sd.GaussianMixture.ring(jax.random.key(0))
    return sde, ring, partial(ring.marginal_score, sde)


@pytest.fixture
def vp_ring(x64):
    return _ring_problem("VP")


def _oracle_ode_error(data, sde, x, info):
    """|log p_{t_start}(x) − [log p_{t1}(z) + Δ]|: the ODE's own error, with the exact density at t1
    in place of the SDE's prior (which differs from p_{t1} by the signal left at t1)."""
    at_t1 = jax.vmap(lambda z: data.marginal_log_prob(sde, sde.t1, z))(info.latent)
    truth = jax.vmap(lambda y: data.marginal_log_prob(sde, info.t_start, y))(x)
    return np.abs(np.asarray(at_t1 + info.delta_log_p - truth))


N = 8  # examples per oracle call (one shape: one compilation per SDE)


@pytest.mark.parametrize("sde_name", ["VP", "EDM"])
def test_exact_trace_gives_the_oracle_log_density(x64, sde_name):
    sde, ring, score = _ring_problem(sde_name)
    x = ring.sample(jax.random.key(1), N)
    log_p, info = sd.log_likelihood(sde, score, x, rtol=1e-8, atol=1e-8)
    assert log_p.shape == (N,) and info.latent.shape == x.shape
    assert np.max(_oracle_ode_error(ring, sde, x, info)) / ring.dim < 1e-6
    np.testing.assert_allclose(log_p, info.prior_log_prob + info.delta_log_p, rtol=1e-14)
    np.testing.assert_allclose(info.prior_log_prob, jax.vmap(sde.prior.log_prob)(info.latent), rtol=1e-12)
    # t_start: VP starts at 1e-5 (σ(t0) = 0), EDM at its t0 = σ_min
    assert info.t_start == (1e-5 if sde_name == "VP" else sde.t0)
    # with the SDE's N(0, σ(t1)²) prior, log p_0 itself within the prior's and t_start's small bias
    np.testing.assert_allclose(log_p, jax.vmap(ring.log_prob)(x), atol=3e-3)


def test_tolerance_controls_the_error_and_the_cost(vp_ring):
    sde, ring, score = vp_ring
    x = ring.sample(jax.random.key(2), N)
    errors, nfes = [], []
    for tol in (1e-4, 1e-7):
        _, info = sd.log_likelihood(sde, score, x, rtol=tol, atol=tol)
        errors.append(np.max(_oracle_ode_error(ring, sde, x, info)))
        nfes.append(int(np.max(info.nfe)))
    assert errors[1] < 1e-2 * errors[0] and nfes[1] > nfes[0]
    # fixed steps: exactly num_steps Tsit5 steps (6 evaluations each, + 1 for first-same-as-last)
    _, info = sd.log_likelihood(sde, score, x, num_steps=40)
    np.testing.assert_array_equal(info.nfe, 6 * 40 + 1)
    assert np.all(info.num_rejected_steps == 0) and np.max(_oracle_ode_error(ring, sde, x, info)) < 1e-3


def test_hutchinson_is_unbiased_and_its_spread_falls_as_one_over_root_probes(vp_ring):
    sde, ring, score = vp_ring
    # a point between two components, where the Hessian of log p_t has off-diagonal terms
    point = 0.9 * jnp.array([math.cos(math.pi / 8), math.sin(math.pi / 8)])
    exact, _ = sd.log_likelihood(sde, score, jnp.broadcast_to(point, (N, 2)), rtol=1e-7, atol=1e-7)
    x = jnp.broadcast_to(point, (400, 2))  # one point, 400 independent probe draws
    spread = []
    for k in (1, 16):
        estimates, info = sd.log_likelihood(sde, score, x, jax.random.key(k), trace=sd.Hutchinson(k), rtol=1e-7, atol=1e-7)
        assert info.jvps_per_evaluation == k
        mean, std = float(np.mean(estimates)), float(np.std(estimates))
        assert abs(mean - float(exact[0])) < 4 * std / math.sqrt(400), k
        spread.append(std)
    assert spread[0] > 0.05 and spread[0] / spread[1] == pytest.approx(4.0, rel=0.2)


@pytest.mark.parametrize("probe", [sd.RademacherProbe(), sd.GaussianProbe()], ids=lambda p: type(p).__name__)
def test_probes_have_zero_mean_and_identity_covariance(x64, probe):
    eps = probe.sample(jax.random.key(0), (100_000, 3), jnp.float64)
    np.testing.assert_allclose(np.mean(eps, axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(np.cov(eps.T), np.eye(3), atol=0.02)
    if isinstance(probe, sd.RademacherProbe):
        assert set(np.unique(eps).tolist()) == {-1.0, 1.0}


class LogNormal(eqx.Module):
    """``log x ~ N(m, v)`` elementwise (the prior of geometric Brownian motion)."""

    m: float
    v: float

    def sample(self, key, shape):
        return jnp.exp(self.m + math.sqrt(self.v) * jax.random.normal(key, shape))

    def log_prob(self, x):
        return jnp.sum(jax.scipy.stats.norm.logpdf(jnp.log(x), self.m, math.sqrt(self.v)) - jnp.log(x))


def test_geometric_brownian_motion_gives_the_log_normal_density(x64):
    """State-dependent noise: the PF ODE's ½∇·(LLᵀ) term and its divergence both enter."""
    mu, s, m0, v0 = 0.3, 0.5, 0.0, 0.25**2
    prior = LogNormal(m0 + mu - s**2 / 2, v0 + s**2)
    gbm = sd.SDE(lambda t, x: mu * x, lambda t, x: s * x, prior=prior)

    def score(t, x):
        m, v = m0 + (mu - s**2 / 2) * t, v0 + s**2 * t
        return -(jnp.log(x) - m) / (v * x) - 1 / x

    x = jnp.exp(m0 + math.sqrt(v0) * jax.random.normal(jax.random.key(5), (32, 1)))
    log_p, info = sd.log_likelihood(gbm, score, x, rtol=1e-9, atol=1e-9)
    expected = scipy.stats.lognorm(s=math.sqrt(v0), scale=math.exp(m0)).logpdf(np.asarray(x[:, 0]))
    assert info.t_start == 0.0
    np.testing.assert_allclose(log_p, expected, atol=1e-6)
    # the flow keeps the z-score of log x: (log z − m1)/√v1 = (log x − m0)/√v0
    np.testing.assert_allclose((jnp.log(info.latent) - prior.m) / math.sqrt(prior.v), (jnp.log(x) - m0) / math.sqrt(v0), atol=1e-7)


def test_nfe_counts_every_evaluation_and_each_example_is_its_own_solve(vp_ring):
    sde, ring, exact_score = vp_ring
    calls = []
    score = counting(exact_score, calls)
    x = ring.sample(jax.random.key(6), 3)
    log_p, info = sd.log_likelihood(sde, score, x, rtol=1e-6, atol=1e-6)
    # lockstep vmapped solves: one batched evaluation per evaluation of the longest solve
    assert len(calls) == int(np.max(info.nfe)) > 0
    assert len(set(np.asarray(info.nfe).tolist())) > 1  # ... which differ per example
    np.testing.assert_array_equal(info.num_steps, info.num_accepted_steps + info.num_rejected_steps)
    assert np.all(info.num_rejected_steps > 0) and info.jvps_per_evaluation == 2
    calls.clear()
    alone, alone_info = sd.log_likelihood(sde, score, x[1:2], rtol=1e-6, atol=1e-6)
    assert len(calls) == int(alone_info.nfe[0]) == int(info.nfe[1])
    np.testing.assert_allclose(alone[0], log_p[1], rtol=1e-12)


def test_invalid_input_fails_clearly(vp_ring):
    sde, _, score = vp_ring
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="batch of shape"):
        sd.log_likelihood(sde, score, jnp.zeros(()))
    with pytest.raises(ValueError, match="shape"):
        sd.log_likelihood(sde, score, jnp.zeros((2, 3)))  # the oracle is 2-D
    with pytest.raises(RuntimeError, match="non-finite"):
        sd.log_likelihood(sde, score, x.at[0, 1].set(jnp.nan))
    for t_start in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match="t_start"):
            sd.log_likelihood(sde, score, x, t_start=t_start)
    with pytest.raises(ValueError, match="σ\\(t_start\\) = 0"):
        sd.log_likelihood(sde, score, x, t_start=0.0)
    with pytest.raises(ValueError, match="key"):
        sd.log_likelihood(sde, score, x, trace=sd.Hutchinson(2))
    with pytest.raises(TypeError, match="trace"):
        sd.log_likelihood(sde, score, x, trace="exact")
    with pytest.raises(ValueError, match="num_probes"):
        sd.Hutchinson(num_probes=0)
    with pytest.raises(TypeError, match="probe"):
        sd.Hutchinson(probe="gaussian")
    with pytest.raises(ValueError, match="rtol"):
        sd.log_likelihood(sde, score, x, rtol=0.0)
    with pytest.raises(ValueError, match="not both"):
        sd.log_likelihood(sde, score, x, num_steps=4, dt0=0.1)
    with pytest.raises(ValueError, match="cannot count"):
        sd.log_likelihood(sde, score, x, solver=diffrax.ImplicitEuler())


def test_bits_per_dim_of_uniform_levels_is_log2_levels(x64):
    """Independent uniform over K levels: dequantized, the exact density is uniform on the bins,
    (KΔ)^{−D}, Jensen's bound is tight, and bpd = log₂ K."""
    levels, d = 17, 64
    x = jax.random.randint(jax.random.key(7), (50, d), 0, levels) / 8.0 - 1.0  # like sd.digits()
    y = sd.dequantize(x, jax.random.key(8), levels)
    width = 2.0 / (levels - 1)
    log_p = jnp.full(50, -d * math.log(levels * width))
    np.testing.assert_allclose(sd.bits_per_dim(log_p, d, levels), math.log2(levels), rtol=1e-12)
    # dequantized points fill the bin centred on each level, uniformly
    offset = np.asarray(y - x).ravel() / width
    assert np.all((offset >= -0.5) & (offset < 0.5))
    assert scipy.stats.kstest(offset + 0.5, "uniform").pvalue > 1e-3


def test_bits_per_dim_of_a_piecewise_constant_density_is_the_discrete_entropy_rate(x64):
    """A categorical law P over levels, dequantized: p(y) = P(k)/Δ on bin k, so the bound is exact
    for every draw of u: bpd = −log₂ P(x) / D."""
    levels, d = 5, 3
    probs = jnp.array([0.1, 0.2, 0.4, 0.2, 0.1])
    k = jax.random.categorical(jax.random.key(9), jnp.log(probs), shape=(200, d))
    low, high = 0.0, 4.0
    width = (high - low) / (levels - 1)
    y = sd.dequantize(low + k * width, jax.random.key(10), levels, low, high)
    bin_of_y = jnp.round((y - low) / width).astype(int)
    np.testing.assert_array_equal(bin_of_y, k)
    log_p = jnp.sum(jnp.log(probs[bin_of_y] / width), axis=-1)
    expected = -jnp.sum(jnp.log2(probs[k]), axis=-1) / d
    np.testing.assert_allclose(sd.bits_per_dim(log_p, d, levels, low, high), expected, rtol=1e-12)
    # continuous data: −log p / (D log 2)
    np.testing.assert_allclose(sd.bits_per_dim(-2.0, 2), 1 / math.log(2), rtol=1e-12)


def test_dequantize_and_bits_per_dim_reject_bad_input():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_levels"):
        sd.dequantize(jnp.zeros(3), key, 1)
    with pytest.raises(ValueError, match="low < high"):
        sd.dequantize(jnp.zeros(3), key, 17, low=1.0, high=-1.0)
    with pytest.raises(RuntimeError, match="must lie in"):
        sd.dequantize(jnp.array([0.0, 1.5]), key, 17)
    with pytest.raises(RuntimeError, match="non-finite"):
        sd.dequantize(jnp.array([0.0, jnp.inf]), key, 17)
    with pytest.raises(ValueError, match="num_dims"):
        sd.bits_per_dim(jnp.zeros(3), 0)


def test_likelihood_command_on_a_trained_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cli.train_command(
        cli.TrainCommand(
            out=run, data="gaussian_mixture", n_data=512, model=cli.ModelSpec(width=16, depth=1),
            train=sd.TrainConfig(steps=5, batch_size=64, warmup_steps=1), progress=False,
        )
    )  # fmt: skip
    result = likelihood_command(LikelihoodCommand(run=run, n=8, rtol=1e-3, atol=1e-3))
    printed = capsys.readouterr().out
    assert result["data"] == "gaussian_mixture" and result["n"] == 8 and result["levels"] is None
    assert math.isfinite(result["mean_log_p"]) and f"{result['mean_log_p']:.3f}" in printed
    # continuous 2-D data: bits/dim is −log p / (2 log 2)
    assert result["bits_per_dim"] == pytest.approx(-result["mean_log_p"] / (2 * math.log(2)), rel=1e-6)
    # the same held-out points (seed 1) and model, by the library directly
    sde, model = cli.load_run(run)
    x = sd.gaussian_mixture(8, seed=1)
    log_p, _ = sd.log_likelihood(sde, model, x, rtol=1e-3, atol=1e-3)
    assert result["mean_log_p"] == pytest.approx(float(jnp.mean(log_p)), rel=1e-5)
    # a .npy file of discrete data on 3 levels (8 rows: the compiled solve is reused): dequantized
    path = tmp_path / "grid.npy"
    np.save(path, np.array([[-1.0, 0.0], [1.0, 1.0], [0.0, -1.0], [0.0, 0.0]] * 2, np.float32))
    result = likelihood_command(LikelihoodCommand(run=run, data=path, levels=3, rtol=1e-3, atol=1e-3))
    assert result["n"] == 8 and result["levels"] == 3 and math.isfinite(result["bits_per_dim"])
    # the discrete bound: −(log p(y) + D log Δ)/(D log 2) with Δ = 1
    assert result["bits_per_dim"] == pytest.approx(-result["mean_log_p"] / (2 * math.log(2)), rel=1e-6)
    assert json.loads(json.dumps(result)) == result
    with pytest.raises(ValueError, match="n must be"):
        likelihood_command(LikelihoodCommand(run=run, n=0))
    command = LikelihoodCommand(run=run, trace="hutchinson", probes=3, probe="gaussian")
    assert build_trace(command) == sd.Hutchinson(3, sd.GaussianProbe())


@pytest.mark.slow
def test_critically_damped_langevin_gives_the_oracle_log_density(x64):
    """A linear SDE with matrix noise on (x, v): the mixture on the joint state is exact under it, so
    log p_0(x, v) of the data (v ~ N(0, γM) independent) is known. Slow: every score evaluation
    solves the moment ODEs."""
    cld = sd.CriticallyDampedLangevin(n=2)
    ring = sd.GaussianMixture.ring(jax.random.key(0))
    velocity = jnp.full_like(ring.variances, cld.velocity_std**2)
    means = jnp.concatenate([ring.means, jnp.zeros_like(ring.means)], axis=1)
    data = sd.GaussianMixture(ring.weights, means, jnp.concatenate([ring.variances, velocity], axis=1))
    x = data.sample(jax.random.key(1), 8)
    log_p, info = sd.log_likelihood(cld, partial(data.marginal_score, cld), x, rtol=1e-8, atol=1e-8)
    assert info.t_start == cld.t0 and info.jvps_per_evaluation == 4
    assert np.max(_oracle_ode_error(data, cld, x, info)) / 4 < 1e-6
    # the prior N(0, Q(t1)) is close to p_t1 here: log p_0 itself to 1e-4
    np.testing.assert_allclose(log_p, jax.vmap(data.log_prob)(x), atol=1e-4)
