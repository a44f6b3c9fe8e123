"""Reverse-time dynamics of a forward SDE, written in reversed time ``s = t1 − t``.

For ``Σ = L Lᵀ`` and a score ``s_θ(t, x) ≈ ∇ log p_t(x)``, ``x̄(s) = x(t1 − s)`` solves (Anderson 1982)

    reverse SDE:  dx̄ = [−f + ∇·Σ + Σ s_θ] ds + L dw̄,
    PF ODE:       dx̄/ds = −f + ½ ∇·Σ + ½ Σ s_θ,

all evaluated at ``t = t1 − s``. Integrating forward in ``s`` lets every diffrax solver, including
the stochastic Runge–Kutta ones that are wrong with ``t0 > t1`` (diffrax issue 598), be used
unchanged. ``∇·Σ`` is computed only when ``L`` depends on ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .sde import AbstractSDE

Score = Callable[[Array, Array], Array]  # (t, x) -> ∇ log p_t(x), one example


def _reverse_field(sde: AbstractSDE, score: Score, t: ArrayLike, x: Array, weight: float) -> Array:
    """``−f + w (∇·Σ + Σ s_θ)`` at forward time ``t``; ``w = 1`` (reverse SDE) or ``½`` (PF ODE)."""
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    noise = sde.noise(x)
    correction = noise.covariance_times(sde.diffusion(t, x), score(t, x))
    if sde.diffusion_depends_on_x(x):
        correction = correction + noise.covariance_divergence(lambda y: sde.diffusion(t, y), x)
    return weight * correction - sde.drift(t, x)


class ReverseSDE(AbstractSDE):
    """The reverse-time SDE of ``sde`` under ``score``, itself an SDE in ``s ∈ [0, t1 − t0]``."""

    sde: AbstractSDE
    score: Score

    def __init__(self, sde: AbstractSDE, score: Score):
        self.sde, self.score = sde, score

    @property
    def t0(self) -> float:
        return 0.0

    @property
    def t1(self) -> float:
        return self.sde.t1 - self.sde.t0

    def time(self, s: ArrayLike) -> Array:
        """Forward time ``t = t1 − s`` (round-off clipped to ``[t0, t1]``)."""
        return jnp.clip(self.sde.t1 - jnp.asarray(s), self.sde.t0, self.sde.t1)

    def drift(self, s, x):
        return _reverse_field(self.sde, self.score, self.time(s), x, 1.0)

    def diffusion(self, s, x):
        return self.sde.diffusion(self.time(s), x)

    def diffusion_depends_on_x(self, x):
        return self.sde.diffusion_depends_on_x(x)

    @property
    def prior(self):
        return self.sde.prior


class ProbabilityFlowODE(eqx.Module):
    """The probability-flow ODE of ``sde`` under ``score``."""

    sde: AbstractSDE
    score: Score

    def vector_field(self, s: ArrayLike, x: Array) -> Array:
        """``dx̄/ds = −dx/dt`` in reversed time ``s = t1 − t``."""
        return _reverse_field(self.sde, self.score, self.sde.t1 - jnp.asarray(s), x, 0.5)

    def velocity(self, t: ArrayLike, x: Array) -> Array:
        """``dx/dt = f − ½∇·Σ − ½Σ s_θ`` in forward time."""
        return -_reverse_field(self.sde, self.score, t, x, 0.5)
