"""Forward SDEs ``dx = f(t, x) dt + L(t, x) dw`` on ``t ∈ [t0, t1]`` (data at t0, prior at t1).

Coefficients take one example ``(t, x)``; batches are ``jax.vmap``-ped by the caller.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jaxtyping import Array, ArrayLike

from ._checks import check_shape
from .noise import AbstractNoise, noise_for


class AbstractSDE(eqx.Module):
    """A forward SDE. Subclasses give ``drift``, ``diffusion``, ``t0``, ``t1`` and ``prior``."""

    t0: eqx.AbstractVar[float]
    t1: eqx.AbstractVar[float]

    @abc.abstractmethod
    def drift(self, t: ArrayLike, x: Array) -> Array:
        """``f(t, x)``, shaped like ``x``."""

    @abc.abstractmethod
    def diffusion(self, t: ArrayLike, x: Array) -> Array:
        """``L(t, x)``: a scalar, an array shaped like ``x``, or ``x.shape + (m,)``."""

    @property
    @abc.abstractmethod
    def prior(self):
        """Distribution of ``x`` at ``t1`` (``sample(key, shape)``, ``log_prob(x)``)."""

    def diffusion_depends_on_x(self, x: Array) -> bool:
        """Whether ``L`` depends on ``x`` (decides if ``∇·(LLᵀ)`` must be computed).

        Found by tracing ``diffusion`` once and following data dependencies from ``x``.
        """
        t = jnp.asarray(self.t0, dtype=jnp.result_type(float))
        return _depends_on_input(lambda y: self.diffusion(t, y), x)

    def noise(self, x: Array) -> AbstractNoise:
        """The noise kind (elementwise or matrix) for states shaped like ``x``.

        Also checks, at trace time, that ``drift`` returns ``x``'s shape.
        """
        t = jnp.asarray(self.t0, dtype=jnp.result_type(float))
        x_struct = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
        check_shape(jax.eval_shape(self.drift, t, x_struct).shape, jnp.shape(x), "drift(t, x)")
        return noise_for(jnp.shape(x), jax.eval_shape(self.diffusion, t, x_struct).shape)

    def __check_init__(self):
        if not self.t0 < self.t1:
            raise ValueError(f"need t0 < t1, got t0={self.t0}, t1={self.t1}")


class SDE(AbstractSDE):
    """An SDE from two plain functions ``drift(t, x)`` and ``diffusion(t, x)``.

    ``prior`` is the distribution at ``t1`` that sampling starts from (optional: samplers can be
    given starting points instead).
    """

    drift_fn: Callable[[Array, Array], Array]
    diffusion_fn: Callable[[Array, Array], Array]
    t0: float = eqx.field(static=True)
    t1: float = eqx.field(static=True)
    prior_distribution: object | None = None

    def __init__(self, drift, diffusion, t0: float = 0.0, t1: float = 1.0, prior=None):
        if not (callable(drift) and callable(diffusion)):
            raise TypeError("drift and diffusion must be callables (t, x) -> array")
        self.drift_fn, self.diffusion_fn = drift, diffusion
        self.t0, self.t1 = float(t0), float(t1)
        self.prior_distribution = prior

    def drift(self, t, x):
        return self.drift_fn(t, x)

    def diffusion(self, t, x):
        return self.diffusion_fn(t, x)

    @property
    def prior(self):
        if self.prior_distribution is None:
            raise ValueError(
                "this SDE has no prior: pass prior=... (e.g. sd.Normal(0.0, 1.0)) when building "
                "it, or give the sampler its starting points"
            )
        return self.prior_distribution


def _depends_on_input(fn: Callable[[Array], Array], x: Array) -> bool:
    """Whether any output of ``fn`` is data-dependent on ``x`` (conservative jaxpr walk)."""
    closed = jax.make_jaxpr(fn)(x)
    tainted = set(closed.jaxpr.invars)
    for eqn in closed.jaxpr.eqns:
        if any(not isinstance(v, jex_core.Literal) and v in tainted for v in eqn.invars):
            tainted.update(eqn.outvars)
    return any(not isinstance(v, jex_core.Literal) and v in tainted for v in closed.jaxpr.outvars)

