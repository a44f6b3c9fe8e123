"""Gaussian distributions used as priors and transition kernels.

``shape`` arguments are full output shapes (batch dimensions first); ``log_prob`` takes one
example and sums over its elements.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._checks import require


class Normal(eqx.Module):
    """Independent normal ``N(loc, scale²)`` per element; ``loc``/``scale`` broadcast."""

    loc: Array
    scale: Array

    def __init__(self, loc: ArrayLike, scale: ArrayLike):
        self.loc = jnp.asarray(loc, dtype=jnp.result_type(float))
        self.scale = jnp.asarray(scale, dtype=jnp.result_type(float))
        require(self.scale >= 0, "Normal scale must be ≥ 0")

    def sample(self, key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
        eps = jax.random.normal(key, shape, dtype=self.scale.dtype)
        return self.loc + self.scale * eps

    def log_prob(self, x: ArrayLike) -> Array:
        z = (x - self.loc) / self.scale
        logp = -0.5 * z**2 - jnp.log(self.scale) - 0.5 * math.log(2 * math.pi)
        return jnp.sum(jnp.broadcast_to(logp, jnp.shape(z)))

    def score(self, x: ArrayLike) -> Array:
        return (self.loc - x) / self.scale**2


class MultivariateNormal(eqx.Module):
    """``N(mean, covariance)`` over vectors of length ``d`` (the last axis)."""

    mean: Array
    covariance: Array
    cholesky: Array

    def __init__(self, mean: ArrayLike, covariance: ArrayLike):
        dtype = jnp.result_type(float)
        self.mean = jnp.asarray(mean, dtype=dtype)
        self.covariance = jnp.asarray(covariance, dtype=dtype)
        d = self.mean.shape[-1]
        if self.covariance.shape != (d, d):
            raise ValueError(f"covariance has shape {self.covariance.shape}, expected {(d, d)}")
        self.cholesky = jnp.linalg.cholesky(self.covariance)
        require(jnp.all(jnp.isfinite(self.cholesky)), "covariance must be positive definite")

    def sample(self, key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
        eps = jax.random.normal(key, shape, dtype=self.mean.dtype)
        return self.mean + eps @ self.cholesky.T

    def log_prob(self, x: ArrayLike) -> Array:
        z = jax.scipy.linalg.solve_triangular(self.cholesky, x - self.mean, lower=True)
        d = self.mean.shape[-1]
        logdet = 2 * jnp.sum(jnp.log(jnp.diag(self.cholesky)))
        return -0.5 * (jnp.sum(z**2) + logdet + d * math.log(2 * math.pi))

    def score(self, x: ArrayLike) -> Array:
        return -jax.scipy.linalg.cho_solve((self.cholesky, True), x - self.mean)
