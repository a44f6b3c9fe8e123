"""Training objectives against exact Gaussian-mixture oracles.

The excess-risk identities are checked with common random numbers: the tests replay the draws
that the losses document (``k_t, k_ε = split(key)``, ``(t, w) = times.sample(sde, k_t, B)``,
``ε = normal(k_ε, shape)``) and compute every weight and noisy state with their own formulas.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sde_diffusion as sd

DATA_KEY = jax.random.key(0)


def _perturbation(t, x):
    """A fixed smooth δ(t, x) of any dimension (score units)."""
    d = x.shape[-1]
    rotation = jnp.cos(jnp.arange(d)[:, None] * 1.3 + jnp.arange(d)[None, :] * 0.7 + 0.4)
    return jnp.sin(rotation @ x + 2.0 * t + jnp.arange(d))


class _Perturbed(eqx.Module):
    """``s*(t, x) + scale · δ(t, x)`` with the exact mixture score ``s*``."""

    data: sd.GaussianMixture
    sde: sd.AbstractSDE
    scale: jax.Array

    def __call__(self, t, x):
        return self.data.marginal_score(self.sde, t, x) + self.scale * _perturbation(t, x)


@eqx.filter_jit
def _evaluate(loss, model_fn, sde, x0, key):
    return loss(sd.Score(model_fn), sde, x0, key)


def _quadratic_parts(loss, perturbed, sde, x0, key):
    """``L(s*)``, ``(L(s*+δ) + L(s*−δ))/2 − L(s*)`` (the same-draw ``E[wλ‖δ‖²]``), ``L(s*+δ) − L(s*)``."""

    def scaled(c):
        return eqx.tree_at(lambda p: p.scale, perturbed, jnp.asarray(c, x0.dtype))

    plus, minus, zero = (float(_evaluate(loss, scaled(c), sde, x0, key)) for c in (1.0, -1.0, 0.0))
    return zero, 0.5 * (plus + minus) - zero, plus - zero


def _se(values):
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


# -- weightings written from their definitions, independently of the library ---------------------


def _g2(sde, t):
    if isinstance(sde, sd.VP):
        return sde.beta_min + t * (sde.beta_max - sde.beta_min)
    if isinstance(sde, sd.EDM):
        return 2 * t
    if isinstance(sde, sd.RectifiedFlow):
        return 2 * t / (1 - t)
    raise NotImplementedError


def _lambda(weighting, sde, t):
    """λ(t) on the squared score error, from the papers' definitions (D − x0 = σ²/α (s − s_cond))."""
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    denoiser_to_score = sigma**4 / alpha**2
    if isinstance(weighting, sd.NoiseWeighting):
        return sigma**2
    if isinstance(weighting, sd.LikelihoodWeighting):
        return _g2(sde, t)
    if isinstance(weighting, sd.EDMWeighting):
        noise, sd2 = sigma / alpha, weighting.sigma_data**2
        return (noise**2 + sd2) / (noise**2 * sd2) * denoiser_to_score
    if isinstance(weighting, sd.MinSNRWeighting):
        return jnp.minimum(alpha**2 / sigma**2, weighting.gamma) * denoiser_to_score
    raise NotImplementedError


OBJECTIVES = {  # each weighting with its natural time distribution
    "noise": sd.DenoisingScoreMatching(sd.NoiseWeighting(), sd.UniformTimes()),
    "likelihood": sd.DenoisingScoreMatching(sd.LikelihoodWeighting(), sd.LogSNRTimes()),
    "edm": sd.DenoisingScoreMatching(sd.EDMWeighting(), sd.LogNormalNoise()),
    "min_snr": sd.DenoisingScoreMatching(sd.MinSNRWeighting(), sd.UniformTimes()),
}


@pytest.mark.parametrize(
    "sde, name",
    [(sd.VP(), name) for name in OBJECTIVES]
    + [(sd.EDM(), "edm"), (sd.RectifiedFlow(), "likelihood")],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_dsm_excess_risk_and_irreducible_value(x64, sde, name):
    """With the draws replayed: L(s*+δ) − L(s*) = E[wλ‖δ‖²] (cross term within 4 SE), the quadratic
    part equals it to round-off, and L(s*) = E[wλ (d/σ² − ‖s*(x_t)‖²)] within 4 SE."""
    loss, data, n = OBJECTIVES[name], sd.GaussianMixture.ring(DATA_KEY), 8192
    x0, key = data.sample(jax.random.key(1), n), jax.random.key(2)
    zero, quadratic, excess = _quadratic_parts(loss, _Perturbed(data, sde, jnp.zeros(())), sde, x0, key)

    time_key, noise_key = jax.random.split(key)
    t, w = loss.times.sample(sde, time_key, n)
    eps = jax.random.normal(noise_key, x0.shape)
    alpha, sigma = jax.vmap(sde.alpha)(t)[:, None], jax.vmap(sde.sigma)(t)[:, None]
    x = alpha * x0 + sigma * eps
    score = jax.vmap(data.marginal_score, (None, 0, 0))(sde, t, x)
    delta = jax.vmap(_perturbation)(t, x)
    lam = w * jax.vmap(lambda t_: _lambda(loss.weighting, sde, t_))(t)
    risk = lam * jnp.sum(delta**2, -1)
    cross = 2 * lam * jnp.sum(delta * (score + eps / sigma), -1)
    np.testing.assert_allclose(quadratic, np.mean(risk), rtol=1e-8, atol=1e-10 * abs(zero))
    assert abs(excess - np.mean(risk)) < 4 * _se(cross), (excess, np.mean(risk), _se(cross))

    irreducible = lam * (x0.shape[1] / sigma[:, 0] ** 2 - jnp.sum(score**2, -1))
    per_example = lam * jnp.sum((score + eps / sigma) ** 2, -1)
    np.testing.assert_allclose(zero, np.mean(per_example), rtol=1e-9)
    assert abs(zero - np.mean(irreducible)) < 4 * _se(per_example - irreducible)


def _exact_edm_network(data, sde, sigma_data):
    """The ``F`` that makes ``EDMPreconditioned`` the exact denoiser: ``F(t, y)`` for ``y = c_in x̂``."""

    def fn(t, y):
        alpha, noise = sde.alpha(t), sde.sigma(t) / sde.alpha(t)
        norm = jnp.sqrt(noise**2 + sigma_data**2)
        x_hat = y * norm
        c_skip, c_out = sigma_data**2 / norm**2, noise * sigma_data / norm
        return (data.denoiser(sde, t, alpha * x_hat) - c_skip * x_hat) / c_out

    return fn


def test_every_prediction_gives_the_same_edm_loss_on_every_schedule(x64):
    """At the oracle each residual path (ε, score, denoiser) gives the same loss, and the EDM
    objective (EDMWeighting + LogNormalNoise) depends on σ̃ = σ/α only, so on no schedule."""
    data, sigma_data = sd.GaussianMixture.ring(DATA_KEY), 0.5
    x0, key = data.sample(jax.random.key(1), 64), jax.random.key(2)
    loss = sd.DenoisingScoreMatching(sd.EDMWeighting(sigma_data), sd.LogNormalNoise())
    values = []
    for sde in (sd.VP(), sd.EDM(), sd.RectifiedFlow()):
        models = [sd.Score(lambda t, x, sde=sde: data.marginal_score(sde, t, x))]
        if not isinstance(sde, sd.EDM):  # the paths on schedules with α ≠ 1
            models += [
                sd.Denoiser(lambda t, x, sde=sde: data.denoiser(sde, t, x)),
                sd.Noise(lambda t, x, sde=sde: (x - sde.alpha(t) * data.denoiser(sde, t, x)) / sde.sigma(t)),
                sd.EDMPreconditioned(_exact_edm_network(data, sde, sigma_data), sigma_data),
            ]
        values += [float(loss(model, sde, x0, key)) for model in models]
    np.testing.assert_allclose(values, values[0], rtol=1e-9)


def test_log_snr_times_are_an_unbiased_lower_variance_likelihood_estimator(x64):
    sde, eps, data = sd.VP(), 1e-3, sd.GaussianMixture.ring(DATA_KEY)
    start = sde.t0 + eps * (sde.t1 - sde.t0)
    oracle = sd.Score(lambda t_, x: data.marginal_score(sde, t_, x))

    @jax.jit
    def draws(key):
        t, w = sd.LogSNRTimes(eps).sample(sde, key, 100_000)
        batch_losses = {}
        for i, times in enumerate((sd.UniformTimes(eps), sd.LogSNRTimes(eps))):
            loss = sd.DenoisingScoreMatching(sd.LikelihoodWeighting(), times)

            def batch_loss(k):
                data_key, loss_key = jax.random.split(k)
                return loss(oracle, sde, data.sample(data_key, 64), loss_key)

            keys = jax.random.split(jax.random.fold_in(key, i), 512)
            batch_losses[type(times).__name__] = jax.vmap(batch_loss)(keys)
        return t, w, batch_losses

    t, w, batch_losses = jax.tree.map(np.asarray, draws(jax.random.key(3)))
    assert start <= t.min() and t.max() <= sde.t1
    # importance weights: E_p[w f(t)] = (1/T) ∫ f dt, for f = 1 and f = t
    assert abs(w.mean() - 1) < 4 * _se(w)
    assert abs((w * t).mean() - (start + sde.t1) / 2) < 4 * _se(w * t)
    # the likelihood-weighted loss (at the oracle): same mean, lower variance
    uniform, log_snr = batch_losses["UniformTimes"], batch_losses["LogSNRTimes"]
    assert abs(uniform.mean() - log_snr.mean()) < 4 * math.hypot(_se(uniform), _se(log_snr))
    assert log_snr.var() < 0.25 * uniform.var()


def _augmented(data, cld):
    """The CLD state's law at t0: x ~ data, v ~ N(0, γM I) independent, as a mixture on R^{2d}."""
    velocity_variances = jnp.full_like(data.variances, cld.velocity_std**2)
    return sd.GaussianMixture(
        data.weights,
        jnp.concatenate([data.means, jnp.zeros_like(data.means)], axis=1),
        jnp.concatenate([data.variances, velocity_variances], axis=1),
    )


def _expm(m, squarings=8, terms=18):
    """``exp(m)`` by scaling and squaring of a Taylor series (‖m/2⁸‖ ≲ 0.1 here: error ~ round-off)."""
    a, term = m / 2**squarings, jnp.eye(m.shape[0], dtype=m.dtype)
    result = term
    for k in range(1, terms):
        term = term @ a / k
        result = result + term
    for _ in range(squarings):
        result = result @ result
    return result


class _ClosedFormCLD(sd.CriticallyDampedLangevin):
    """CLD whose transition is a matrix exponential (Van Loan 1978), independent of the moment ODE:
    for constant F, L, ``exp([[F, LLᵀ], [0, −Fᵀ]] t) = [[Φ, G], [0, Φ⁻ᵀ]]`` and ``Q = G Φᵀ``."""

    def transition(self, t):
        f, l = self.drift_matrix(t), self.diffusion_matrix(t)
        d = f.shape[0]
        e = _expm(jnp.block([[f, l @ l.T], [jnp.zeros_like(f), -f.T]]) * t)
        phi, q = e[:d, :d], e[:d, d:] @ e[:d, :d].T
        return phi, 0.5 * (q + q.T)


@eqx.filter_jit
def _cld_replay(loss, augmented, closed, x0, key):
    """Per example ``w δᵀΣδ`` and the zero-mean cross term ``2w (Cᵀδ)·(Cᵀs* + ε)`` on replayed draws."""
    time_key, noise_key = jax.random.split(key)
    t, w = loss.times.sample(closed, time_key, x0.shape[0])
    eps = jax.random.normal(noise_key, (x0.shape[0], 4))
    phi, q = jax.vmap(closed.transition)(t)
    velocity_variance = jnp.full(2, closed.velocity_std**2)
    cov0 = jnp.diag(jnp.concatenate([jnp.zeros(2), velocity_variance]))
    cov = phi @ cov0 @ jnp.swapaxes(phi, 1, 2) + q
    chol = jnp.linalg.cholesky(cov)
    u = jnp.einsum("bij,bj->bi", phi[:, :, :2], x0) + jnp.einsum("bij,bj->bi", chol, eps)
    score = jax.vmap(augmented.marginal_score, (None, 0, 0))(closed, t, u)
    c_delta = jnp.einsum("bji,bj->bi", chol, jax.vmap(_perturbation)(t, u))
    c_score = jnp.einsum("bji,bj->bi", chol, score)
    return w * jnp.sum(c_delta**2, -1), 2 * w * jnp.sum(c_delta * (c_score + eps), -1)


def test_cld_dsm_excess_risk_identity():
    """L(s*+δ) − L(s*) = E[w δᵀΣδ] on replayed draws; s* and Σ from the closed-form CLD kernel.
    In float32: the Cholesky factor near t_min = 10⁻³ and the sampled states stay consistent."""
    cld, data, n = sd.CriticallyDampedLangevin(n=2), sd.GaussianMixture.ring(DATA_KEY), 2048
    closed, augmented, loss = _ClosedFormCLD(n=2), _augmented(data, cld), sd.LinearDenoisingScoreMatching()
    x0, key = data.sample(jax.random.key(5), n), jax.random.key(6)
    perturbed = _Perturbed(augmented, closed, jnp.zeros(()))
    _, quadratic, excess = _quadratic_parts(loss, perturbed, cld, x0, key)

    risk, cross = _cld_replay(loss, augmented, closed, x0, key)
    np.testing.assert_allclose(quadratic, np.mean(risk), rtol=1e-4)
    assert abs(excess - np.mean(risk)) < 4 * _se(cross), (excess, np.mean(risk), _se(cross))
    assert np.mean(risk) > 10 * _se(cross)  # δ is large enough for the check to bite


def test_ssm_excess_risk_identity_on_a_generic_sde(x64):
    """Sliced score matching on ``sd.SDE`` (an OU process given only by drift and diffusion):
    L(s*+δ) − L(s*) = ½E[λ‖δ‖²] with λ = g² = 2, up to the Euler–Maruyama bias of x_t."""
    ou = sd.SDE(lambda t, x: -x, lambda t, x: jnp.full_like(x, math.sqrt(2.0)))
    kernel = sd.VP(beta_min=2.0, beta_max=2.0)  # the same process: α = e^{−t}, σ² = 1 − e^{−2t}
    data = sd.GaussianMixture.ring(DATA_KEY)
    loss = sd.SlicedScoreMatching(sd.UniformTimes(1e-3), num_steps=64)
    perturbed = _Perturbed(data, kernel, jnp.zeros(()))
    parts = [
        _quadratic_parts(loss, perturbed, ou, data.sample(k, 256), jax.random.fold_in(k, 1))
        for k in jax.random.split(jax.random.key(7), 32)
    ]
    _, quadratic, excess = (np.array(v) for v in zip(*parts))

    @jax.jit
    def half_risk(key):  # ½ λ ‖δ‖² on exact marginal samples, λ = 2
        time_key, data_key, noise_key = jax.random.split(key, 3)
        t = jax.random.uniform(time_key, (32768,), minval=1e-3, maxval=1.0)
        x0, eps = data.sample(data_key, t.size), jax.random.normal(noise_key, (t.size, 2))
        x = jnp.exp(-t)[:, None] * x0 + jnp.sqrt(-jnp.expm1(-2 * t))[:, None] * eps
        return jnp.sum(jax.vmap(_perturbation)(t, x) ** 2, -1)

    truth_samples = np.asarray(half_risk(jax.random.key(8)))
    truth, truth_se = truth_samples.mean(), _se(truth_samples)
    assert abs(quadratic.mean() - truth) < 4 * math.hypot(_se(quadratic), truth_se), (quadratic.mean(), truth)
    assert abs(excess.mean() - truth) < 4 * math.hypot(_se(excess), truth_se), (excess.mean(), truth)
    assert truth > 20 * _se(excess)  # δ is large enough for the check to bite


class _TinyMLP(nnx.Module):
    """``net(x, c)`` on batches: two SiLU layers on ``x`` and Fourier features of ``c``."""

    def __init__(self, dim, width, rngs):
        self.hidden = nnx.Linear(dim + 8, width, rngs=rngs)
        self.middle = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, dim, rngs=rngs)

    def __call__(self, x, c):
        angles = c[:, None] * jnp.array([1.0, 2.0, 4.0, 8.0])
        h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], axis=-1)
        return self.out(nnx.silu(self.middle(nnx.silu(self.hidden(h)))))


def _train(objective, sde, data, steps, learning_rate=3e-3, batch=256):
    """A plain optax Adam loop; returns the initial and the trained ``sd.Noise`` model."""
    model = sd.Noise(sd.Network(_TinyMLP(2, 64, nnx.Rngs(0)), sde))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(carry, key):
        params, opt_state = carry
        data_key, loss_key = jax.random.split(key)
        x0 = data.sample(data_key, batch)
        grads = jax.grad(lambda p: objective(eqx.combine(p, static), sde, x0, loss_key))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    keys = jax.random.split(jax.random.key(11), steps)
    (trained, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return model, eqx.combine(trained, static)


@eqx.filter_jit
def _oracle_error(model, sde, data):
    """``E σ² ‖s_θ − s*‖²`` over ``t ~ U[10⁻³, 1]`` and exact ``x_t``."""
    t = jnp.linspace(1e-3, 1.0, 2048)
    x0, eps = data.sample(jax.random.key(12), t.size), jax.random.normal(jax.random.key(13), (t.size, 2))
    x = jax.vmap(sde.alpha)(t)[:, None] * x0 + jax.vmap(sde.sigma)(t)[:, None] * eps

    def one(t, x):
        return sde.sigma2(t) * jnp.sum((model.score(sde, t, x) - data.marginal_score(sde, t, x)) ** 2)

    return jnp.mean(jax.vmap(one)(t, x))


def test_dsm_training_learns_the_oracle_score():
    sde, data = sd.VP(), sd.GaussianMixture.ring(DATA_KEY)
    initial, trained = _train(sd.DenoisingScoreMatching(), sde, data, steps=200)
    before, after = float(_oracle_error(initial, sde, data)), float(_oracle_error(trained, sde, data))
    assert after < before / 5, (before, after)


@pytest.mark.slow
def test_ssm_training_reduces_the_oracle_score_error():
    sde, data = sd.VP(), sd.GaussianMixture.ring(DATA_KEY)
    objective = sd.SlicedScoreMatching(sd.UniformTimes(1e-3), sd.NoiseWeighting(), num_steps=16)
    initial, trained = _train(objective, sde, data, steps=100)
    before, after = float(_oracle_error(initial, sde, data)), float(_oracle_error(trained, sde, data))
    assert after < before / 5, (before, after)


def test_batches_configuration_and_sde_checks():
    sde, data = sd.VP(), sd.GaussianMixture.ring(DATA_KEY)
    x0, key = data.sample(jax.random.key(14), 16), jax.random.key(15)
    model = sd.Score(lambda t, x: -x)
    loss = sd.DenoisingScoreMatching()
    labels = jnp.arange(16)
    # a plain callable is read as a score; labels need a network to condition
    assert float(loss(model, sde, x0, key)) == float(loss(lambda t, x: -x, sde, x0, key))
    with pytest.raises(TypeError, match="sd.Network"):
        loss(model, sde, (x0, labels), key)
    with pytest.raises(ValueError, match="labels must be integers"):
        loss(model, sde, (x0, labels[:3]), key)
    with pytest.raises(ValueError, match=r"\(x0, labels\)"):
        loss(model, sde, (x0, labels, labels), key)
    with pytest.raises(ValueError, match="shape"):
        loss(model, sde, jnp.zeros(()), key)
    for bad in (
        lambda: sd.UniformTimes(eps=0.0),
        lambda: sd.LogSNRTimes(eps=1.0),
        lambda: sd.LogNormalNoise(std=0.0),
        lambda: sd.EDMWeighting(sigma_data=0.0),
        lambda: sd.MinSNRWeighting(gamma=-1.0),
        lambda: sd.SlicedScoreMatching(num_projections=0),
        lambda: sd.SlicedScoreMatching(num_steps=2.5),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError, match="weighting"):
        sd.DenoisingScoreMatching(weighting="simple")
    with pytest.raises(TypeError, match="time distribution"):
        sd.LinearDenoisingScoreMatching(times=sd.UniformTime())
    generic = sd.SDE(lambda t, x: -x, lambda t, x: 1.0 + x**2)
    with pytest.raises(TypeError, match="ScheduleSDE"):
        loss(model, generic, x0, key)
    with pytest.raises(TypeError, match="ScheduleSDE"):
        sd.SlicedScoreMatching(weighting=sd.NoiseWeighting())(model, generic, x0, key)
    with pytest.raises(ValueError, match="depend on x"):
        sd.SlicedScoreMatching(weighting=sd.LikelihoodWeighting())(model, generic, x0, key)
    with pytest.raises(TypeError, match="linear SDE"):
        sd.LinearDenoisingScoreMatching()(model, sde, x0, key)
    with pytest.raises(ValueError, match="dimension"):
        sd.LinearDenoisingScoreMatching()(model, sd.CriticallyDampedLangevin(n=3), x0, key)


def test_likelihood_weighting_of_matrix_and_elementwise_diffusions():
    """``g² = tr(LLᵀ)/dim`` for a generic diffusion, ``g²(t)`` for a schedule."""
    x = jnp.zeros(2)
    lmat = jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    matrix = sd.SDE(lambda t, x_: -x_, lambda t, x_: lmat)
    elementwise = sd.SDE(lambda t, x_: -x_, lambda t, x_: jnp.array([1.0, 3.0]))
    weighting = sd.LikelihoodWeighting()
    np.testing.assert_allclose(weighting.weight(matrix, 0.5, x), (1 + 4 + 1 + 9) / 2, rtol=1e-6)
    np.testing.assert_allclose(weighting.weight(elementwise, 0.5, x), (1 + 9) / 2, rtol=1e-6)
    np.testing.assert_allclose(weighting.weight(sd.VP(), 0.5, x), 0.1 + 0.5 * 19.9, rtol=1e-5)
    np.testing.assert_allclose(sd.UnitWeighting().weight(matrix, 0.5, x), 1.0)
