"""What a model predicts, and its conversion to score and denoiser under a schedule SDE.

For ``x_t = α x0 + σ ε`` (a ``ScheduleSDE``) every prediction determines the others:

    score = −ε/σ = (α D − x)/σ²,    D = E[x0 | x_t] = (x − σ ε)/α,
    v = dx_t/dt = α' x0 + σ' ε  (the flow-matching velocity; v = ε − x0 for rectified flow).

Samplers consume these types, never raw functions; a plain callable passed to ``sample`` is read
as a ``Score``. ``fn`` takes one example ``(t, x)``; ``Network`` makes such a function of a flax
NNX network, e.g. ``sd.Noise(sd.Network(net, sde))`` or ``sd.EDMPreconditioned(sd.Network(net, sde))``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, PyTree

from .schedule import AbstractScheduleSDE
from .sde import AbstractSDE


def _schedule(sde: AbstractSDE, what: str) -> AbstractScheduleSDE:
    if not isinstance(sde, AbstractScheduleSDE):
        raise TypeError(
            f"{what} needs a ScheduleSDE (x_t = α x0 + σ ε); for {type(sde).__name__} use a Score model"
        )
    return sde


def noise_level(sde: AbstractSDE, t: ArrayLike) -> Array:
    """The network's time input ``c_noise``: ``¼ log(σ/α) = −λ/8`` (EDM's ``¼ ln σ``, of order one
    on every schedule; ``σ/α`` floored at 1e-8 where ``σ(t0) = 0``) for a ``ScheduleSDE``, and
    ``(t − t0)/(t1 − t0)`` for any other SDE."""
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    if isinstance(sde, AbstractScheduleSDE):
        return jnp.log(jnp.maximum(sde.sigma(t) / sde.alpha(t), 1e-8)) / 4
    return (t - sde.t0) / (sde.t1 - sde.t0)


class Network(eqx.Module):
    """A flax NNX network ``net(x, c_noise, label) -> y`` on batches, as a function ``fn(t, x)`` of
    one example: ``net(x[None], c[None], label[None])[0]`` with ``c = noise_level(sde, t)``, cast to
    ``x.dtype``. ``label`` is one integer class, or ``None``: ``net(x[None], c[None])[0]`` (the null
    class of a class-conditional net; a net without classes need not take labels). ``sd.with_label`` sets it in every ``Network`` of a model.

    Holds the split NNX state (``graphdef`` static, ``state`` a pytree), so a model containing it
    is an ordinary equinox pytree: jit, grad, EMA and checkpoints act on ``state``.
    """

    graphdef: nnx.GraphDef = eqx.field(static=True)
    state: nnx.State
    sde: AbstractSDE
    label: Array | None

    def __init__(self, net: nnx.Module, sde: AbstractSDE, label: ArrayLike | None = None):
        if not isinstance(net, nnx.Module):
            raise TypeError(f"Network wraps a flax nnx.Module, got {type(net).__name__}")
        if not isinstance(sde, AbstractSDE):
            raise TypeError(f"sde must be an sde_diffusion SDE, got {type(sde).__name__}")
        self.graphdef, self.state = nnx.split(net)
        self.sde = sde
        self.label = _as_label(label)

    @property
    def module(self) -> nnx.Module:
        """The network as an NNX module (a fresh merge of ``graphdef`` and ``state``)."""
        return nnx.merge(self.graphdef, self.state)

    def __call__(self, t: ArrayLike, x: Array) -> Array:
        x = jnp.asarray(x)
        if self.label is not None and self.label.ndim:
            raise ValueError("a Network with a batch of labels is evaluated on batches (Network.batch)")
        c = noise_level(self.sde, t)
        labels = () if self.label is None else (self.label[None],)
        return self.module(x[None], c[None], *labels)[0].astype(x.dtype)

    def batch(self, t: Array, x: Array) -> Array:
        """``fn`` on a batch, ``t (B,)`` and ``x (B, ...)``, in one network call: the same values as
        ``jax.vmap(fn)``, whose gradient is 1.2× slower on CPU (size-1 batch axes under ``vmap``)."""
        x = jnp.asarray(x)
        c = jax.vmap(lambda s: noise_level(self.sde, s))(t)
        labels = () if self.label is None else (jnp.broadcast_to(self.label, c.shape),)
        return self.module(x, c, *labels).astype(x.dtype)


def _as_label(label: ArrayLike | None) -> Array | None:
    if label is None:
        return None
    label = jnp.asarray(label)
    if label.ndim > 1 or not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(f"a label is one integer class (or a batch (B,) of them, or None), got {label!r}")
    return label.astype(jnp.int32)


def with_label(model: PyTree, label: ArrayLike | None) -> PyTree:
    """``model`` with ``label`` (one integer class, or ``None`` for the null class) in each of its
    ``Network``s. The label is an array leaf, so a jitted sampler does not recompile per class. A
    batch of labels ``(B,)`` goes with batch evaluation (``predict_batch``), as in the losses."""
    label = _as_label(label)
    networks = [n for n in jax.tree.leaves(model, is_leaf=_is_network) if _is_network(n)]
    if not networks:
        raise TypeError(
            "with_label acts on the sd.Network inside a model (e.g. sd.EDMPreconditioned(sd.Network(net, sde))); "
            f"{type(model).__name__} holds none"
        )
    return jax.tree.map(
        lambda n: eqx.tree_at(lambda m: m.label, n, label, is_leaf=lambda v: v is None) if _is_network(n) else n,
        model,
        is_leaf=_is_network,
    )


def _is_network(node) -> bool:
    return isinstance(node, Network)


class AbstractPrediction(eqx.Module):
    """A model of the data under ``sde``: gives ``score`` and ``denoiser`` of one example. The
    parametrizations (``AbstractParametrization``) wrap a function ``fn(t, x)`` predicting one
    quantity; guidance (``sd.ClassifierFreeGuidance``, ...) wraps other predictions."""

    @abc.abstractmethod
    def score(self, sde: AbstractSDE, t: ArrayLike, x: Array) -> Array:
        """``∇ log p_t(x)``."""

    @abc.abstractmethod
    def denoiser(self, sde: AbstractSDE, t: ArrayLike, x: Array) -> Array:
        """``D(x, t) = E[x0 | x_t = x]``."""


class AbstractParametrization(AbstractPrediction):
    """A prediction made by ``fn``. Its ``score`` and ``denoiser`` also take a batch, ``t (B,)`` and
    ``x (B, ...)``: the same values as ``jax.vmap`` over examples, with a ``Network`` called once on
    the batch (``predict_batch`` uses this)."""

    fn: eqx.AbstractVar[Callable[[Array, Array], Array]]

    def output(self, t: Array, x: Array) -> Array:
        """``fn(t, x)`` on one example or a batch (one call of a ``Network``, else ``vmap``)."""
        if jnp.ndim(t) == 0:
            return self.fn(t, x)
        if isinstance(self.fn, Network):
            return self.fn.batch(t, x)
        return jax.vmap(self.fn)(t, x)


def _coefficient(f: Callable[[Array], Array], t: ArrayLike, x: Array) -> Array:
    """``f(t)`` for one example, or ``f`` per example of a batch (``t`` of shape ``(B,)``) shaped
    to broadcast against ``x (B, ...)``."""
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    if t.ndim == 0:
        return f(t)
    return jax.tree.map(lambda v: v.reshape(v.shape + (1,) * (jnp.ndim(x) - v.ndim)), jax.vmap(f)(t))


def predict_batch(model: AbstractPrediction, what: str, sde: AbstractSDE, t: Array, x: Array) -> Array:
    """``model.score`` (``what="score"``) or ``model.denoiser`` on a batch ``t (B,)``, ``x (B, ...)``:
    one network call for a parametrization, ``jax.vmap`` over examples for any other prediction."""
    if isinstance(model, AbstractParametrization):
        return getattr(model, what)(sde, t, x)
    return jax.vmap(getattr(model, what), in_axes=(None, 0, 0))(sde, t, x)


class Score(AbstractParametrization):
    """``fn`` predicts ``∇ log p_t``; works with any SDE (denoiser: schedule SDEs only)."""

    fn: Callable[[Array, Array], Array]

    def score(self, sde, t, x):
        return self.output(t, x)

    def denoiser(self, sde, t, x):
        sde = _schedule(sde, "the denoiser of a score")
        sigma2, alpha = _coefficient(sde.sigma2, t, x), _coefficient(sde.alpha, t, x)
        return (x + sigma2 * self.output(t, x)) / alpha


def _score_of_denoiser(sde: AbstractScheduleSDE, t: ArrayLike, x: Array, denoised: Array) -> Array:
    return (_coefficient(sde.alpha, t, x) * denoised - x) / _coefficient(sde.sigma2, t, x)


class Denoiser(AbstractParametrization):
    """``fn`` predicts ``D = E[x0 | x_t]`` (x0-prediction)."""

    fn: Callable[[Array, Array], Array]

    def score(self, sde, t, x):
        return _score_of_denoiser(_schedule(sde, "a denoiser"), t, x, self.output(t, x))

    def denoiser(self, sde, t, x):
        return self.output(t, x)


class Noise(AbstractParametrization):
    """``fn`` predicts the noise ``ε`` (ε-prediction)."""

    fn: Callable[[Array, Array], Array]

    def score(self, sde, t, x):
        return -self.output(t, x) / _coefficient(_schedule(sde, "an ε-prediction").sigma, t, x)

    def denoiser(self, sde, t, x):
        sde = _schedule(sde, "an ε-prediction")
        sigma, alpha = _coefficient(sde.sigma, t, x), _coefficient(sde.alpha, t, x)
        return (x - sigma * self.output(t, x)) / alpha


class Velocity(AbstractParametrization):
    """``fn`` predicts ``v = α' x0 + σ' ε``; with ``x = α x0 + σ ε`` and ``det = α σ' − σ α'``:

    ``D = (σ' x − σ v)/det``.
    """

    fn: Callable[[Array, Array], Array]

    def score(self, sde, t, x):
        return _score_of_denoiser(_schedule(sde, "a velocity"), t, x, self.denoiser(sde, t, x))

    def denoiser(self, sde, t, x):
        sde = _schedule(sde, "a velocity")

        def coefficients(s):
            alpha, dalpha = jax.jvp(sde.alpha, (s,), (jnp.ones_like(s),))
            sigma, dsigma = jax.jvp(sde.sigma, (s,), (jnp.ones_like(s),))
            return dsigma, sigma, alpha * dsigma - sigma * dalpha

        dsigma, sigma, det = _coefficient(coefficients, t, x)
        return (dsigma * x - sigma * self.output(t, x)) / det


class EDMPreconditioned(AbstractParametrization):
    """EDM preconditioning (Karras et al. 2022), on ``x̂ = x/α`` with ``σ̃ = σ/α`` for any schedule:

        D = c_skip x̂ + c_out fn(t, c_in x̂),   c_skip = σd²/(σ̃² + σd²),
        c_out = σ̃ σd / √(σ̃² + σd²),   c_in = 1/√(σ̃² + σd²),

    and ``fn``'s time input is ``c_noise = ¼ ln σ̃`` when ``fn`` is a ``Network``. ``sigma_data``
    is the data standard deviation ``σd``.
    """

    fn: Callable[[Array, Array], Array]
    sigma_data: float = 0.5

    def __check_init__(self):
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")

    def score(self, sde, t, x):
        return _score_of_denoiser(_schedule(sde, "EDM preconditioning"), t, x, self.denoiser(sde, t, x))

    def denoiser(self, sde, t, x):
        sde = _schedule(sde, "EDM preconditioning")
        alpha = _coefficient(sde.alpha, t, x)
        x_hat, sigma = x / alpha, _coefficient(sde.sigma, t, x) / alpha
        norm2 = sigma**2 + self.sigma_data**2
        c_skip = self.sigma_data**2 / norm2
        c_out = sigma * self.sigma_data * jax.lax.rsqrt(norm2)
        return c_skip * x_hat + c_out * self.output(t, x_hat * jax.lax.rsqrt(norm2))


def as_prediction(model: AbstractPrediction | Callable[[Array, Array], Array]) -> AbstractPrediction:
    """``model`` itself, or a plain callable read as a ``Score``."""
    if isinstance(model, AbstractPrediction):
        return model
    if callable(model):
        return Score(model)
    raise TypeError(f"model must be a prediction (sd.Score, sd.Denoiser, ...) or a callable, got {model!r}")
