"""Distances between sample sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray


def sliced_wasserstein(
    x: ArrayLike, y: ArrayLike, key: PRNGKeyArray, num_projections: int = 512
) -> Array:
    """Sliced Wasserstein-2 distance between two equal-size samples ``(n, ...)``:

    ``SW2² = E_θ W2²(θᵀx, θᵀy)`` over uniform directions θ, each 1-D W2 from sorted projections.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"need two samples of equal shape (n, ...), got {x.shape} and {y.shape}")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    theta = jax.random.normal(key, (x.shape[1], num_projections), dtype=x.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=0)
    px, py = jnp.sort(x @ theta, axis=0), jnp.sort(y @ theta, axis=0)
    return jnp.sqrt(jnp.mean((px - py) ** 2))
