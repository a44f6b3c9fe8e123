"""Time grids from ``t_start`` (noisy) to ``t_end`` (clean), as monotone maps ``τ ∈ [0, 1] → t``.

A fixed-step sampler with ``N`` steps uses ``t(i/N)``; an ODE solver may also integrate in ``τ``
itself (``dx/dτ = dx/dt · t'(τ)``), which keeps the field smooth when the map follows the
noise level (log-SNR, Karras). Noise-level grids need a ``ScheduleSDE``; ``σ̂ = σ/α = e^{−λ/2}``
is the noise level of ``x/α`` (EDM's σ).
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._checks import require
from .schedule import AbstractScheduleSDE
from .sde import AbstractSDE


class AbstractTimeGrid(eqx.Module):
    """A monotone map ``τ ↦ t`` with ``t(0) = t_start`` and ``t(1) = t_end``."""

    @abc.abstractmethod
    def map(self, sde: AbstractSDE, t_start: float, t_end: float, tau: ArrayLike) -> Array:
        """Forward time at ``τ ∈ [0, 1]`` (before clipping round-off to ``[t_end, t_start]``)."""

    def time(self, sde: AbstractSDE, t_start: float, t_end: float, tau: ArrayLike) -> Array:
        """Forward time at ``τ ∈ [0, 1]``."""
        return jnp.clip(self.map(sde, t_start, t_end, tau), t_end, t_start)

    def times(self, sde: AbstractSDE, t_start: float, t_end: float, num_steps: int) -> Array:
        """``num_steps + 1`` times from ``t_start`` down to ``t_end``."""
        taus = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.result_type(float))
        ts = jax.vmap(lambda tau: self.time(sde, t_start, t_end, tau))(taus)
        return ts.at[0].set(t_start).at[-1].set(t_end)  # exact ends despite round-off


def _noise_levels(sde: AbstractSDE, grid: str) -> AbstractScheduleSDE:
    if not isinstance(sde, AbstractScheduleSDE):
        raise TypeError(f"{grid} needs a ScheduleSDE (a noise level σ/α); use UniformTime for {type(sde).__name__}")
    return sde


class UniformTime(AbstractTimeGrid):
    """``t = t_start + τ (t_end − t_start)``."""

    def map(self, sde, t_start, t_end, tau):
        return t_start + tau * (t_end - t_start)


class QuadraticTime(AbstractTimeGrid):
    """``t = t_end + (t_start − t_end)(1 − τ)²``: steps shrink towards the data (DDIM's quadratic)."""

    def map(self, sde, t_start, t_end, tau):
        return t_end + (t_start - t_end) * (1 - tau) ** 2


class UniformLogSNR(AbstractTimeGrid):
    """``λ(t)`` linear in ``τ``: equal steps of log-SNR (needs ``σ(t_end) > 0``)."""

    def map(self, sde, t_start, t_end, tau):
        sde = _noise_levels(sde, "UniformLogSNR")
        lam0, lam1 = sde.log_snr(t_start), sde.log_snr(t_end)
        return sde.t_from_log_snr(lam0 + tau * (lam1 - lam0))


class KarrasSigma(AbstractTimeGrid):
    """Karras et al. (2022): ``σ̂^{1/ρ}`` linear in ``τ`` (``ρ = 7``); ``σ̂(t_end) = 0`` allowed."""

    rho: float = 7.0

    def __check_init__(self):
        if not self.rho > 0:
            raise ValueError("rho must be > 0")

    def map(self, sde, t_start, t_end, tau):
        sde = _noise_levels(sde, "KarrasSigma")
        lo, hi = (jnp.exp(-sde.log_snr(t) / (2 * self.rho)) for t in (t_end, t_start))
        sigma_hat = (hi + tau * (lo - hi)) ** self.rho
        t = sde.t_from_log_snr(-2 * jnp.log(jnp.maximum(sigma_hat, jnp.finfo(sigma_hat.dtype).tiny)))
        return jnp.where(tau >= 1, t_end, t)


class GivenTimes(AbstractTimeGrid):
    """A user's decreasing times ``t_0 > … > t_N``, linear in ``τ`` between ``τ_i = i/N``.

    ``times(..., num_steps)`` returns them exactly when ``num_steps = N`` (and the ends match).
    """

    ts: Array

    def __init__(self, ts: ArrayLike):
        ts = jnp.asarray(ts, dtype=jnp.result_type(float))
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"need at least two times in a 1-D array, got shape {ts.shape}")
        require(jnp.diff(ts) < 0, "GivenTimes must decrease strictly (from noise to data)")
        self.ts = ts

    def map(self, sde, t_start, t_end, tau):
        grid = jnp.linspace(0.0, 1.0, self.ts.shape[0], dtype=self.ts.dtype)
        return jnp.interp(tau, grid, self.ts)

    def times(self, sde, t_start, t_end, num_steps):
        if num_steps != self.ts.shape[0] - 1:
            raise ValueError(f"GivenTimes holds {self.ts.shape[0] - 1} steps, the method asks for {num_steps}")
        require(
            (self.ts[0] == t_start) & (self.ts[-1] == t_end),
            f"GivenTimes runs from {self.ts[0]} to {self.ts[-1]}: pass t_start and t_end to match",
        )
        return self.ts
