"""Exact ground truth: a Gaussian mixture ``p0 = Σ_k π_k N(μ_k, C_k)`` and its marginals.

A forward SDE with kernel ``x_t | x0 ~ N(A x0, Q)`` maps every component to a Gaussian, so

    p_t(x) = Σ_k π_k N(x; A μ_k, S_k),      S_k = A C_k Aᵀ + Q,

and score, denoiser ``D(x) = E[x0 | x_t = x]`` and samples are all closed-form.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._checks import check_shape, require
from .linear import AbstractLinearSDE
from .schedule import AbstractScheduleSDE

SDELike = AbstractScheduleSDE | AbstractLinearSDE


class GaussianMixture(eqx.Module):
    """``p0(x) = Σ_k π_k N(x; μ_k, C_k)`` over ``x ∈ R^d``, with ``C_k = U_k diag(λ_k) U_kᵀ``.

    ``covariances`` of shape ``(K, d)`` are diagonal variances (``U_k = I``, never
    materialised); of shape ``(K, d, d)`` full covariances, stored in eigen form.
    Methods take one example ``x`` of shape ``(d,)``; ``jax.vmap`` over batches.
    """

    weights: Array  # (K,) π, normalised
    means: Array  # (K, d) μ
    variances: Array  # (K, d) λ, eigenvalues of C_k
    eigenvectors: Array | None  # (K, d, d) U, or None for diagonal C_k

    def __init__(self, weights: ArrayLike, means: ArrayLike, covariances: ArrayLike):
        dtype = jnp.result_type(float)
        weights = jnp.asarray(weights, dtype=dtype)
        means = jnp.asarray(means, dtype=dtype)
        covariances = jnp.asarray(covariances, dtype=dtype)
        if weights.ndim != 1 or weights.shape[0] < 1:
            raise ValueError(f"weights must have shape (K,) with K ≥ 1, got {weights.shape}")
        k = weights.shape[0]
        if means.ndim != 2 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, d), got {means.shape}")
        d = means.shape[1]
        check_shape(means.shape, (k, d), "means")
        if covariances.shape not in ((k, d), (k, d, d)):
            raise ValueError(
                f"covariances has shape {covariances.shape}, expected {(k, d)} (diagonal "
                f"variances) or {(k, d, d)} (full covariances)"
            )
        require(jnp.isfinite(weights) & (weights > 0), "weights must be finite and > 0")
        require(jnp.isfinite(means), "means must be finite")
        require(jnp.isfinite(covariances), "covariances must be finite")
        self.weights = weights / jnp.sum(weights)
        self.means = means
        if covariances.ndim == 2:
            require(covariances > 0, "variances must be > 0")
            self.variances, self.eigenvectors = covariances, None
        else:
            transpose = jnp.swapaxes(covariances, -1, -2)
            scale = jnp.max(jnp.abs(covariances), axis=(-1, -2), keepdims=True)
            tol = math.sqrt(jnp.finfo(dtype).eps) * scale
            require(jnp.abs(covariances - transpose) <= tol, "covariances must be symmetric")
            self.variances, self.eigenvectors = jnp.linalg.eigh(0.5 * (covariances + transpose))
            # eigenvalues below d·eps·λ_max are rounding noise around 0
            floor = d * jnp.finfo(dtype).eps * jnp.max(self.variances, axis=-1, keepdims=True)
            require(self.variances > floor, "covariances must be positive definite")

    @classmethod
    def ring(
        cls,
        key: PRNGKeyArray,
        n_components: int = 8,
        radius: float = 1.0,
        std_range: tuple[float, float] = (0.05, 0.15),
    ) -> GaussianMixture:
        """Equal weights, ``μ_k = r (cos 2πk/K, sin 2πk/K)``, per-axis std ``U(std_range)``."""
        angles = 2 * jnp.pi * jnp.arange(n_components) / n_components
        means = radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
        std = jax.random.uniform(key, (n_components, 2), minval=std_range[0], maxval=std_range[1])
        return cls(jnp.ones(n_components), means, std**2)

    @classmethod
    def random(
        cls,
        key: PRNGKeyArray,
        n_components: int = 10,
        dim: int = 64,
        mean_std: float = 0.8,
        std_range: tuple[float, float] = (0.1, 0.5),
        weight_range: tuple[float, float] = (0.5, 1.5),
    ) -> GaussianMixture:
        """``μ_k ~ N(0, mean_std² I)``, per-axis std ``U(std_range)``, ``π ∝ U(weight_range)``."""
        mean_key, std_key, weight_key = jax.random.split(key, 3)
        shape = (n_components, dim)
        means = mean_std * jax.random.normal(mean_key, shape)
        std = jax.random.uniform(std_key, shape, minval=std_range[0], maxval=std_range[1])
        weights = jax.random.uniform(
            weight_key, (n_components,), minval=weight_range[0], maxval=weight_range[1]
        )
        return cls(weights, means, std**2)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # -- the data distribution ------------------------------------------------------------

    def mean(self) -> Array:
        """``E[x0] = Σ π_k μ_k``."""
        return self.weights @ self.means

    def covariance(self) -> Array:
        """``Cov[x0] = Σ π_k (C_k + (μ_k − m)(μ_k − m)ᵀ)``, ``m = E[x0]``."""
        centred = self.means - self.mean()
        return jnp.einsum("k,kij->ij", self.weights, self._covariances()) + jnp.einsum(
            "k,ki,kj->ij", self.weights, centred, centred
        )

    def log_prob(self, x: ArrayLike) -> Array:
        """``log p0(x)``."""
        return jax.nn.logsumexp(self._posterior(1.0, 0.0, x)[0])

    def score(self, x: ArrayLike) -> Array:
        """``∇ log p0(x)``."""
        return _average(*self._posterior(1.0, 0.0, x)[:2])

    def sample(self, key: PRNGKeyArray, n: int) -> Array:
        """``n`` exact samples, shape ``(n, d)``."""
        component_key, noise_key = jax.random.split(key)
        k = jax.random.categorical(component_key, jnp.log(self.weights), shape=(n,))
        eps = jax.random.normal(noise_key, (n, self.dim), dtype=self.means.dtype)
        z = jnp.sqrt(self.variances[k]) * eps
        if self.eigenvectors is not None:
            z = jnp.einsum("nij,nj->ni", self.eigenvectors[k], z)
        return self.means[k] + z

    # -- marginals under a forward SDE ------------------------------------------------------

    def marginal_log_prob(self, sde: SDELike, t: ArrayLike, x: ArrayLike) -> Array:
        """``log p_t(x)``."""
        return jax.nn.logsumexp(self._posterior(*self._transition(sde, t), x)[0])

    def marginal_score(self, sde: SDELike, t: ArrayLike, x: ArrayLike) -> Array:
        """``∇ log p_t(x) = Σ_k r_k(x) score_k(x)``, ``r_k`` the posterior component weights."""
        return _average(*self._posterior(*self._transition(sde, t), x)[:2])

    def denoiser(self, sde: SDELike, t: ArrayLike, x: ArrayLike) -> Array:
        """``D(x) = E[x0 | x_t = x] = Σ_k r_k(x) E[x0 | x_t = x, k]``."""
        log_joint, _, mean = self._posterior(*self._transition(sde, t), x)
        return _average(log_joint, mean)

    def marginal_sample(self, sde: SDELike, t: ArrayLike, key: PRNGKeyArray, n: int) -> Array:
        """``n`` exact samples of ``p_t``: ``x0 ~ p0``, then ``x_t = A x0 + Q^{1/2} ε``."""
        a, q = self._transition(sde, t)
        data_key, noise_key = jax.random.split(key)
        x0 = self.sample(data_key, n)
        eps = jax.random.normal(noise_key, x0.shape, dtype=x0.dtype)
        if jnp.ndim(a) == 0:
            return a * x0 + jnp.sqrt(q) * eps
        lam, v = jnp.linalg.eigh(q)  # Q is only semi-definite (Q = 0 at t0)
        return x0 @ a.T + (jnp.sqrt(jnp.clip(lam, 0)) * eps) @ v.T

    def marginal(self, sde: SDELike, t: ArrayLike) -> GaussianMixture:
        """``p_t = Σ_k π_k N(A μ_k, A C_k Aᵀ + Q)`` as a mixture."""
        a, q = self._transition(sde, t)
        if jnp.ndim(a) == 0:  # same eigenvectors, eigenvalues α² λ + σ²
            return eqx.tree_at(
                lambda m: (m.means, m.variances), self, (a * self.means, a**2 * self.variances + q)
            )
        s = a @ self._covariances() @ a.T + q
        return GaussianMixture(self.weights, self.means @ a.T, 0.5 * (s + jnp.swapaxes(s, -1, -2)))

    # -- internals --------------------------------------------------------------------------

    def _covariances(self) -> Array:
        """Full ``C_k``, shape ``(K, d, d)``."""
        if self.eigenvectors is None:
            return jax.vmap(jnp.diag)(self.variances)
        u = self.eigenvectors
        return jnp.einsum("kij,kj,klj->kil", u, self.variances, u)

    def _rotate(self, v: Array, transpose: bool = False) -> Array:
        """``U_k v_k`` (``U_kᵀ v_k`` if ``transpose``) for ``v`` of shape ``(K, d)`` or ``(d,)``."""
        if self.eigenvectors is None:
            return v
        u = jnp.swapaxes(self.eigenvectors, -1, -2) if transpose else self.eigenvectors
        return jnp.einsum("kij,kj->ki", u, jnp.broadcast_to(v, self.means.shape))

    def _transition(self, sde: SDELike, t: ArrayLike) -> tuple[Array, Array]:
        a, q = sde.transition(t)
        if jnp.ndim(a) != 0:
            check_shape(jnp.shape(a), (self.dim, self.dim), "the SDE's transition matrix")
        return a, q

    def _posterior(self, a: ArrayLike, q: ArrayLike, x: ArrayLike) -> tuple[Array, Array, Array]:
        """Per component: ``log π_k + log N(x; A μ_k, S_k)``, ``score_k(x)``, ``E[x0 | x, k]``."""
        x = jnp.asarray(x, dtype=self.means.dtype)
        check_shape(jnp.shape(x), (self.dim,), "x")
        posterior = self._scalar_posterior if jnp.ndim(a) == 0 else self._matrix_posterior
        log_n, score, mean = posterior(a, q, x)
        return jnp.log(self.weights) + log_n, score, mean

    def _scalar_posterior(self, alpha, sigma2, x):
        """``A = α I``, ``Q = σ² I``; in each eigenbasis ``s = α² λ + σ²``, ``w = 1/s``:

            score_k = U (w ⊙ Uᵀ(α μ_k − x)),    E[x0 | x, k] = U(σ² w ⊙ Uᵀμ_k + α λ w ⊙ Uᵀx),

        free of the cancellation in ``(x + σ² score)/α`` as σ → 0 or σ → ∞.
        """
        lam, m, y = self.variances, self._rotate(self.means, True), self._rotate(x, True)
        s = alpha**2 * lam + sigma2
        w = 1 / s
        r = alpha * m - y
        log_n = -0.5 * jnp.sum(w * r**2 + jnp.log(2 * jnp.pi * s), axis=-1)
        return log_n, self._rotate(w * r), self._rotate(sigma2 * w * m + alpha * lam * w * y)

    def _matrix_posterior(self, a, q, x):
        """``S_k = A C_k Aᵀ + Q = L Lᵀ``: ``score_k = −S_k⁻¹(x − A μ_k)``,

        ``E[x0 | x, k] = μ_k + C_k Aᵀ S_k⁻¹ (x − A μ_k)``.
        """
        c = self._covariances()
        chol = jnp.linalg.cholesky(a @ c @ a.T + q)
        r = x - self.means @ a.T
        z = jax.vmap(lambda l_, r_: jax.scipy.linalg.cho_solve((l_, True), r_))(chol, r)
        logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        log_n = -0.5 * (jnp.sum(r * z, axis=-1) + logdet + self.dim * math.log(2 * math.pi))
        return log_n, -z, self.means + jnp.einsum("kij,kj->ki", c @ a.T, z)


def _average(log_joint: Array, per_component: Array) -> Array:
    """``Σ_k r_k v_k`` with responsibilities ``r = softmax(log π + log N)``."""
    return jax.nn.softmax(log_joint) @ per_component
