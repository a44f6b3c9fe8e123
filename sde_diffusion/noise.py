"""How a diffusion coefficient ``L(t, x)`` acts: on the noise, on a vector, and its divergence.

A diffusion is *elementwise* when it is a scalar or has the shape of ``x`` (``LLᵀ = diag(L²)``),
and a *matrix* when it has shape ``x.shape + (m,)`` (``m`` noise channels, any ``m``). Each kind
is a type that knows how to compute ``L dw``, ``LLᵀ v`` and ``(∇·LLᵀ)_i = Σ_j ∂_j (LLᵀ)_ij``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array


class AbstractNoise(eqx.Module):
    """How a diffusion coefficient of one shape multiplies noise and vectors."""

    @abc.abstractmethod
    def shape(self, x_shape: tuple[int, ...], diffusion_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the Brownian motion ``w``."""

    @abc.abstractmethod
    def apply(self, diffusion: Array, dw: Array) -> Array:
        """``L dw``."""

    @abc.abstractmethod
    def covariance_times(self, diffusion: Array, v: Array) -> Array:
        """``L Lᵀ v``."""

    @abc.abstractmethod
    def covariance_divergence(self, diffusion: Callable[[Array], Array], x: Array) -> Array:
        """``∇·(L Lᵀ)`` at ``x`` for ``diffusion: x ↦ L(x)`` (forward-mode, O(dim) JVPs)."""


class ElementwiseNoise(AbstractNoise):
    """``L`` scalar or x-shaped: ``L dw = L ⊙ dw`` and ``LLᵀ = diag(L²)``."""

    def shape(self, x_shape, diffusion_shape):
        return tuple(x_shape)

    def apply(self, diffusion, dw):
        return diffusion * dw

    def covariance_times(self, diffusion, v):
        return diffusion**2 * v

    def covariance_divergence(self, diffusion, x):
        def variance(y):
            return jnp.broadcast_to(diffusion(y) ** 2, y.shape)

        if jax.eval_shape(diffusion, x).shape == ():
            # g²(x) I: divergence is the gradient of g², one reverse pass.
            return jax.grad(lambda y: diffusion(y) ** 2)(x)
        n = x.size
        jac = jax.jacfwd(variance)(x).reshape(n, n)
        return jnp.diagonal(jac).reshape(x.shape)


class MatrixNoise(AbstractNoise):
    """``L`` of shape ``x.shape + (m,)``: ``L dw`` contracts the noise axis."""

    def shape(self, x_shape, diffusion_shape):
        return (diffusion_shape[-1],)

    def apply(self, diffusion, dw):
        return diffusion @ dw

    def covariance_times(self, diffusion, v):
        return diffusion @ jnp.tensordot(v, diffusion, axes=v.ndim)

    def covariance_divergence(self, diffusion, x):
        n = x.size

        def covariance(y_flat):
            lf = diffusion(y_flat.reshape(x.shape)).reshape(n, -1)
            return lf @ lf.T

        jac = jax.jacfwd(covariance)(x.reshape(n))  # [i, j, k] = ∂_k Σ_ij
        return jnp.einsum("ijj->i", jac).reshape(x.shape)


def noise_for(x_shape: tuple[int, ...], diffusion_shape: tuple[int, ...]) -> AbstractNoise:
    """The noise kind of a diffusion of ``diffusion_shape`` acting on states of ``x_shape``."""
    x_shape, diffusion_shape = tuple(x_shape), tuple(diffusion_shape)
    if diffusion_shape in ((), x_shape):
        return ElementwiseNoise()
    if len(diffusion_shape) == len(x_shape) + 1 and diffusion_shape[:-1] == x_shape:
        return MatrixNoise()
    raise ValueError(
        f"diffusion returned shape {diffusion_shape} for x of shape {x_shape}; expected a scalar, "
        f"{x_shape} (diagonal noise) or {x_shape + ('m',)} (matrix noise with m channels)"
    )
