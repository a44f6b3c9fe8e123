"""SDEs defined by their Gaussian kernel ``x_t = α(t) x0 + σ(t) ε`` (x0 clean data).

From ``α`` and ``σ`` alone, by autodiff:

    f(t) = (log α)'(t),      g²(t) = (σ²)'(t) − 2 f(t) σ²(t),      λ(t) = log(α²/σ²),

so that ``dx = f(t) x dt + g(t) dw`` has exactly these marginals. Presets give closed forms
(and a closed-form inverse of the log-SNR λ where one exists); everything else is derived.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._checks import check_time, require
from .distributions import Normal
from .sde import AbstractSDE

_GRID = 257  # points on which a schedule is validated at construction


def _float(t: ArrayLike) -> Array:
    return jnp.asarray(t, dtype=jnp.result_type(float))


class AbstractScheduleSDE(AbstractSDE):
    """``dx = f(t) x dt + g(t) dw`` with marginals ``x_t | x0 ~ N(α(t) x0, σ(t)² I)``."""

    @abc.abstractmethod
    def alpha(self, t: ArrayLike) -> Array:
        """Signal scale ``α(t) > 0``."""

    @abc.abstractmethod
    def sigma(self, t: ArrayLike) -> Array:
        """Noise scale ``σ(t) ≥ 0`` (positive after ``t0``)."""

    def log_alpha(self, t: ArrayLike) -> Array:
        return jnp.log(self.alpha(t))

    def sigma2(self, t: ArrayLike) -> Array:
        """``σ(t)²`` (presets write it so that its derivative is finite at σ = 0)."""
        return self.sigma(t) ** 2

    def f(self, t: ArrayLike) -> Array:
        """Drift coefficient ``f(t) = d log α / dt``."""
        return jax.grad(self.log_alpha)(_float(t))

    def g2(self, t: ArrayLike) -> Array:
        """Squared diffusion ``g²(t) = dσ²/dt − 2 f(t) σ²(t)``."""
        t = _float(t)
        return jax.grad(self.sigma2)(t) - 2 * self.f(t) * self.sigma2(t)

    def g(self, t: ArrayLike) -> Array:
        return jnp.sqrt(self.g2(t))

    def drift(self, t, x):
        return self.f(t) * x

    def diffusion(self, t, x):
        return self.g(t)

    def diffusion_depends_on_x(self, x):
        return False

    def log_snr(self, t: ArrayLike) -> Array:
        """``λ(t) = log(α²/σ²)``, strictly decreasing."""
        t = _float(t)
        return 2 * self.log_alpha(t) - jnp.log(self.sigma2(t))

    def t_from_log_snr(self, log_snr: ArrayLike) -> Array:
        """Inverse of ``log_snr`` on ``[t0, t1]`` (presets override in closed form): bisection, with
        the implicit derivative ``dt/dλ = 1/λ'(t)`` (bisection itself has derivative zero)."""
        lo, hi = self.log_snr(self.t1), self.log_snr(self.t0)

        @jax.custom_jvp
        def invert(lam):
            def halve(_, bounds):
                a, b = bounds
                mid = 0.5 * (a + b)
                above = self.log_snr(mid) > lam  # still too little noise: move right
                return jnp.where(above, mid, a), jnp.where(above, b, mid)

            start = (jnp.full_like(lam, self.t0), jnp.full_like(lam, self.t1))
            a, b = jax.lax.fori_loop(0, 80, halve, start)
            return 0.5 * (a + b)

        @invert.defjvp
        def invert_jvp(primals, tangents):
            t = invert(primals[0])
            return t, tangents[0] / jax.grad(self.log_snr)(t)

        lam = _float(log_snr)
        lam = eqx.error_if(lam, (lam < lo) | (lam > hi), "log_snr outside [λ(t1), λ(t0)]")
        return invert(lam)

    def transition(self, t: ArrayLike) -> tuple[Array, Array]:
        """``(α(t), σ(t)²)``: ``x_t | x0 ~ N(α x0, σ² I)``."""
        t = check_time(t, self.t0, self.t1)
        return self.alpha(t), self.sigma2(t)

    def marginal(self, t: ArrayLike, x0: ArrayLike) -> Normal:
        """The Gaussian kernel ``p(x_t | x0)``."""
        t = check_time(t, self.t0, self.t1)
        return Normal(self.alpha(t) * jnp.asarray(x0), self.sigma(t))

    @property
    def prior(self) -> Normal:
        """``N(0, σ(t1)² I)``: the kernel at ``t1`` with the (small) signal term dropped."""
        return Normal(0.0, self.sigma(self.t1))

    def __check_init__(self):
        if not self.t0 < self.t1:
            return  # AbstractSDE reports the empty domain
        ts = jnp.linspace(self.t0, self.t1, _GRID, dtype=jnp.result_type(float))
        alpha, sigma = jax.vmap(self.alpha)(ts), jax.vmap(self.sigma)(ts)
        name = type(self).__name__
        require(jnp.isfinite(alpha) & (alpha > 0), f"{name}: α(t) must be finite and > 0 on [t0, t1]")
        require(jnp.isfinite(sigma) & (sigma >= 0), f"{name}: σ(t) must be finite and ≥ 0 on [t0, t1]")
        require(sigma[1:] > 0, f"{name}: σ(t) must be > 0 on (t0, t1]")
        lam = jax.vmap(self.log_snr)(ts[1:])
        require(jnp.diff(lam) < 0, f"{name}: log-SNR λ(t) = log(α²/σ²) must decrease strictly")
        require(jax.vmap(self.g2)(ts[1:]) > 0, f"{name}: g²(t) must be > 0 on (t0, t1]")


class ScheduleSDE(AbstractScheduleSDE):
    """A schedule from two functions ``alpha(t)`` and ``sigma(t)``."""

    alpha_fn: Callable[[Array], Array]
    sigma_fn: Callable[[Array], Array]
    t0: float = eqx.field(static=True)
    t1: float = eqx.field(static=True)

    def __init__(self, alpha, sigma, t0: float = 0.0, t1: float = 1.0):
        if not (callable(alpha) and callable(sigma)):
            raise TypeError("alpha and sigma must be callables t -> scalar")
        self.alpha_fn, self.sigma_fn = alpha, sigma
        self.t0, self.t1 = float(t0), float(t1)

    def alpha(self, t):
        return self.alpha_fn(t)

    def sigma(self, t):
        return self.sigma_fn(t)


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


class AbstractVariancePreserving(AbstractScheduleSDE):
    """``σ² = 1 − α²`` (written ``−expm1(2 log α)``, exact near t = 0); subclasses give ``log α``."""

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma2(self, t):
        return -jnp.expm1(2 * self.log_alpha(t))

    def sigma(self, t):
        return jnp.sqrt(self.sigma2(t))

    def log_snr(self, t):
        return -jnp.log(jnp.expm1(-2 * self.log_alpha(t)))


class AbstractLinearBeta(AbstractScheduleSDE):
    """``β(t) = β_min + t (β_max − β_min)`` and ``log α = −½∫₀ᵗβ = −¼t²(β_max − β_min) − ½tβ_min``."""

    beta_min: eqx.AbstractVar[float]
    beta_max: eqx.AbstractVar[float]

    def __check_init__(self):
        _positive("beta_min", self.beta_min)
        _positive("beta_max", self.beta_max)

    def beta(self, t: ArrayLike) -> Array:
        return self.beta_min + _float(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t):
        t = _float(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min


class VP(AbstractLinearBeta, AbstractVariancePreserving):
    """Variance preserving (Song et al. 2021): linear ``β``, ``σ² = 1 − α²``, ``f = −β/2``, ``g² = β``."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t0: float = eqx.field(default=0.0, static=True)
    t1: float = eqx.field(default=1.0, static=True)

    def t_from_log_snr(self, log_snr):
        # ¼(β_max−β_min) t² + ½β_min t = ½ softplus(−λ): the positive root, written stably.
        c = 0.5 * jax.nn.softplus(-_float(log_snr))
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return 2 * c / (b + jnp.sqrt(b**2 + 4 * a * c))


class SubVP(AbstractLinearBeta):
    """Sub-VP (Song et al. 2021): VP's ``α`` with ``σ = 1 − α²``, ``g² = β (1 − α⁴)``."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t0: float = eqx.field(default=0.0, static=True)
    t1: float = eqx.field(default=1.0, static=True)

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return -jnp.expm1(2 * self.log_alpha(t))


class VE(AbstractScheduleSDE):
    """Variance exploding (Song et al. 2021): ``α = 1``, ``σ = σ_min (σ_max/σ_min)^t``,

    ``g² = 2 σ² log(σ_max/σ_min)``.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t0: float = eqx.field(default=0.0, static=True)
    t1: float = eqx.field(default=1.0, static=True)

    def __check_init__(self):
        _positive("sigma_min", self.sigma_min)
        if not self.sigma_max > self.sigma_min:
            raise ValueError("VE needs sigma_max > sigma_min")

    def alpha(self, t):
        return jnp.ones_like(_float(t))

    def log_alpha(self, t):
        return jnp.zeros_like(_float(t))

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _float(t)

    def t_from_log_snr(self, log_snr):
        return (-0.5 * _float(log_snr) - math.log(self.sigma_min)) / math.log(
            self.sigma_max / self.sigma_min
        )


class EDM(AbstractScheduleSDE):
    """Karras et al. 2022: ``α = 1``, ``σ(t) = t`` on ``[σ_min, σ_max] = [0.002, 80]``, ``g² = 2t``."""

    t0: float = eqx.field(default=0.002, static=True)
    t1: float = eqx.field(default=80.0, static=True)

    def __check_init__(self):
        if not self.t0 >= 0:
            raise ValueError(f"EDM needs t0 = σ_min ≥ 0, got {self.t0}")

    def alpha(self, t):
        return jnp.ones_like(_float(t))

    def log_alpha(self, t):
        return jnp.zeros_like(_float(t))

    def sigma(self, t):
        return _float(t)

    def t_from_log_snr(self, log_snr):
        return jnp.exp(-0.5 * _float(log_snr))


class CosineVP(AbstractVariancePreserving):
    """Cosine schedule (Nichol & Dhariwal 2021): ``α = cos(π/2 (t+s)/(1+s)) / cos(π/2 s/(1+s))``,

    ``σ² = 1 − α²``. ``t1 = 0.9946`` as in DPM-Solver (α → 0 at t = 1 makes f infinite).
    """

    s: float = 0.008
    t0: float = eqx.field(default=0.0, static=True)
    t1: float = eqx.field(default=0.9946, static=True)

    def __check_init__(self):
        _positive("s", self.s)
        if not self.t1 < 1:
            raise ValueError("CosineVP needs t1 < 1 (α(1) = 0)")

    def _angle(self, t):
        return 0.5 * math.pi * (_float(t) + self.s) / (1 + self.s)

    @property
    def _cos0(self) -> float:
        return math.cos(0.5 * math.pi * self.s / (1 + self.s))

    def log_alpha(self, t):
        return jnp.log(jnp.cos(self._angle(t))) - math.log(self._cos0)

    def t_from_log_snr(self, log_snr):
        alpha = jnp.sqrt(jax.nn.sigmoid(_float(log_snr)))
        angle = jnp.arccos(alpha * self._cos0)
        return angle * (1 + self.s) * 2 / math.pi - self.s


class RectifiedFlow(AbstractScheduleSDE):
    """Linear interpolant (Liu et al. 2023; Lipman et al. 2023): ``α = 1 − t``, ``σ = t``,

    ``g² = 2t/(1 − t)``. ``t1 = 0.999`` because f = −1/(1 − t) is infinite at t = 1.
    """

    t0: float = eqx.field(default=0.0, static=True)
    t1: float = eqx.field(default=0.999, static=True)

    def __check_init__(self):
        if not (self.t0 >= 0 and self.t1 < 1):
            raise ValueError("RectifiedFlow needs 0 ≤ t0 < t1 < 1")

    def alpha(self, t):
        return 1 - _float(t)

    def log_alpha(self, t):
        return jnp.log1p(-_float(t))

    def sigma(self, t):
        return _float(t)

    def t_from_log_snr(self, log_snr):
        return jax.nn.sigmoid(-0.5 * _float(log_snr))
