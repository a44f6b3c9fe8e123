"""DDPM chain: closed forms vs numpy recursions and Bayes' rule, Monte Carlo, the VP limit."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sde_diffusion import DDPM, VP

X64_RTOL = [(True, 1e-10), (False, 2e-4)]  # (jax_enable_x64, relative tolerance)


def _schedules():
    """(name, constructor, betas computed independently in float64 numpy)."""
    rng = np.random.default_rng(0)
    random = rng.uniform(1e-3, 0.5, size=20)
    T, vp = 100, VP()
    i = np.arange(1, T + 1)
    vp_betas = vp.beta_min / T + (i - 1) / (T - 1) * (vp.beta_max - vp.beta_min) / T
    return [
        ("random", lambda: DDPM(random), random),
        ("linear", lambda: DDPM.linear(1000), np.linspace(1e-4, 0.02, 1000)),
        ("from_vp", lambda: DDPM.from_vp(vp, T), vp_betas),
    ]


SCHEDULES = _schedules()
SCHEDULE_IDS = [name for name, _, _ in SCHEDULES]


@pytest.mark.parametrize("x64, rtol", X64_RTOL)
@pytest.mark.parametrize("name, make, betas", SCHEDULES, ids=SCHEDULE_IDS)
def test_marginal_composes_one_step_kernels(name, make, betas, x64, rtol):
    x0 = np.array([-1.5, 0.3, 2.0])
    with jax.enable_x64(x64):
        ddpm = make()
        T = ddpm.num_steps
        assert T == len(betas)
        np.testing.assert_allclose(ddpm.betas, betas, rtol=rtol)
        a, b = jax.vmap(ddpm.transition)(jnp.arange(1, T + 1))
        np.testing.assert_allclose(a, np.sqrt(1 - betas), rtol=rtol)
        np.testing.assert_allclose(b, betas, rtol=rtol)
        marg = eqx.filter_jit(jax.vmap(lambda i: ddpm.marginal(i, x0)))(jnp.arange(T + 1))
        alpha_bar = ddpm.alpha_bar(jnp.arange(T + 1))
        marg, alpha_bar = jax.tree.map(np.asarray, (marg, alpha_bar))  # leave x64 behind

    m, v = [x0], [0.0]  # x_0 = x0 exactly
    for beta in betas:
        m.append(np.sqrt(1 - beta) * m[-1])
        v.append((1 - beta) * v[-1] + beta)
    m, v = np.array(m), np.array(v)
    np.testing.assert_allclose(marg.loc, m, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(marg.scale**2, v, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(alpha_bar, np.cumprod(np.r_[1.0, 1 - betas]), rtol=rtol)
    assert alpha_bar[0] == 1.0 and marg.scale[0] == 0.0


def test_sample_chain_matches_marginal():
    ddpm, n, every = DDPM.from_vp(VP(), 100), 20_000, 10
    x0 = jnp.tile(jnp.array([-2.0, 0.5, 3.0]), (n, 1))
    x0 = x0 + jax.random.normal(jax.random.key(1), x0.shape)  # distinct data points
    states = eqx.filter_jit(ddpm.sample_chain)(jax.random.key(0), x0, every)
    assert states.shape == (ddpm.num_steps // every + 1, n, 3)
    np.testing.assert_array_equal(states[0], x0)
    for k in range(1, states.shape[0]):
        q = ddpm.marginal(k * every, x0)
        z = np.asarray((states[k] - q.loc) / q.scale, np.float64)  # N(0, 1) if q is right
        np.testing.assert_array_less(np.abs(z.mean(0)), 5 / np.sqrt(n))
        np.testing.assert_array_less(np.abs(z.var(0) - 1), 5 * np.sqrt(2 / (n - 1)))


def test_sample_chain_store_every_subsamples_the_same_path():
    ddpm, x0, key = DDPM.linear(100), jnp.arange(6.0).reshape(3, 2), jax.random.key(3)
    full = ddpm.sample_chain(key, x0)
    assert full.shape == (101, 3, 2)
    every = ddpm.sample_chain(key, x0, store_every=30)  # steps 0, 30, 60, 90
    assert every.shape == (4, 3, 2)
    np.testing.assert_allclose(every, full[::30], rtol=1e-6)


@pytest.mark.parametrize("x64, rtol", X64_RTOL)
@pytest.mark.parametrize("name, make, betas", SCHEDULES, ids=SCHEDULE_IDS)
def test_posterior_is_bayes_rule(name, make, betas, x64, rtol):
    T = len(betas)
    rng = np.random.default_rng(1)
    x0, x_i = rng.normal(size=4), rng.normal(size=4)
    alpha_bar = np.cumprod(np.r_[1.0, 1 - betas])
    post = jax.jit(jax.vmap(lambda ddpm, i: ddpm.posterior(i, x_i, x0), in_axes=(None, 0)))
    steps = np.array([1, 2, T // 2, T - 1, T])
    with jax.enable_x64(x64):
        got = jax.tree.map(np.asarray, post(make(), jnp.asarray(steps)))
    for k, i in enumerate(steps):
        # prior q(x_{i−1} | x0) and likelihood q(x_i | x_{i−1}) read as a Gaussian in x_{i−1}
        m_p, v_p = np.sqrt(alpha_bar[i - 1]) * x0, 1 - alpha_bar[i - 1]
        m_l, v_l = x_i / np.sqrt(1 - betas[i - 1]), betas[i - 1] / (1 - betas[i - 1])
        # precision-weighted combination, written with variances so that v_p = 0 (i = 1) works
        mean, var = (m_p * v_l + m_l * v_p) / (v_p + v_l), v_p * v_l / (v_p + v_l)
        np.testing.assert_allclose(got.loc[k], mean, rtol=rtol, atol=rtol * 1e-2)
        np.testing.assert_allclose(got.scale[k] ** 2, var, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(got.loc[0], x0, rtol=rtol)  # i = 1: the point mass at x0
    assert got.scale[0] == 0


def test_from_vp_converges_to_vp_at_first_order():
    vp, Ts = VP(), np.array([25, 100, 1000, 10_000])  # T ≤ β_max = 20 would give β_T ≥ 1
    t = np.linspace(0.1, 1.0, 10)
    errors = []
    for T in Ts:
        ddpm = DDPM.from_vp(vp, int(T))
        i = np.round(t * T).astype(int)
        np.testing.assert_allclose(ddpm.time(jnp.asarray(i)), i / T, rtol=1e-6)
        gap = np.sqrt(ddpm.alpha_bar(jnp.asarray(i))) - vp.alpha(ddpm.time(jnp.asarray(i)))
        errors.append(np.max(np.abs(gap)))
    errors = np.array(errors)
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < 1e-3, errors
    slope = np.polyfit(np.log(Ts), np.log(errors), 1)[0]
    assert -1.3 <= slope <= -0.7, (slope, errors)


@pytest.mark.parametrize(
    "betas",
    [[0.0, 0.1], [0.1, 1.0], [-0.1, 0.2], [np.nan, 0.1], [0.1, np.inf], [[0.1, 0.2]], 0.1, []],
    ids=["zero", "one", "negative", "nan", "inf", "2d", "scalar", "empty"],
)
def test_bad_betas(betas):
    with pytest.raises(ValueError, match="betas"):
        DDPM(np.asarray(betas))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="beta_max"):
        DDPM.from_vp(VP(), 10)  # β_10 = 20/10 = 2
    with pytest.raises(ValueError, match="T must be"):
        DDPM.linear(0)
    with pytest.raises(ValueError, match="store_every"):
        DDPM.linear(5).sample_chain(jax.random.key(0), jnp.zeros((2, 1)), store_every=0)


def test_bad_step_indices():
    ddpm = DDPM.linear(10)
    for method, bad in [
        (ddpm.alpha_bar, [-1, 11]),
        (ddpm.time, [-1, 11]),
        (ddpm.transition, [0, 11]),
        (lambda i: ddpm.marginal(i, 0.0), [-1, 11]),
        (lambda i: ddpm.posterior(i, 0.0, 0.0), [0, 11]),
    ]:
        for i in bad:
            with pytest.raises(ValueError, match="step index"):
                method(i)
            with pytest.raises(RuntimeError, match="step index"):  # traced: eqx.error_if
                jax.block_until_ready(eqx.filter_jit(method)(jnp.asarray(i)))
    with pytest.raises(TypeError, match="integer"):
        ddpm.alpha_bar(1.0)
    assert ddpm.alpha_bar(0) == 1.0 and ddpm.time(10) == 1.0
