import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd


def _divergence_by_hand(diffusion, x):
    """(∇·LLᵀ)_i = Σ_j ∂_j (LLᵀ)_ij by central differences (independent of the autodiff path)."""
    n, h = x.size, 1e-5

    def cov(y):
        lmat = np.asarray(diffusion(y), dtype=float)
        if lmat.ndim == 0 or lmat.shape == x.shape:
            return np.diag(np.broadcast_to(lmat**2, x.shape))
        return lmat @ lmat.T

    out = np.zeros(n)
    for j in range(n):
        e = np.zeros(n)
        e[j] = h
        out += (cov(x + e)[:, j] - cov(x - e)[:, j]) / (2 * h)
    return out


@pytest.mark.parametrize(
    "diffusion",
    [
        lambda x: jnp.sqrt(1 + jnp.sum(x**2)),  # scalar, state-dependent
        lambda x: 0.5 * x + jnp.sin(x[::-1]),  # diagonal, coupled
        lambda x: jnp.stack([x * x[0], jnp.cos(x), jnp.ones_like(x)], axis=-1),  # (3, 3) matrix
        lambda x: jnp.outer(x, jnp.array([1.0, -2.0])),  # (3, 2): fewer noise channels
    ],
)
def test_covariance_divergence_matches_finite_differences(x64, diffusion):
    x = jnp.array([0.3, -0.7, 1.1])
    noise = sd.SDE(lambda t, y: y, lambda t, y: diffusion(y)).noise(x)
    np.testing.assert_allclose(
        noise.covariance_divergence(diffusion, x), _divergence_by_hand(diffusion, x), rtol=1e-6, atol=1e-8
    )


def test_covariance_times_and_apply():
    lmat = jnp.array([[1.0, 2.0], [0.5, -1.0], [0.0, 3.0]])
    v = jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(sd.MatrixNoise().covariance_times(lmat, v), lmat @ lmat.T @ v, rtol=1e-6)
    np.testing.assert_allclose(sd.MatrixNoise().apply(lmat, jnp.array([1.0, 2.0])), lmat @ jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(sd.ElementwiseNoise().covariance_times(jnp.array(2.0), v), 4 * v)
