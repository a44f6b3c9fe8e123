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

from ._checks import is_concrete, require
from .schedule import VP, AbstractScheduleSDE
from .sde import AbstractSDE


class AbstractTimeGrid(eqx.Module):
    """A monotone map ``τ ↦ t`` with ``t(0) = t_start`` and ``t(1) = t_end``."""

    @abc.abstractmethod
    def map(self, sde: AbstractSDE, t_start: float, t_end: float, tau: ArrayLike) -> Array:
        """Forward time at ``τ ∈ [0, 1]`` (before clipping round-off to ``[t_end, t_start]``)."""

    def time(self, sde: AbstractSDE, t_start: float, t_end: float, tau: ArrayLike) -> Array:
        """Forward time at ``τ ∈ [0, 1]`` (round-off clipped; ``dt/dτ`` is the map's own)."""
        t = self.map(sde, t_start, t_end, tau)
        return t + jax.lax.stop_gradient(jnp.clip(t, t_end, t_start) - t)

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
        with jax.ensure_compile_time_eval():
            if is_concrete(t_end) and not bool(sde.sigma(t_end) > 0):
                raise ValueError("UniformLogSNR cannot reach σ = 0 (λ = ∞): end at t_end > t0 or use KarrasSigma")
        lam0, lam1 = sde.log_snr(t_start), sde.log_snr(t_end)
        return sde.t_from_log_snr(lam0 + tau * (lam1 - lam0))


class UniformTimeOf(AbstractTimeGrid):
    """Equal time steps of another schedule, carried over by log-SNR: ``λ(t) = λ_ref(u)`` with ``u``
    linear in ``τ`` between the reference times whose log-SNR is that of ``t_start`` and ``t_end``.

    ``UniformTimeOf(VP())`` is DDPM's "linspace" spacing on any schedule: on the d = 64 mixture
    (EDM σ from 80 to 0.002) UniPC-3 reaches trajectory errors 0.235 at 5 NFE and 0.112 at 10
    (Karras ρ = 7: 0.358 and 0.246), but 0.040 at 20 (Karras: 0.033).
    """

    schedule: AbstractScheduleSDE = VP()

    def __check_init__(self):
        if not isinstance(self.schedule, AbstractScheduleSDE):
            raise TypeError(f"schedule must be a ScheduleSDE (e.g. sd.VP()), got {type(self.schedule).__name__}")

    def map(self, sde, t_start, t_end, tau):
        sde, ref = _noise_levels(sde, "UniformTimeOf"), self.schedule

        def carried(source, target, t):  # the time of ``target`` with the log-SNR of ``source`` at t
            lam = jnp.clip(source.log_snr(t), target.log_snr(target.t1), target.log_snr(target.t0))
            return target.t_from_log_snr(lam)

        u_start, u_end = carried(sde, ref, t_start), carried(sde, ref, t_end)
        return carried(ref, sde, u_start + tau * (u_end - u_start))


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
    """A user's decreasing times ``t_0 > … > t_N`` at ``τ_i = i/N``, joined by the monotone cubic
    (Fritsch–Carlson) interpolant: ``t(τ)`` and ``t'(τ)`` are continuous, so an ODE solver in ``τ``
    sees no slope jump at the knots.

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
        n = self.ts.shape[0] - 1
        secant = jnp.diff(self.ts) * n  # slopes dt/dτ of the segments (all < 0)
        inner = jnp.where(
            secant[:-1] * secant[1:] > 0, 2 / (1 / secant[:-1] + 1 / secant[1:]), 0.0
        )  # harmonic mean at interior knots keeps the interpolant monotone
        slopes = jnp.concatenate([secant[:1], inner, secant[-1:]])
        u = jnp.clip(tau, 0.0, 1.0) * n
        i = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, n - 1)
        s = u - i
        h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
        return h00 * self.ts[i] + h01 * self.ts[i + 1] + (h10 * slopes[i] + h11 * slopes[i + 1]) / n

    def times(self, sde, t_start, t_end, num_steps):
        if num_steps != self.ts.shape[0] - 1:
            raise ValueError(f"GivenTimes holds {self.ts.shape[0] - 1} steps, the method asks for {num_steps}")
        require(
            (self.ts[0] == t_start) & (self.ts[-1] == t_end),
            f"GivenTimes runs from {self.ts[0]} to {self.ts[-1]}: pass t_start and t_end to match",
        )
        return self.ts
