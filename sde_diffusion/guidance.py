"""Conditional generation as transformations of a model. Each wraps predictions and is itself a
prediction (``score`` and ``denoiser``), so every sampler takes it unchanged:

    classifier-free guidance     D = D_∅ + w (D_y − D_∅)                   (inside a σ/α interval)
    classifier guidance          s = s_θ + w ∇ₓ log p_t(y | x)
    inpainting (replacement)     D = m ⊙ y + (1 − m) ⊙ D_θ
    linear inverse problem       s = s_θ + w ∇ₓ log N(y; A D_θ(x, t), σ_y² I)   (DPS)

with ``D = (x + σ² s)/α`` relating denoiser and score on a ``ScheduleSDE``. A condition (label,
mask, observation) is an array leaf: a jitted sampler runs a new one without recompiling.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._checks import check_finite, check_shape
from .parametrization import AbstractPrediction, _schedule, _score_of_denoiser, as_prediction
from .sde import AbstractSDE


def _shifted_denoiser(sde, t, denoised: Array, score_shift: Array) -> Array:
    """The denoiser of ``s + δ`` where ``denoised`` is that of ``s``: ``D + σ² δ/α``."""
    sde = _schedule(sde, "a denoiser")
    return denoised + sde.sigma2(t) / sde.alpha(t) * score_shift


def _scale(scale: ArrayLike) -> Array:
    scale = jnp.asarray(scale, dtype=jnp.result_type(float))
    if scale.shape != ():
        raise ValueError(f"scale must be a scalar, got shape {scale.shape}")
    return scale


class ClassifierFreeGuidance(AbstractPrediction):
    """``D = D_∅ + w (D_y − D_∅)`` (equally ``s = s_∅ + w (s_y − s_∅)``) where the noise level
    ``σ/α`` lies in ``interval = (lo, hi]``, and ``D_y`` elsewhere (Kynkäänniemi et al. 2024).

    ``conditional`` and ``unconditional`` are predictions, usually one label-conditional network
    trained with ``LabelDropout``: ``ClassifierFreeGuidance(sd.with_label(model, y),
    sd.with_label(model, None), scale=w)``. ``w = 1`` is the conditional model, ``w = 0`` the
    unconditional one (Ho & Salimans' guidance weight is ``w − 1``). Inside the interval each
    evaluation costs two network passes (outside, one: the branch is skipped when ``t`` is
    shared by the batch, as in every fixed-grid sampler).
    """

    conditional: AbstractPrediction
    unconditional: AbstractPrediction
    scale: Array
    interval: tuple[float, float] | None = eqx.field(static=True)

    def __init__(
        self,
        conditional,
        unconditional,
        scale: ArrayLike = 1.0,
        interval: tuple[float, float] | None = None,
    ):
        self.conditional = as_prediction(conditional)
        self.unconditional = as_prediction(unconditional)
        self.scale = _scale(scale)
        if interval is not None:
            lo, hi = (float(v) for v in interval)
            if not 0 <= lo < hi:
                raise ValueError(f"interval must be (lo, hi) with 0 ≤ lo < hi (noise levels σ/α), got {interval}")
            interval = (lo, hi)
        self.interval = interval

    def _guided(self, what: str, sde: AbstractSDE, t, x) -> Array:
        conditional = lambda: getattr(self.conditional, what)(sde, t, x)  # noqa: E731

        def guided():
            unconditional = getattr(self.unconditional, what)(sde, t, x)
            return unconditional + self.scale * (conditional() - unconditional)

        if self.interval is None:
            return guided()
        schedule = _schedule(sde, "a guidance interval in σ/α")
        ratio = schedule.sigma(t) / schedule.alpha(t)
        inside = (ratio > self.interval[0]) & (ratio <= self.interval[1])
        return jax.lax.cond(inside, guided, conditional)

    def score(self, sde, t, x):
        return self._guided("score", sde, t, x)

    def denoiser(self, sde, t, x):
        return self._guided("denoiser", sde, t, x)


class ClassifierGuidance(AbstractPrediction):
    """``s = s_θ(x, t) + w ∇ₓ log softmax(classifier(t, x))_y`` (Dhariwal & Nichol 2021), with a
    noise-conditional classifier ``classifier(t, x) -> logits`` of one example, e.g.
    ``sd.Network(sd.MLP(d, out_features=C, ...), sde)`` trained by ``sd.NoisyClassification``.
    With the exact ``log p_t(y | x)`` and ``w = 1`` this is the exact conditional score
    ``∇ log p_t(x | y)`` (Bayes). Each evaluation is one model pass and a classifier gradient.
    """

    model: AbstractPrediction
    classifier: Callable[[Array, Array], Array]
    label: Array
    scale: Array

    def __init__(self, model, classifier: Callable[[Array, Array], Array], label: ArrayLike, scale: ArrayLike = 1.0):
        if not callable(classifier):
            raise TypeError(f"classifier must be a function (t, x) -> logits, got {classifier!r}")
        label = jnp.asarray(label)
        if label.shape != () or not jnp.issubdtype(label.dtype, jnp.integer):
            raise ValueError(f"label must be one integer class, got {label!r}")
        self.model = as_prediction(model)
        self.classifier = classifier
        self.label = label.astype(jnp.int32)
        self.scale = _scale(scale)

    def class_score(self, t, x) -> Array:
        """``∇ₓ log p_t(y | x)`` of the classifier."""

        def log_prob(x):
            logits = self.classifier(t, x)
            if logits.ndim != 1:
                raise ValueError(f"the classifier must return logits of shape (C,) for one example, got {logits.shape}")
            return jax.nn.log_softmax(logits.astype(x.dtype))[self.label]

        return jax.grad(log_prob)(x)

    def score(self, sde, t, x):
        return self.model.score(sde, t, x) + self.scale * self.class_score(t, x)

    def denoiser(self, sde, t, x):
        return _shifted_denoiser(sde, t, self.model.denoiser(sde, t, x), self.scale * self.class_score(t, x))


class Inpainting(AbstractPrediction):
    """Replacement: the observed entries (``mask`` True) of the denoiser are the observation,

        D = m ⊙ y + (1 − m) ⊙ D_θ(x, t),   so   s = m ⊙ (α y − x)/σ² + (1 − m) ⊙ s_θ(x, t).

    The observed entries of ``x`` then follow the exact reverse process of the point mass ``y``,
    so at every ``t`` they are correctly noised observations ``α y + σ ε``, while the free entries
    see the model's joint score at them (Song et al. 2021's imputation, here also for ODE
    samplers). It ignores that ``p_t(x_free | y)`` differs from ``p_t(x_free | x_obs)``: biased,
    less so with ``sd.Resampling``. ``mask`` and ``observed`` have the event shape of ``x``
    (``observed`` is ignored where ``mask`` is False).
    """

    model: AbstractPrediction
    mask: Array
    observed: Array

    def __init__(self, model, mask: ArrayLike, observed: ArrayLike):
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be a boolean array (True where observed), got dtype {mask.dtype}")
        observed = jnp.asarray(observed, dtype=jnp.result_type(float))
        check_shape(observed.shape, mask.shape, "observed")
        self.model = as_prediction(model)
        self.mask = mask
        self.observed = check_finite(jnp.where(mask, observed, 0), "observed")

    def _check(self, x: Array) -> None:
        check_shape(x.shape, self.mask.shape, "x (one example; the mask's shape)")

    def score(self, sde, t, x):
        self._check(x)
        schedule = _schedule(sde, "inpainting")
        return jnp.where(self.mask, _score_of_denoiser(schedule, t, x, self.observed), self.model.score(sde, t, x))

    def denoiser(self, sde, t, x):
        self._check(x)
        _schedule(sde, "inpainting")
        return jnp.where(self.mask, self.observed, self.model.denoiser(sde, t, x))


class LinearInverseProblem(AbstractPrediction):
    """The posterior of ``y = A x0 + σ_y ξ`` by diffusion posterior sampling (DPS, Chung et al.
    2023) in score form: ``p(y | x_t)`` is replaced by ``N(y; A D_θ(x_t, t), σ_y² I)``, so

        s = s_θ + w ∇ₓ log N(y; A D_θ(x, t), σ_y² I) = s_θ − (w/σ_y²) J_Dᵀ Aᵀ (A D_θ − y).

    ``operator`` is a matrix ``(m, n)`` acting on the flattened example (``n = x.size``) or a
    linear function of one example; ``observation`` is ``y``. Exact at ``t → t0`` and wrong at
    high noise, where ``Cov[x0 | x_t]`` (ignored here) is large: the guidance overshoots, ``w < 1``
    tempers it. Each evaluation is one model pass and its vector–Jacobian product.
    """

    model: AbstractPrediction
    operator: Array | Callable[[Array], Array]
    observation: Array
    noise_std: Array
    scale: Array

    def __init__(
        self,
        model,
        operator: ArrayLike | Callable[[Array], Array],
        observation: ArrayLike,
        noise_std: ArrayLike,
        scale: ArrayLike = 1.0,
    ):
        if not callable(operator):
            operator = jnp.asarray(operator, dtype=jnp.result_type(float))
            if operator.ndim != 2:
                raise ValueError(f"operator must be a matrix (m, n) or a linear function, got shape {operator.shape}")
        observation = check_finite(jnp.asarray(observation, dtype=jnp.result_type(float)), "observation")
        noise_std = jnp.asarray(noise_std, dtype=jnp.result_type(float))
        if noise_std.shape != () or not bool(noise_std > 0):
            raise ValueError(f"noise_std must be a scalar > 0 (the observation noise σ_y), got {noise_std}")
        self.model = as_prediction(model)
        self.operator = operator
        self.observation = observation
        self.noise_std = noise_std
        self.scale = _scale(scale)

    def observe(self, x: Array) -> Array:
        """``A x`` for one example."""
        if callable(self.operator):
            return self.operator(x)
        check_shape((x.size,), self.operator.shape[1:], "the flattened example (the operator's columns)")
        return self.operator @ x.reshape(-1)

    def likelihood_score(self, sde, t, x) -> tuple[Array, Array]:
        """``(D_θ, ∇ₓ log N(y; A D_θ, σ_y² I))``: one model pass and one VJP."""

        def log_likelihood(x):
            denoised = self.model.denoiser(sde, t, x)
            residual = self.observe(denoised) - self.observation
            check_shape(residual.shape, self.observation.shape, "A D(x) (the observation's shape)")
            return -0.5 * jnp.sum(jnp.square(residual)) / self.noise_std**2, denoised

        _schedule(sde, "a linear inverse problem (it needs the denoiser)")
        gradient, denoised = jax.grad(log_likelihood, has_aux=True)(x)
        return denoised, gradient

    def score(self, sde, t, x):
        denoised, gradient = self.likelihood_score(sde, t, x)
        return _score_of_denoiser(sde, t, x, denoised) + self.scale * gradient

    def denoiser(self, sde, t, x):
        denoised, gradient = self.likelihood_score(sde, t, x)
        return _shifted_denoiser(sde, t, denoised, self.scale * gradient)
