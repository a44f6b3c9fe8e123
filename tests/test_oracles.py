"""GaussianMixture oracle: checked against autodiff, Tweedie's formula, scipy and sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import sde_diffusion as sd

D = 4  # state dimension of the small test mixtures (even, so that CLD has n = 2)


def diagonal_params():
    rng = np.random.default_rng(0)
    return rng.uniform(0.5, 1.5, 3), rng.normal(0, 1.0, (3, D)), rng.uniform(0.05, 0.5, (3, D)) ** 2


def full_params():
    rng = np.random.default_rng(1)
    b = rng.normal(size=(3, D, D))
    cov = 0.1 * b @ np.swapaxes(b, -1, -2) + 0.01 * np.eye(D)
    return rng.uniform(0.5, 1.5, 3), rng.normal(0, 1.0, (3, D)), cov


PARAMS = {"diagonal": diagonal_params, "full": full_params}
MIXTURES = {kind: (lambda p=p: sd.GaussianMixture(*p())) for kind, p in PARAMS.items()}
diagonal_mixture, full_mixture = MIXTURES["diagonal"], MIXTURES["full"]

# (sde, t) pairs. Instances are shared so that compiled transitions (diffrax solves for the
# linear SDEs, ~1 s each to compile) are reused across tests.
LINEAR = sd.LinearSDE(lambda t: -0.5 * (1 + t) * jnp.eye(D), lambda t: jnp.sqrt(1 + t) * jnp.eye(D))
SDES = {
    "VP": (sd.VP(), 0.3),
    "SubVP": (sd.SubVP(), 0.4),
    "VE": (sd.VE(), 0.2),
    "EDM": (sd.EDM(), 0.7),
    "CosineVP": (sd.CosineVP(), 0.5),
    "RectifiedFlow": (sd.RectifiedFlow(), 0.6),
    "LinearSDE": (LINEAR, 0.4),
    "CLD": (sd.CriticallyDampedLangevin(n=D // 2), 0.3),
}


def points(gm, sde, t, n=16, seed=3):
    return gm.marginal_sample(sde, t, jax.random.key(seed), n)


def evaluate(gm, sde, t, x, *methods):
    """The marginal ``methods`` of ``gm`` at ``(sde, t)``, vmapped over ``x``.

    Eager: its small kernels are cached across tests, unlike a fresh ``jit`` per test.
    """
    return jax.vmap(lambda y: tuple(getattr(gm, m)(sde, t, y) for m in methods))(x)


def by_hand_mixture(kind, a, q):
    """``(π, A μ_k, A C_k Aᵀ + Q)`` in numpy, straight from the constructor's inputs."""
    weights, means, covs = PARAMS[kind]()
    a, q = np.asarray(a), np.asarray(q)
    if a.ndim == 0:
        a, q = a * np.eye(D), q * np.eye(D)
    if covs.ndim == 2:
        covs = np.stack([np.diag(v) for v in covs])
    return weights / weights.sum(), means @ a.T, a @ covs @ a.T + q


def scipy_log_prob(weights, means, covs, x):
    logs = [multivariate_normal(m, c).logpdf(x) for m, c in zip(means, covs)]
    return logsumexp(np.stack(logs, axis=-1) + np.log(weights), axis=-1)


# -- 1. score = ∇ log p ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", MIXTURES)
def test_data_score_is_gradient(x64, kind):
    gm = MIXTURES[kind]()
    x = gm.sample(jax.random.key(0), 16)
    grad = jax.vmap(jax.grad(gm.log_prob))(x)
    np.testing.assert_allclose(jax.vmap(gm.score)(x), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("name", SDES)
def test_marginal_score_is_gradient(x64, kind, name):
    gm, (sde, t) = MIXTURES[kind](), SDES[name]
    x = points(gm, sde, t)
    grad = jax.vmap(jax.grad(lambda y: gm.marginal_log_prob(sde, t, y)))(x)
    (score,) = evaluate(gm, sde, t, x, "marginal_score")
    np.testing.assert_allclose(score, grad, rtol=1e-8, atol=1e-8 * np.abs(grad).max())


# -- 2. denoiser = Tweedie ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("name", SDES)
def test_denoiser_is_tweedie(x64, kind, name):
    """``E[x0 | x] = A⁻¹(x + Q ∇log p_t(x))`` (``(x + σ² score)/α`` for schedules)."""
    gm, (sde, t) = MIXTURES[kind](), SDES[name]
    x = points(gm, sde, t)
    a, q = sde.transition(t)
    score, denoised = evaluate(gm, sde, t, x, "marginal_score", "denoiser")
    if np.ndim(a) == 0:
        tweedie = (x + q * score) / a
    else:
        tweedie = np.linalg.solve(a, (x + score @ q.T).T).T
    np.testing.assert_allclose(denoised, tweedie, rtol=1e-7, atol=1e-9)


# -- 3. both ends of time ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize(
    "sde, t",
    [(sd.VP(), 0.0), (sd.EDM(t0=0.0), 0.0), (LINEAR, 0.0)],
    ids=["VP", "EDM-t0=0", "LinearSDE"],
)
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_zero_noise(kind, sde, t, precision):
    with jax.enable_x64(precision == "float64"):
        gm = MIXTURES[kind]()
        x = gm.sample(jax.random.key(0), 16)
        score, denoised = evaluate(gm, sde, t, x, "marginal_score", "denoiser")
        data_score = jax.vmap(gm.score)(x)
        assert denoised.dtype == score.dtype == jnp.dtype(precision)
    rtol = 1e-5 if precision == "float32" else 1e-12
    np.testing.assert_allclose(denoised, x, rtol=rtol, atol=rtol)
    atol = 10 * rtol * np.abs(data_score).max()
    np.testing.assert_allclose(score, data_score, rtol=10 * rtol, atol=atol)


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("t", [0.002, 80.0])
def test_edm_extremes_float32_match_float64(kind, t):
    """At σ = 0.002 and σ = 80 float32 keeps float64's answer to ~100 ulp.

    (The naive ``D = x + σ² score`` loses ~5e-5 of ``max |D|`` at σ = 80 and fails this.)
    """
    sde = SDES["EDM"][0]
    with jax.enable_x64(True):
        x = np.asarray(points(MIXTURES[kind](), sde, t), dtype=np.float32)
    results = []
    for x64 in (False, True):
        with jax.enable_x64(x64):
            gm = MIXTURES[kind]()
            methods = ("marginal_score", "denoiser", "marginal_log_prob")
            results.append(evaluate(gm, sde, t, x, *methods))
    for lo, hi in zip(*results):
        assert np.all(np.isfinite(lo))
        np.testing.assert_allclose(lo, hi, rtol=1e-5, atol=1e-5 * np.abs(hi).max())


# -- 4. normalised densities -------------------------------------------------------------------


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("name", SDES)
def test_marginal_log_prob_matches_scipy(x64, kind, name):
    gm, (sde, t) = MIXTURES[kind](), SDES[name]
    x = points(gm, sde, t)
    expected = scipy_log_prob(*by_hand_mixture(kind, *sde.transition(t)), np.asarray(x))
    np.testing.assert_allclose(*evaluate(gm, sde, t, x, "marginal_log_prob"), expected, rtol=1e-10)


@pytest.mark.parametrize("kind", MIXTURES)
def test_data_log_prob_matches_scipy(x64, kind):
    gm = MIXTURES[kind]()
    x = gm.sample(jax.random.key(0), 16)
    expected = scipy_log_prob(*by_hand_mixture(kind, 1.0, 0.0), np.asarray(x))
    np.testing.assert_allclose(jax.vmap(gm.log_prob)(x), expected, rtol=1e-10)


@pytest.mark.parametrize("sde, t", [(sd.VP(), 0.3), (sd.EDM(), 0.5)], ids=["VP", "EDM"])
def test_marginal_density_integrates_to_one(x64, sde, t):
    gm = sd.GaussianMixture.ring(jax.random.key(0))
    grid = np.linspace(-6, 6, 601)
    xy = np.stack(np.meshgrid(grid, grid), axis=-1).reshape(-1, 2)
    (log_p,) = evaluate(gm, sde, t, xy, "marginal_log_prob")
    p = jnp.exp(log_p)
    np.testing.assert_allclose(p.sum() * (grid[1] - grid[0]) ** 2, 1.0, rtol=1e-6)


# -- 5. exact samples ------------------------------------------------------------------------


def assert_moments(samples, mean, cov, n_se=5.0):
    """Sample mean and covariance within ``n_se`` standard errors of the exact ones."""
    samples, n = np.asarray(samples), len(samples)
    centred = samples - samples.mean(0)
    mean_se = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean), n_se * mean_se)
    products = centred[:, :, None] * centred[:, None, :]
    cov_se = products.std(0) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(products.mean(0) - cov), n_se * cov_se)


@pytest.mark.parametrize("kind", MIXTURES)
def test_mean_and_covariance(x64, kind):
    gm = MIXTURES[kind]()
    weights, means, covs = by_hand_mixture(kind, 1.0, 0.0)
    mean = weights @ means
    second = np.einsum("k,kij->ij", weights, covs + means[:, :, None] * means[:, None, :])
    np.testing.assert_allclose(gm.mean(), mean, rtol=1e-12)
    cov = second - np.outer(mean, mean)
    np.testing.assert_allclose(gm.covariance(), cov, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", MIXTURES)
def test_sample_moments(x64, kind):
    gm = MIXTURES[kind]()
    assert_moments(gm.sample(jax.random.key(0), 100_000), gm.mean(), gm.covariance())


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("name", ["VP", "EDM", "RectifiedFlow", "LinearSDE", "CLD"])
def test_marginal_sample_moments(x64, kind, name):
    gm, (sde, t) = MIXTURES[kind](), SDES[name]
    a, q = sde.transition(t)
    samples = gm.marginal_sample(sde, t, jax.random.key(1), 100_000)
    if np.ndim(a) == 0:
        mean, cov = a * gm.mean(), a**2 * gm.covariance() + q * np.eye(D)
    else:
        mean, cov = a @ gm.mean(), a @ gm.covariance() @ a.T + q
    assert samples.shape == (100_000, D)
    assert_moments(samples, mean, cov)


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("name", ["VP", "EDM", "LinearSDE", "CLD"])
def test_marginal_is_the_marginal(x64, kind, name):
    gm, (sde, t) = MIXTURES[kind](), SDES[name]
    pt = gm.marginal(sde, t)
    x = points(gm, sde, t)
    log_p, score = evaluate(gm, sde, t, x, "marginal_log_prob", "marginal_score")
    np.testing.assert_allclose(jax.vmap(pt.log_prob)(x), log_p, rtol=1e-10)
    np.testing.assert_allclose(jax.vmap(pt.score)(x), score, rtol=1e-8, atol=1e-10)


# -- presets, dtypes, transforms ----------------------------------------------------------------


def test_ring():
    gm = sd.GaussianMixture.ring(jax.random.key(0))
    np.testing.assert_allclose(gm.weights, 1 / 8)
    np.testing.assert_allclose(gm.means[2], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(gm.means, axis=-1), 1.0, rtol=1e-6)
    std = np.sqrt(gm.variances)
    assert gm.eigenvectors is None and np.all((std >= 0.05) & (std <= 0.15))


def test_random_is_diagonal_and_cheap():
    gm = sd.GaussianMixture.random(jax.random.key(0))
    assert gm.means.shape == gm.variances.shape == (10, 64) and gm.eigenvectors is None
    std = np.sqrt(gm.variances)
    assert np.all((std >= 0.1) & (std <= 0.5))
    np.testing.assert_allclose(gm.weights.sum(), 1.0, rtol=1e-6)
    x = gm.sample(jax.random.key(1), 8)
    assert evaluate(gm, sd.EDM(), 1.0, x, "denoiser")[0].shape == (8, 64)


def test_default_dtype_is_float32():
    gm = diagonal_mixture()
    x = gm.sample(jax.random.key(0), 4)
    assert x.dtype == jnp.float32
    assert evaluate(gm, sd.VP(), 0.5, x, "denoiser")[0].dtype == jnp.float32


@pytest.mark.parametrize("name", ["VP", "CosineVP", "RectifiedFlow", "LinearSDE"])
def test_jit_vmap_match_eager(x64, name):
    gm, (sde, t) = full_mixture(), SDES[name]
    x = points(gm, sde, t, n=4)

    @jax.jit
    def batched(gm, t, x):
        return jax.vmap(lambda y: gm.denoiser(sde, t, y))(x), gm.marginal(sde, t).means

    eager = np.stack([gm.denoiser(sde, t, y) for y in x])
    denoised, means = batched(gm, t, x)
    np.testing.assert_allclose(denoised, eager, rtol=1e-10)
    np.testing.assert_allclose(means, gm.marginal(sde, t).means, rtol=1e-10)


# -- 6. bad input ------------------------------------------------------------------------------

GOOD_W, GOOD_M, GOOD_V = np.ones(2), np.zeros((2, 3)), np.ones((2, 3))
INDEFINITE = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # eigenvalues −1, 1, 3


@pytest.mark.parametrize(
    "weights, means, covs, match",
    [
        (np.ones((2, 1)), GOOD_M, GOOD_V, "weights must have shape"),
        (np.ones(3), GOOD_M, GOOD_V, "means has shape"),
        (GOOD_W, np.zeros(3), GOOD_V, "means must have shape"),
        (GOOD_W, GOOD_M, np.ones((2, 4)), "covariances has shape"),
        (GOOD_W, GOOD_M, np.ones((2, 3, 4)), "covariances has shape"),
        (np.array([1.0, 0.0]), GOOD_M, GOOD_V, "weights must be finite and > 0"),
        (np.array([1.0, -1.0]), GOOD_M, GOOD_V, "weights must be finite and > 0"),
        (np.array([1.0, np.inf]), GOOD_M, GOOD_V, "weights must be finite and > 0"),
        (GOOD_W, np.full((2, 3), np.nan), GOOD_V, "means must be finite"),
        (GOOD_W, GOOD_M, np.array([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]), "variances must be > 0"),
        (GOOD_W, GOOD_M, np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]), "variances must be > 0"),
        (GOOD_W, GOOD_M, np.stack([np.eye(3), np.diag([1.0, -1.0, 1.0])]), "positive definite"),
        (GOOD_W, GOOD_M, np.stack([np.eye(3), np.ones((3, 3))]), "positive definite"),  # singular
        (GOOD_W, GOOD_M, np.stack([np.eye(3), INDEFINITE]), "positive definite"),
        (GOOD_W, GOOD_M, np.stack([np.eye(3), np.triu(np.ones((3, 3)))]), "symmetric"),
        (GOOD_W, GOOD_M, np.full((2, 3, 3), np.inf), "covariances must be finite"),
    ],
)
def test_bad_input_raises(weights, means, covs, match):
    with pytest.raises(ValueError, match=match):
        sd.GaussianMixture(weights, means, covs)


def test_wrong_example_or_sde_dimension_raises():
    gm = diagonal_mixture()
    with pytest.raises(ValueError, match=r"x has shape \(3,\), expected \(4,\)"):
        gm.marginal_score(sd.VP(), 0.5, jnp.zeros(3))
    with pytest.raises(ValueError, match="transition matrix has shape"):
        gm.denoiser(sd.CriticallyDampedLangevin(n=1), 0.5, jnp.zeros(D))


# -- 7. conditioning -----------------------------------------------------------------------------


def small_params(kind, dim, seed=5):
    """K = 3 components in ``dim`` dimensions, stds ≥ 0.2 (resolved by the quadrature grids)."""
    rng = np.random.default_rng(seed)
    weights, means = rng.uniform(0.5, 1.5, 3), rng.normal(0, 1.0, (3, dim))
    if kind == "diagonal":
        return weights, means, rng.uniform(0.2, 0.6, (3, dim)) ** 2
    b = rng.normal(size=(3, dim, dim))
    return weights, means, 0.15 * b @ np.swapaxes(b, -1, -2) + 0.04 * np.eye(dim)


def grid_2d(lim=9.0, n=361):
    grid = np.linspace(-lim, lim, n)
    return np.stack(np.meshgrid(grid, grid), axis=-1).reshape(-1, 2), (grid[1] - grid[0]) ** 2


@jax.jit
def log_probs(gm, x):
    """``log p0`` over a batch (quadrature grids): one compilation, not one per eager kernel."""
    return jax.vmap(gm.log_prob)(x)


def test_sample_with_components(x64):
    gm = full_mixture()
    x, k = gm.sample_with_components(jax.random.key(0), 20_000)
    assert x.shape == (20_000, D) and k.shape == (20_000,) and k.dtype == jnp.int32
    np.testing.assert_array_equal(gm.sample(jax.random.key(0), 20_000), x)
    weights, means, covs = by_hand_mixture("full", 1.0, 0.0)
    x, k, n = np.asarray(x), np.asarray(k), len(k)
    counts = np.bincount(k, minlength=3)
    freq_se = np.sqrt(weights * (1 - weights) / n)
    np.testing.assert_array_less(np.abs(counts / n - weights), 5 * freq_se)
    for j in range(3):
        mean_se = np.sqrt(np.diag(covs[j]) / counts[j])
        np.testing.assert_array_less(np.abs(x[k == j].mean(0) - means[j]), 5 * mean_se)


def test_stratified_sample_has_exact_counts_and_each_point_is_still_drawn_from_the_mixture(x64):
    gm = full_mixture()
    weights, means, covs = by_hand_mixture("full", 1.0, 0.0)
    n = 1001
    x, k = gm.sample_with_components(jax.random.key(0), n, stratified=True)
    counts = np.bincount(np.asarray(k), minlength=3)
    assert counts.sum() == n and np.all(np.abs(counts - n * weights) < 1), (counts, n * weights)
    np.testing.assert_array_equal(gm.sample(jax.random.key(0), n, stratified=True), x)
    for j in range(3):  # given its component, a point is N(μ_k, C_k)
        mean_se = np.sqrt(np.diag(covs[j]) / counts[j])
        np.testing.assert_array_less(np.abs(np.asarray(x)[np.asarray(k) == j].mean(0) - means[j]), 5 * mean_se)
    # over draws, the component of one fixed index is ~ π (the shuffle leaves no position bias)
    draws = jax.vmap(lambda key: gm.sample_with_components(key, 7, stratified=True)[1][3])(
        jax.random.split(jax.random.key(1), 4000)
    )
    freq = np.bincount(np.asarray(draws), minlength=3) / 4000
    np.testing.assert_array_less(np.abs(freq - weights), 5 * np.sqrt(weights * (1 - weights) / 4000))
    sde, t = SDES["VP"]
    marginal = gm.marginal_sample(sde, t, jax.random.key(2), 100_000, stratified=True)
    a, q = sde.transition(t)
    assert_moments(marginal, a * gm.mean(), a**2 * gm.covariance() + q * np.eye(D))


def class_log_probs(gm, sde, t, x, classes):
    return jax.vmap(lambda y: gm.class_log_probs(sde, t, y, classes))(x)


def by_bayes(gm, sde, t, x, classes):
    """``log p(c | x)`` by Bayes from public densities: ``log π_k + log p_t(x | k) − log p_t(x)``,
    summed over each class's components."""
    (marginal,) = evaluate(gm, sde, t, x, "marginal_log_prob")
    log_p_k = [evaluate(gm.select([k]), sde, t, x, "marginal_log_prob")[0] for k in range(3)]
    per_component = np.log(gm.weights) + np.stack(log_p_k, -1) - np.asarray(marginal)[:, None]
    labels = np.arange(3) if classes is None else np.asarray(classes)
    log_p = [logsumexp(per_component[:, labels == c], axis=-1) for c in range(labels.max() + 1)]
    return np.stack(log_p, -1)


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("name", ["VP", "EDM", "LinearSDE"])
@pytest.mark.parametrize("classes", [None, (0, 1, 0), (1, 1, 0)], ids=["own", "010", "110"])
def test_class_log_probs_is_bayes(x64, kind, name, classes):
    gm, (sde, t) = MIXTURES[kind](), SDES[name]
    x = points(gm, sde, t)
    log_p = class_log_probs(gm, sde, t, x, classes)
    assert log_p.shape == (16, 3 if classes is None else 2)
    np.testing.assert_allclose(log_p, by_bayes(gm, sde, t, x, classes), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(jnp.exp(log_p).sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("sde", [sd.VP(), LINEAR], ids=["VP", "LinearSDE"])
def test_class_log_probs_at_t0_is_the_data_classifier(x64, kind, sde):
    gm, classes = MIXTURES[kind](), (0, 1, 0)
    x = gm.sample(jax.random.key(0), 16)
    log_p = class_log_probs(gm, sde, sde.t0, x, classes)
    members = [[0, 2], [1]]
    weights = np.asarray(gm.weights)
    expected = [
        np.log(weights[ks].sum()) + jax.vmap(gm.given_class(c, classes).log_prob)(x)
        for c, ks in enumerate(members)
    ]
    expected = np.stack(expected, -1) - np.asarray(jax.vmap(gm.log_prob)(x))[:, None]
    np.testing.assert_allclose(log_p, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize(
    "sde, t",
    [(sd.VP(), 0.0), (sd.VP(), 0.2), (sd.VP(), 1.0), (sd.EDM(), 0.05), (sd.EDM(), 20.0)]
    + [(LINEAR, 0.4)],
    ids=["VP-0", "VP-0.2", "VP-1", "EDM-0.05", "EDM-20", "LinearSDE"],
)
def test_classifier_guidance_identity(x64, kind, sde, t):
    """``∇ log p_t(c | x) + ∇ log p_t(x) = ∇ log p_t(x | c)``."""
    gm, classes = MIXTURES[kind](), (0, 1, 0)
    x = points(gm, sde, t)
    (score,) = evaluate(gm, sde, t, x, "marginal_score")
    for c in (0, 1):
        grad = jax.vmap(jax.grad(lambda y: gm.class_log_probs(sde, t, y, classes)[c]))(x)
        guided = grad + score
        (expected,) = evaluate(gm.given_class(c, classes), sde, t, x, "marginal_score")
        np.testing.assert_allclose(guided, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


def test_select_and_given_class():
    gm = full_mixture()
    part, idx = gm.select([2, 0]), np.array([2, 0])
    np.testing.assert_allclose(part.weights, gm.weights[idx] / gm.weights[idx].sum())
    np.testing.assert_array_equal(part.means, gm.means[idx])
    np.testing.assert_array_equal(part.eigenvectors, gm.eigenvectors[idx])
    assert gm.given_class(1).means.shape == (1, D)
    class_0 = gm.given_class(0, np.array([0, 1, 0]))
    np.testing.assert_array_equal(class_0.means, gm.select([0, 2]).means)


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize(
    "operator, y, noise_std",
    [([[1.0, -0.7]], [0.4], 0.3), ([[0.5, 1.0], [1.0, 0.2], [-0.3, 0.8]], [1.0, -0.5, 0.2], 0.5)],
    ids=["m=1", "m=3"],
)
def test_posterior_is_bayes(x64, kind, operator, y, noise_std):
    """``log p(x0 | y) = log p0(x0) + log N(y; A x0, s² I) − log Z``, ``Z`` by 2-D quadrature."""
    gm = sd.GaussianMixture(*small_params(kind, 2))
    operator, y = np.asarray(operator), np.asarray(y)
    post = jax.jit(lambda gm, y, s: gm.posterior(operator, y, s))(gm, y, noise_std)
    noise = multivariate_normal(np.zeros(len(y)), noise_std**2 * np.eye(len(y)))

    def unnormalised(x0):
        return np.asarray(log_probs(gm, x0)) + noise.logpdf(y - x0 @ operator.T)

    grid, area = grid_2d()
    log_z = logsumexp(unnormalised(grid)) + np.log(area)
    x0 = np.random.default_rng(0).normal(0, 1.5, (16, 2))
    np.testing.assert_allclose(log_probs(post, x0) - unnormalised(x0), -log_z, rtol=1e-8)
    np.testing.assert_allclose(jnp.exp(log_probs(post, grid)).sum() * area, 1.0, rtol=1e-8)


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("observed", [0, 1])
def test_conditional_is_normalised_slice(x64, kind, observed):
    """``p(x_free | x_obs = v) = p0(x) / ∫ p0 dx_free``, the integral by 1-D quadrature."""
    gm = sd.GaussianMixture(*small_params(kind, 2))
    mask = np.arange(2) == observed
    values = np.where(mask, 0.3, np.nan)  # free entries are ignored
    cond = gm.conditional(mask, values)
    assert cond.dim == 1 and (cond.eigenvectors is None) == (kind == "diagonal")
    free = np.linspace(-10, 10, 2001)
    x = np.zeros((len(free), 2))
    x[:, observed], x[:, 1 - observed] = 0.3, free
    log_p0 = np.asarray(log_probs(gm, x))
    expected = log_p0 - logsumexp(log_p0) - np.log(free[1] - free[0])
    np.testing.assert_allclose(log_probs(cond, free[:, None]), expected, rtol=1e-9)


@pytest.mark.parametrize("kind", MIXTURES)
@pytest.mark.parametrize("mask", ["TFTF", "FTTF"])
def test_conditional_is_noiseless_posterior(x64, kind, mask):
    """Observing ``x0[mask]`` exactly: the limit ``s → 0`` of ``posterior`` with selection rows."""
    gm, mask = MIXTURES[kind](), np.array([m == "T" for m in mask])
    values = np.array([0.3, -0.8, 1.1, 0.2])
    cond = gm.conditional(mask, values)
    post = gm.posterior(np.eye(D)[mask], values[mask], 1e-4)
    np.testing.assert_allclose(cond.weights, post.weights, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(cond.means, post.means[:, ~mask], rtol=1e-5, atol=1e-7)
    for k in range(3):
        c_k = post.select([k]).covariance()[np.ix_(~mask, ~mask)]
        np.testing.assert_allclose(cond.select([k]).covariance(), c_k, rtol=1e-5, atol=1e-7)


def test_conditional_inpainting_samples(x64):
    """Assembling full vectors: observed entries kept, free ones distributed as the conditional."""
    gm, mask = full_mixture(), np.array([True, False, False, True])
    values = jnp.array([0.5, 0.0, 0.0, -1.0])
    cond = gm.conditional(mask, values)
    free = cond.sample(jax.random.key(0), 20_000)
    x = jnp.broadcast_to(values, (20_000, D)).at[:, ~mask].set(free)
    np.testing.assert_array_equal(x[:, mask], np.broadcast_to(values[mask], (20_000, 2)))
    assert_moments(x[:, ~mask], cond.mean(), cond.covariance())


def test_conditioning_jit_float32_matches_float64():
    """Traced ``t, x, y, values`` (static classes, operator, mask); float32 ≈ float64 to ~1e-4."""
    sde, classes, mask = sd.VP(), (0, 1, 0), np.array([True, False, True, False])
    operator = np.array([[1.0, 0.5, 0.0, -0.3], [0.0, 1.0, 1.0, 0.2]])

    def conditioning(gm, t, x, y, values):
        post, cond = gm.posterior(operator, y, 0.2), gm.conditional(mask, values)
        log_p = gm.class_log_probs(sde, t, x, classes)
        return log_p, post.weights, post.means, cond.weights, cond.means

    results = []
    for x64 in (False, True):
        with jax.enable_x64(x64):
            gm = full_mixture()
            args = (jnp.asarray(0.4), jnp.array([0.3, -0.2, 0.8, 0.1]), jnp.array([0.5, -0.4]))
            results.append(jax.jit(conditioning)(gm, *args, jnp.array([0.2, 0.0, -0.6, 0.0])))
    for lo, hi in zip(*results):
        assert lo.dtype == jnp.float32 and hi.dtype == jnp.float64
        np.testing.assert_allclose(lo, hi, rtol=1e-4, atol=1e-5)


def test_far_observation_keeps_valid_weights(x64):
    """Underflowing weights are floored at the smallest normal float (the constructor needs > 0)."""
    gm = sd.GaussianMixture(*small_params("diagonal", 2))
    cond = gm.conditional(np.array([True, False]), jnp.array([200.0, 0.0]))
    assert np.sum(cond.weights == np.finfo(np.float64).tiny) == 2 and cond.weights[0] == 1
    assert np.all(np.isfinite(log_probs(cond, jnp.zeros((1, 1)))))


A2, Y2, X = np.ones((2, D)), np.zeros(2), np.zeros(D)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda gm: gm.posterior(np.ones((2, 3)), Y2, 0.1), r"operator has shape \(2, 3\)"),
        (lambda gm: gm.posterior(np.ones(D), np.zeros(1), 0.1), r"expected \(m, 4\)"),
        (lambda gm: gm.posterior(np.ones((0, D)), np.zeros(0), 0.1), "m ≥ 1"),
        (lambda gm: gm.posterior(A2, np.zeros(3), 0.1), r"y has shape \(3,\), expected \(2,\)"),
        (lambda gm: gm.posterior(A2, Y2, 0.0), "noise_std must be .*> 0.*use `conditional`"),
        (lambda gm: gm.posterior(A2, Y2, -1.0), "noise_std must be .*> 0"),
        (lambda gm: gm.posterior(A2, Y2, np.ones(2)), "noise_std has shape"),
        (lambda gm: gm.conditional(np.ones(D, bool), X), "at least one observed"),
        (lambda gm: gm.conditional(np.zeros(D, bool), X), "one free"),
        (lambda gm: gm.conditional(np.array([1, 0, 1, 0]), X), "mask must be a bool array"),
        (lambda gm: gm.conditional(np.array([True, False]), X), r"of shape \(4,\)"),
        (lambda gm: gm.conditional(np.array([True, False] * 2), np.zeros(3)), "values has shape"),
        (lambda gm: gm.class_log_probs(sd.VP(), 0.5, X, (0, 1)), "classes must be 3 ints"),
        (lambda gm: gm.class_log_probs(sd.VP(), 0.5, X, (0.0, 1.0, 0.0)), "3 ints"),
        (lambda gm: gm.class_log_probs(sd.VP(), 0.5, X, (0, -1, 0)), "classes must be ≥ 0"),
        (lambda gm: gm.class_log_probs(sd.VP(), 0.5, X, (0, 2, 0)), r"\[1\] .*no component"),
        (lambda gm: gm.given_class(2, (0, 1, 0)), r"label must lie in \[0, 2\), got 2"),
        (lambda gm: gm.given_class(3), r"label must lie in \[0, 3\)"),
        (lambda gm: gm.select([3]), r"distinct indices in \[0, 3\)"),
        (lambda gm: gm.select([-1]), "distinct indices"),
        (lambda gm: gm.select([0, 0]), "distinct indices"),
        (lambda gm: gm.select([]), "non-empty sequence of ints"),
    ],
)
def test_bad_conditioning_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(diagonal_mixture())
