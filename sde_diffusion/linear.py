"""Linear SDEs ``dx = F(t) x dt + L(t) dw`` on vectors ``x ∈ R^d`` (``L`` is ``d × m``).

The transition ``x_t | x_{t0} ~ N(Φ(t) x_{t0}, Q(t))`` solves the moment ODEs

    Φ' = F Φ,  Φ(t0) = I;        Q' = F Q + Q Fᵀ + L Lᵀ,  Q(t0) = 0,

integrated with diffrax (Tsit5, PID, tolerances near machine precision) unless a subclass gives
a closed form.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._checks import check_time
from .distributions import MultivariateNormal
from .sde import AbstractSDE


class AbstractLinearSDE(AbstractSDE):
    """A linear SDE given by ``drift_matrix(t)`` (``d × d``) and ``diffusion_matrix(t)`` (``d × m``)."""

    @abc.abstractmethod
    def drift_matrix(self, t: ArrayLike) -> Array:
        """``F(t)``, shape ``(d, d)``."""

    @abc.abstractmethod
    def diffusion_matrix(self, t: ArrayLike) -> Array:
        """``L(t)``, shape ``(d, m)``."""

    @property
    def dim(self) -> int:
        return jax.eval_shape(self.drift_matrix, jnp.asarray(self.t0)).shape[0]

    def drift(self, t, x):
        return self.drift_matrix(t) @ x

    def diffusion(self, t, x):
        return self.diffusion_matrix(t)

    def diffusion_depends_on_x(self, x):
        return False

    @eqx.filter_jit
    def transition(self, t: ArrayLike) -> tuple[Array, Array]:
        """``(Φ(t), Q(t))`` from the moment ODEs."""
        t = check_time(t, self.t0, self.t1)
        phi, q = self.moments_at(t[None], jnp.zeros((self.dim, self.dim), t.dtype))
        return phi[0], q[0]

    def moments_at(self, ts: Array, cov0: Array) -> tuple[Array, Array]:
        """``Φ(t)`` and ``Σ(t) = Φ cov0 Φᵀ + Q(t)`` at every ``t`` of ``ts`` (any order), from ONE
        adaptive solve of ``Φ' = F Φ, Φ(t0) = I; Σ' = F Σ + Σ Fᵀ + L Lᵀ, Σ(t0) = cov0`` saved at
        the sorted times (Tsit5; rtol = atol = 1e-11 in float64; rtol 1e-6, atol 1e-9 in float32,
        which resolves the small blocks of ``Σ`` near ``t0``).
        """
        order = jnp.argsort(ts)
        sorted_ts = ts[order]

        def rhs(t, y, args):
            phi, cov = y
            f, l = self.drift_matrix(t).astype(cov.dtype), self.diffusion_matrix(t).astype(cov.dtype)
            return f @ phi, f @ cov + cov @ f.T + l @ l.T

        rtol, atol = (1e-11, 1e-11) if cov0.dtype == jnp.float64 else (1e-6, 1e-9)
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(rhs),
            diffrax.Tsit5(),
            t0=self.t0,
            t1=sorted_ts[-1],
            dt0=None,
            y0=(jnp.eye(cov0.shape[0], dtype=cov0.dtype), cov0),
            saveat=diffrax.SaveAt(ts=sorted_ts),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=100_000,
        )
        inverse = jnp.argsort(order)
        phi, cov = (y[inverse] for y in solution.ys)
        return phi, 0.5 * (cov + jnp.swapaxes(cov, -1, -2))

    def moments(self, t: ArrayLike, mean0: ArrayLike, cov0: ArrayLike) -> tuple[Array, Array]:
        """Mean and covariance at ``t`` of ``x`` started from ``N(mean0, cov0)`` at ``t0``."""
        phi, q = self.transition(t)
        return phi @ mean0, phi @ cov0 @ phi.T + q

    def marginal(self, t: ArrayLike, x0: ArrayLike) -> MultivariateNormal:
        """The Gaussian kernel ``p(x_t | x_{t0} = x0)``."""
        phi, q = self.transition(t)
        return MultivariateNormal(phi @ jnp.asarray(x0), q)

    @property
    def prior(self) -> MultivariateNormal:
        """``N(0, Q(t1))``: the kernel at ``t1`` with the (small) ``Φ x0`` term dropped."""
        return MultivariateNormal(jnp.zeros(self.dim), self.transition(self.t1)[1])

    def __check_init__(self):
        t = jnp.asarray(self.t0, dtype=jnp.result_type(float))
        f = jax.eval_shape(self.drift_matrix, t).shape
        l = jax.eval_shape(self.diffusion_matrix, t).shape
        if len(f) != 2 or f[0] != f[1]:
            raise ValueError(f"F(t) must be a square matrix, got shape {f}")
        if len(l) != 2 or l[0] != f[0]:
            raise ValueError(f"L(t) must have shape ({f[0]}, m), got {l}")


class LinearSDE(AbstractLinearSDE):
    """A linear SDE from two functions ``F(t) -> (d, d)`` and ``L(t) -> (d, m)``."""

    drift_matrix_fn: Callable[[Array], Array]
    diffusion_matrix_fn: Callable[[Array], Array]
    t0: float = eqx.field(static=True)
    t1: float = eqx.field(static=True)

    def __init__(self, F, L, t0: float = 0.0, t1: float = 1.0):
        if not (callable(F) and callable(L)):
            raise TypeError("F and L must be callables t -> matrix")
        self.drift_matrix_fn, self.diffusion_matrix_fn = F, L
        self.t0, self.t1 = float(t0), float(t1)

    def drift_matrix(self, t):
        return jnp.asarray(self.drift_matrix_fn(t))

    def diffusion_matrix(self, t):
        return jnp.asarray(self.diffusion_matrix_fn(t))


class CriticallyDampedLangevin(AbstractLinearSDE):
    """Critically-damped Langevin diffusion (Dockhorn et al. 2022) on ``u = (x, v) ∈ R^{2n}``:

        dx = β M⁻¹ v dt,    dv = −β (x + Γ M⁻¹ v) dt + √(2Γβ) dw,    Γ = 2√M (critical).

    Data sit in ``x``; velocities start as ``v ~ N(0, γ M I)`` (``velocity_std``).
    """

    n: int = eqx.field(static=True, kw_only=True)
    mass: float = 0.25
    beta: float = 4.0
    gamma: float = 0.04
    t0: float = eqx.field(default=0.0, static=True)
    t1: float = eqx.field(default=1.0, static=True)

    def __check_init__(self):
        if self.n < 1:
            raise ValueError("n (the data dimension) must be ≥ 1")
        for name in ("mass", "beta", "gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    @property
    def friction(self) -> float:
        return 2 * math.sqrt(self.mass)

    @property
    def velocity_std(self) -> float:
        return math.sqrt(self.gamma * self.mass)

    def drift_matrix(self, t):
        block = self.beta * jnp.array([[0.0, 1 / self.mass], [-1.0, -self.friction / self.mass]])
        return jnp.kron(block, jnp.eye(self.n)) + 0 * jnp.asarray(t)

    def diffusion_matrix(self, t):
        column = jnp.array([[0.0], [math.sqrt(2 * self.friction * self.beta)]])
        return jnp.kron(column, jnp.eye(self.n)) + 0 * jnp.asarray(t)
