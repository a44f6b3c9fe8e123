"""What a model predicts, and its conversion to score and denoiser under a schedule SDE.

For ``x_t = α x0 + σ ε`` (a ``ScheduleSDE``) every prediction determines the others:

    score = −ε/σ = (α D − x)/σ²,    D = E[x0 | x_t] = (x − σ ε)/α,
    v = dx_t/dt = α' x0 + σ' ε  (the flow-matching velocity; v = ε − x0 for rectified flow).

Samplers consume these types, never raw functions; a plain callable passed to ``sample`` is read
as a ``Score``. ``fn`` takes one example ``(t, x)``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .schedule import AbstractScheduleSDE
from .sde import AbstractSDE


def _schedule(sde: AbstractSDE, what: str) -> AbstractScheduleSDE:
    if not isinstance(sde, AbstractScheduleSDE):
        raise TypeError(
            f"{what} needs a ScheduleSDE (x_t = α x0 + σ ε); for {type(sde).__name__} use a Score model"
        )
    return sde


class AbstractPrediction(eqx.Module):
    """A function ``fn(t, x)`` predicting one quantity; gives ``score`` and ``denoiser``."""

    fn: eqx.AbstractVar[Callable[[Array, Array], Array]]

    @abc.abstractmethod
    def score(self, sde: AbstractSDE, t: ArrayLike, x: Array) -> Array:
        """``∇ log p_t(x)``."""

    @abc.abstractmethod
    def denoiser(self, sde: AbstractSDE, t: ArrayLike, x: Array) -> Array:
        """``D(x, t) = E[x0 | x_t = x]``."""


class Score(AbstractPrediction):
    """``fn`` predicts ``∇ log p_t``; works with any SDE (denoiser: schedule SDEs only)."""

    fn: Callable[[Array, Array], Array]

    def score(self, sde, t, x):
        return self.fn(t, x)

    def denoiser(self, sde, t, x):
        sde = _schedule(sde, "the denoiser of a score")
        return (x + sde.sigma2(t) * self.fn(t, x)) / sde.alpha(t)


class Denoiser(AbstractPrediction):
    """``fn`` predicts ``D = E[x0 | x_t]`` (x0-prediction)."""

    fn: Callable[[Array, Array], Array]

    def score(self, sde, t, x):
        sde = _schedule(sde, "a denoiser")
        return (sde.alpha(t) * self.fn(t, x) - x) / sde.sigma2(t)

    def denoiser(self, sde, t, x):
        return self.fn(t, x)


class Noise(AbstractPrediction):
    """``fn`` predicts the noise ``ε`` (ε-prediction)."""

    fn: Callable[[Array, Array], Array]

    def score(self, sde, t, x):
        return -self.fn(t, x) / _schedule(sde, "an ε-prediction").sigma(t)

    def denoiser(self, sde, t, x):
        sde = _schedule(sde, "an ε-prediction")
        return (x - sde.sigma(t) * self.fn(t, x)) / sde.alpha(t)


class Velocity(AbstractPrediction):
    """``fn`` predicts ``v = α' x0 + σ' ε``; with ``x = α x0 + σ ε`` and ``det = α σ' − σ α'``:

    ``D = (σ' x − σ v)/det``.
    """

    fn: Callable[[Array, Array], Array]

    def score(self, sde, t, x):
        sde = _schedule(sde, "a velocity")
        return (sde.alpha(t) * self.denoiser(sde, t, x) - x) / sde.sigma2(t)

    def denoiser(self, sde, t, x):
        sde = _schedule(sde, "a velocity")
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        alpha, dalpha = jax.jvp(sde.alpha, (t,), (jnp.ones_like(t),))
        sigma, dsigma = jax.jvp(sde.sigma, (t,), (jnp.ones_like(t),))
        return (dsigma * x - sigma * self.fn(t, x)) / (alpha * dsigma - sigma * dalpha)


def as_prediction(model: AbstractPrediction | Callable[[Array, Array], Array]) -> AbstractPrediction:
    """``model`` itself, or a plain callable read as a ``Score``."""
    if isinstance(model, AbstractPrediction):
        return model
    if callable(model):
        return Score(model)
    raise TypeError(f"model must be a prediction (sd.Score, sd.Denoiser, ...) or a callable, got {model!r}")
