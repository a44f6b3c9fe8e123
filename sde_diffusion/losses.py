"""Training objectives: pure functions ``loss(model, sde, batch, key) -> scalar`` (a batch mean).

``model`` is a prediction (``Score``, ``Denoiser``, ``Noise``, ``Velocity``, ``EDMPreconditioned``;
a plain callable ``fn(t, x)`` is read as a ``Score``); ``batch`` is data ``x0`` of shape
``(B, *event_shape)`` or a tuple ``(x0, labels)`` with one integer class per example, which each
example's model sees (``sd.with_label``; wrap the objective in ``LabelDropout`` to also train the
unconditional model that classifier-free guidance needs). Every objective is
an expectation over a time distribution (``UniformTimes``, ``LogSNRTimes``, ``LogNormalNoise``),
whose importance weight ``w`` keeps it equal to its definition, of a weighted squared score error

    λ(t) ‖s_θ(x_t, t) − ∇ log p_t(x_t)‖²     (up to a constant independent of θ; SSM: half of it).

Denoising score matching replaces ``∇ log p_t`` by the score of the Gaussian kernel
``p(x_t | x0)`` (Vincent 2011): ``DenoisingScoreMatching`` for ``x_t = α x0 + σ ε``,
``LinearDenoisingScoreMatching`` for linear SDEs with a matrix covariance (critically-damped
Langevin). ``SlicedScoreMatching`` needs no kernel and trains on any SDE.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from .linear import AbstractLinearSDE, CriticallyDampedLangevin
from .parametrization import AbstractPrediction, Noise, Score, as_prediction, predict_batch, with_label
from .schedule import AbstractScheduleSDE
from .sde import AbstractSDE
from .simulate import simulate


def _schedule(sde: AbstractSDE, what: str, hint: str = "") -> AbstractScheduleSDE:
    if not isinstance(sde, AbstractScheduleSDE):
        raise TypeError(f"{what} needs a ScheduleSDE (x_t = α x0 + σ ε), got {type(sde).__name__}{hint}")
    return sde


def _data(batch: ArrayLike | tuple[ArrayLike, ArrayLike]) -> tuple[Array, Array | None]:
    """``(x0, labels)`` of a batch: an array ``(B, *event_shape)`` (``labels = None``), or a tuple
    ``(x0, labels)`` with integer ``labels`` of shape ``(B,)``."""
    labels = None
    if isinstance(batch, tuple):
        if len(batch) != 2:
            raise ValueError(f"a tuple batch must be (x0, labels), got {len(batch)} entries")
        batch, labels = batch
    x0 = jnp.asarray(batch)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        x0 = x0.astype(jnp.result_type(float))
    if x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError(f"batch must have shape (B, *event_shape) with B ≥ 1, got {x0.shape}")
    if labels is not None:
        labels = jnp.asarray(labels)
        if labels.shape != x0.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be integers of shape {x0.shape[:1]}, got {labels.dtype} {labels.shape}")
    return x0, labels


def _labelled(model, label: Array | None):
    """``model`` itself, or conditioned on ``label`` (one class, or one per example of a batch)."""
    return model if label is None else with_label(model, label)


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must lie in (0, 1), got {value}")


# -- weightings ----------------------------------------------------------------------------------


class AbstractWeighting(eqx.Module):
    """``λ(t)``, the weight of the squared score error ``‖s_θ(x_t, t) − ∇ log p‖²``."""

    @abc.abstractmethod
    def weight(self, sde: AbstractSDE, t: ArrayLike, x: Array) -> Array:
        """``λ(t)`` (a scalar). ``x`` is one example: λ depends on ``t`` alone, but a generic
        diffusion ``L(t, x)`` needs a state of the right shape to be evaluated."""


class NoiseWeighting(AbstractWeighting):
    """``λ = σ²`` ("simple"): for an ε-prediction the loss is exactly ``‖ε̂ − ε‖²``."""

    def weight(self, sde, t, x):
        return _schedule(sde, "NoiseWeighting").sigma2(t)


class LikelihoodWeighting(AbstractWeighting):
    """``λ = g²`` (Song et al. 2021): ``½ ∫ E[g² ‖s_θ − ∇log p‖²] dt`` then bounds ``−log p_θ(x0)``
    (up to prior terms), for any SDE with scalar diffusion ``g(t)``.

    For an elementwise or matrix diffusion ``L(t)`` (which must not depend on ``x``),
    ``g² = tr(L Lᵀ)/dim``, the mean noise variance per coordinate (the bound holds for ``L = g I``).
    """

    def weight(self, sde, t, x):
        if sde.diffusion_depends_on_x(x):
            raise ValueError("LikelihoodWeighting needs a diffusion L(t) that does not depend on x")
        squared = jnp.square(sde.diffusion(t, x))
        return jnp.sum(squared) / (x.size if squared.ndim else 1)


class UnitWeighting(AbstractWeighting):
    """``λ = 1``: the plain Fisher divergence (any SDE)."""

    def weight(self, sde, t, x):
        return jnp.ones((), jnp.result_type(t, float))


class EDMWeighting(AbstractWeighting):
    """Karras et al. 2022: ``λ_D = (σ̃² + σd²)/(σ̃ σd)²`` on ``‖D − x0‖²`` with ``σ̃ = σ/α`` (the noise
    level of ``x̂ = x/α``). As ``D − x0 = σ²/α (s − s_cond)``, on the score error

        λ = λ_D σ⁴/α² = σ² (σ̃² + σd²)/σd².
    """

    sigma_data: float = 0.5

    def __check_init__(self):
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")

    def weight(self, sde, t, x):
        sde = _schedule(sde, "EDMWeighting")
        sigma2 = sde.sigma2(t)
        return sigma2 * (sigma2 / sde.alpha(t) ** 2 + self.sigma_data**2) / self.sigma_data**2


class MinSNRWeighting(AbstractWeighting):
    """Min-SNR-γ (Hang et al. 2023): ``min(SNR, γ)`` on ``‖D − x0‖²``, ``SNR = α²/σ²``; on the score
    error ``λ = min(SNR, γ) σ⁴/α² = σ² min(1, γ/SNR)``.
    """

    gamma: float = 5.0

    def __check_init__(self):
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")

    def weight(self, sde, t, x):
        sde = _schedule(sde, "MinSNRWeighting")
        return sde.sigma2(t) * jnp.minimum(1, self.gamma * jnp.exp(-sde.log_snr(t)))


# -- time distributions --------------------------------------------------------------------------


class AbstractTimeDistribution(eqx.Module):
    """Training times with importance weights: ``E[w(t) ℓ(t)]`` is the objective's time average."""

    @abc.abstractmethod
    def sample(self, sde: AbstractSDE, key: PRNGKeyArray, n: int) -> tuple[Array, Array]:
        """``n`` times ``t`` and their weights ``w``, each of shape ``(n,)``."""


def _start(sde: AbstractSDE, eps: float) -> float:
    return sde.t0 + eps * (sde.t1 - sde.t0)


class UniformTimes(AbstractTimeDistribution):
    """``t ~ U[t0 + eps (t1 − t0), t1]``, ``w = 1``: the objective's definition (eps avoids σ = 0)."""

    eps: float = 1e-5

    def __check_init__(self):
        _check_fraction("eps", self.eps)

    def sample(self, sde, key, n):
        t = jax.random.uniform(
            key, (n,), jnp.result_type(float), minval=_start(sde, self.eps), maxval=sde.t1
        )
        return t, jnp.ones_like(t)


class LogSNRTimes(AbstractTimeDistribution):
    """Importance sampling for the likelihood weighting: ``λ(t) = log SNR`` uniform on
    ``[λ(t1), λ(t_min)]``, ``t_min = t0 + eps (t1 − t0)``, i.e. density ``p(t) = (g²/σ²)/Λ`` with
    ``Λ = λ(t_min) − λ(t1)`` (as ``−dλ/dt = g²/σ²``), and ``w = 1/(p(t) (t1 − t_min))``, so that
    ``E[w ℓ(t)]`` is the ``UniformTimes(eps)`` average. With ``LikelihoodWeighting``,
    ``w g² = σ² Λ/(t1 − t_min)``: the likelihood objective at the variance of the σ² weighting.
    """

    eps: float = 1e-5

    def __check_init__(self):
        _check_fraction("eps", self.eps)

    def sample(self, sde, key, n):
        sde = _schedule(sde, "LogSNRTimes")
        start = _start(sde, self.eps)
        dtype = jnp.result_type(float)
        lo, hi = sde.log_snr(jnp.asarray(sde.t1, dtype)), sde.log_snr(jnp.asarray(start, dtype))
        lam = jax.random.uniform(key, (n,), dtype, minval=lo, maxval=hi)
        t = jnp.clip(jax.vmap(sde.t_from_log_snr)(lam), start, sde.t1)
        w = (hi - lo) * jax.vmap(sde.sigma2)(t) / (jax.vmap(sde.g2)(t) * (sde.t1 - start))
        return t, w


class LogNormalNoise(AbstractTimeDistribution):
    """EDM's noise levels (Karras et al. 2022): ``ln σ̃ ~ N(mean, std²)`` for ``σ̃ = σ/α``, mapped to
    ``t`` by the log-SNR ``λ = −2 ln σ̃`` (clipped to ``[λ(t1), λ(t0)]``); ``w = 1``. Part of the
    EDM objective's definition (with ``EDMWeighting``), not an importance sampler.
    """

    mean: float = -1.2
    std: float = 1.2

    def __check_init__(self):
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    def sample(self, sde, key, n):
        sde = _schedule(sde, "LogNormalNoise")
        dtype = jnp.result_type(float)
        log_sigma = self.mean + self.std * jax.random.normal(key, (n,), dtype)
        lo, hi = sde.log_snr(jnp.asarray(sde.t1, dtype)), sde.log_snr(jnp.asarray(sde.t0, dtype))
        t = jax.vmap(sde.t_from_log_snr)(jnp.clip(-2 * log_sigma, lo, hi))
        t = jnp.clip(t, sde.t0, sde.t1)
        return t, jnp.ones_like(t)


# -- denoising score matching --------------------------------------------------------------------


def _score_errors(
    model: AbstractPrediction, sde: AbstractScheduleSDE, t: Array, x0: Array, eps: Array
) -> tuple[Array, Array]:
    """On a batch: ``x_t = α x0 + σ ε`` and ``‖s_θ(x_t) − s_cond‖²`` per example,
    ``s_cond = −ε/σ``, computed in the model's own output space, so that no prediction passes
    through a cancelling conversion:

        Noise: ``s − s_cond = −(ε̂ − ε)/σ``;    Score: ``s + ε/σ``;
        any other (Denoiser, Velocity, EDMPreconditioned): ``s − s_cond = α/σ² (D − x0)``.

    A parametrization's network is called once on the batch (``predict_batch``).
    """
    alpha, sigma, sigma2 = (jax.vmap(f)(t) for f in (sde.alpha, sde.sigma, sde.sigma2))
    expand = lambda v: v.reshape(v.shape + (1,) * (x0.ndim - 1))  # noqa: E731
    squared_norm = lambda v: jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1)  # noqa: E731
    x = expand(alpha) * x0 + expand(sigma) * eps
    if isinstance(model, Noise):
        return x, squared_norm(model.output(t, x) - eps) / sigma**2
    if isinstance(model, Score):
        return x, squared_norm(model.output(t, x) + eps / expand(sigma))
    return x, squared_norm(predict_batch(model, "denoiser", sde, t, x) - x0) * (alpha / sigma2) ** 2


def _check_types(times, weighting=None) -> None:
    if not isinstance(times, AbstractTimeDistribution):
        raise TypeError(f"times must be a time distribution (e.g. UniformTimes()), got {times!r}")
    if weighting is not None and not isinstance(weighting, AbstractWeighting):
        raise TypeError(f"weighting must be a weighting (e.g. NoiseWeighting()), got {weighting!r}")


class DenoisingScoreMatching(eqx.Module):
    """``E_t E_{x0, ε}[w λ(t) ‖s_θ(x_t, t) + ε/σ‖²]`` with ``x_t = α x0 + σ ε`` (a ``ScheduleSDE``).

    ``−ε/σ = ∇ log p(x_t | x0)``; the loss equals ``E[w λ ‖s_θ − ∇ log p_t‖²]`` plus the
    irreducible ``E[w λ (d/σ² − ‖∇ log p_t‖²)]``. Draws: ``k_t, k_ε = jax.random.split(key)``,
    ``(t, w) = times.sample(sde, k_t, B)``, ``ε = jax.random.normal(k_ε, x0.shape)``.
    """

    weighting: AbstractWeighting = NoiseWeighting()
    times: AbstractTimeDistribution = UniformTimes()

    def __check_init__(self):
        _check_types(self.times, self.weighting)

    def __call__(
        self, model: AbstractPrediction, sde: AbstractScheduleSDE, batch, key: PRNGKeyArray
    ) -> Array:
        sde = _schedule(
            sde,
            "DenoisingScoreMatching",
            "; use LinearDenoisingScoreMatching for a linear SDE, SlicedScoreMatching for any SDE",
        )
        model = as_prediction(model)
        x0, labels = _data(batch)
        time_key, noise_key = jax.random.split(key)
        t, w = self.times.sample(sde, time_key, x0.shape[0])
        eps = jax.random.normal(noise_key, x0.shape, x0.dtype)

        x, errors = _score_errors(_labelled(model, labels), sde, t, x0, eps)
        weights = jax.vmap(self.weighting.weight, in_axes=(None, 0, 0))(sde, t, x)
        return jnp.mean(w * weights * errors)


def _initial_moments(sde: AbstractLinearSDE, x0: Array) -> tuple[Array, Array]:
    """Mean ``(B, D)`` and covariance ``(D, D)`` of the state at ``t0`` given data ``x0 (B, d)``:
    ``(x0, 0)`` and ``diag(0, γM I)`` for critically-damped Langevin, else ``x0`` and ``0``."""
    if x0.ndim != 2:
        raise ValueError(f"a linear SDE acts on vectors: data must have shape (B, d), got {x0.shape}")
    dim = sde.dim
    if isinstance(sde, CriticallyDampedLangevin):
        if x0.shape[1] != sde.n:
            raise ValueError(f"data have dimension {x0.shape[1]}, the SDE's n is {sde.n}")
        mean0 = jnp.concatenate([x0, jnp.zeros_like(x0)], axis=1)
        variances = jnp.concatenate([jnp.zeros(sde.n), jnp.full(sde.n, sde.velocity_std**2)])
        return mean0, jnp.diag(variances).astype(x0.dtype)
    if x0.shape[1] != dim:
        raise ValueError(f"data have dimension {x0.shape[1]}, the SDE's state has {dim}")
    return x0, jnp.zeros((dim, dim), x0.dtype)


class LinearDenoisingScoreMatching(eqx.Module):
    """DSM for a linear SDE with a matrix covariance (e.g. critically-damped Langevin, CLD):

        E_t E_{x0, ε}[w ‖Cᵀ s_θ(u_t, t) + ε‖²],    u_t = m + C ε,  Σ = C Cᵀ (Cholesky),

    where ``u_t | x0 ~ N(m, Σ)`` from one moment-ODE solve at the batch's times
    (``sde.moments_at``; for CLD ``u = (x, v)`` starts at ``(x0, v0)`` with ``v0 ~ N(0, γM I)``, integrated out into ``Σ``). The conditional score is
    ``−C⁻ᵀ ε``, so this is ``(s_θ − s_cond)ᵀ Σ (s_θ − s_cond)``: the matrix ``Σ(t)`` weighting, the
    analogue of ``NoiseWeighting``'s ``σ² I`` (for ``Σ = σ² I`` it is exactly the ε-loss).
    ``model`` predicts the score of the whole state. ``Σ(t0)`` is singular (the ``x`` block is 0),
    hence the default ``eps = 10⁻³``; draws as in ``DenoisingScoreMatching`` (``ε`` of the
    state's shape).
    """

    times: AbstractTimeDistribution = UniformTimes(eps=1e-3)

    def __check_init__(self):
        _check_types(self.times)

    def __call__(
        self, model: AbstractPrediction, sde: AbstractLinearSDE, batch, key: PRNGKeyArray
    ) -> Array:
        if not isinstance(sde, AbstractLinearSDE):
            raise TypeError(f"LinearDenoisingScoreMatching needs a linear SDE, got {type(sde).__name__}")
        model = as_prediction(model)
        x0, labels = _data(batch)
        mean0, cov0 = _initial_moments(sde, x0)
        time_key, noise_key = jax.random.split(key)
        t, w = self.times.sample(sde, time_key, mean0.shape[0])
        phi, cov = sde.moments_at(t.astype(mean0.dtype), cov0)
        chol = jnp.linalg.cholesky(cov)
        eps = jax.random.normal(noise_key, mean0.shape, mean0.dtype)
        u = jnp.einsum("bij,bj->bi", phi, mean0) + jnp.einsum("bij,bj->bi", chol, eps)

        def one(t, u, chol, eps, label):
            return jnp.sum(jnp.square(chol.T @ _labelled(model, label).score(sde, t, u) + eps))

        return jnp.mean(w * jax.vmap(one)(t, u, chol, eps, labels))


# -- sliced score matching -----------------------------------------------------------------------


class _TimeRescaled(AbstractSDE):
    """``y(τ) = x(t0 + τ (end − t0))`` on ``τ ∈ [0, 1]``: ``dy = span f dτ + √span L dW_τ``, so that
    ``n`` Euler–Maruyama steps of ``y`` are ``n`` steps of size ``(end − t0)/n`` of ``x``."""

    sde: AbstractSDE
    end: Array
    t0: float = eqx.field(static=True)
    t1: float = eqx.field(static=True)

    def __init__(self, sde: AbstractSDE, end: Array):
        self.sde, self.end, self.t0, self.t1 = sde, end, 0.0, 1.0

    @property
    def _span(self) -> Array:
        return self.end - self.sde.t0

    def drift(self, t, x):
        return self._span * self.sde.drift(self.sde.t0 + t * self._span, x)

    def diffusion(self, t, x):
        return jnp.sqrt(self._span) * self.sde.diffusion(self.sde.t0 + t * self._span, x)

    def diffusion_depends_on_x(self, x):
        return self.sde.diffusion_depends_on_x(x)

    @property
    def prior(self):
        raise NotImplementedError("a time-rescaled SDE is only simulated forward")


class SlicedScoreMatching(eqx.Module):
    """Sliced score matching with variance reduction (SSM-VR, Song et al. 2019), for ANY SDE:

        E_t E_{x_t} [w λ(t) (E_v[vᵀ ∇_x(vᵀ s_θ(x_t, t))] + ½ ‖s_θ(x_t, t)‖²)],   v ~ N(0, I),

    ``num_projections`` vectors ``v`` per example (``vᵀ∇(vᵀs)`` by one ``jax.linearize``). By
    integration by parts this is ``½ E[w λ ‖s_θ − ∇ log p̃_t‖²]`` plus a constant, where ``p̃_t`` is
    the law of the simulated ``x_t``: each example runs its own Euler–Maruyama path with
    ``num_steps`` steps of size ``(t − t0)/num_steps`` from its ``x0`` to its own sampled ``t``
    (``sd.simulate`` on the time-rescaled SDE). Euler–Maruyama has weak order 1, so
    ``p̃_t − p_t = O((t − t0)/num_steps)`` and the minimiser is the score of ``p̃_t``, off by that
    much (an OU process ``dx = −½βx dt + √β dw`` reaches variance ``1/(1 − βΔt/4)``, not 1). Measured
    on an OU process with a ring mixture: the excess risk ``L(s*+δ) − L(s*)`` is off by −6 % with 4
    steps, −1.8 % with 16 and < 1 % with 64. Per-example end times cost the same as one shared grid
    (2.0 vs 1.8 ms for 256 paths of 100 steps) and keep any time distribution exact.
    ``weighting`` may use ``σ`` only on a ``ScheduleSDE``; ``LikelihoodWeighting`` (``g²``) and
    ``UnitWeighting`` work for any SDE.
    """

    times: AbstractTimeDistribution = UniformTimes()
    weighting: AbstractWeighting = LikelihoodWeighting()
    num_projections: int = eqx.field(default=1, static=True)
    num_steps: int = eqx.field(default=100, static=True)

    def __check_init__(self):
        _check_types(self.times, self.weighting)
        for name in ("num_projections", "num_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")

    def __call__(self, model: AbstractPrediction, sde: AbstractSDE, batch, key: PRNGKeyArray) -> Array:
        if not isinstance(sde, AbstractSDE):
            raise TypeError(f"sde must be an sde_diffusion SDE, got {type(sde).__name__}")
        model = as_prediction(model)
        x0, labels = _data(batch)
        time_key, path_key, projection_key = jax.random.split(key, 3)
        t, w = self.times.sample(sde, time_key, x0.shape[0])
        lam = jax.vmap(self.weighting.weight, (None, 0, 0))(sde, t, x0)  # λ(t): x only gives the shape
        paths = jax.random.split(path_key, x0.shape[0])
        x = jax.vmap(self._simulate, (None, 0, 0, 0))(sde, x0, t, paths)
        v_shape = (x0.shape[0], self.num_projections) + x0.shape[1:]
        v = jax.random.normal(projection_key, v_shape, x0.dtype)

        def one(t, x, v, label):
            s, jvp = jax.linearize(lambda y: _labelled(model, label).score(sde, t, y), x)
            trace = jnp.mean(jax.vmap(lambda vi: jnp.vdot(vi, jvp(vi)))(v))
            return trace + 0.5 * jnp.sum(jnp.square(s))

        return jnp.mean(w * lam * jax.vmap(one)(t, x, v, labels))

    def _simulate(self, sde: AbstractSDE, x0: Array, t: Array, key: PRNGKeyArray) -> Array:
        """One Euler–Maruyama path from ``x0`` at ``t0`` to ``t``; its end state."""
        path = simulate(_TimeRescaled(sde, t), x0[None], key, [0.0, 1.0], dt0=1 / self.num_steps)
        return path[-1, 0].astype(x0.dtype)



# -- conditioning ----------------------------------------------------------------------------------


class LabelDropout(eqx.Module):
    """``objective`` on a labelled batch whose labels are each replaced, with probability
    ``rate``, by the null class ``num_classes``: one network learns ``s(x, t | y)`` and the
    unconditional ``s(x, t)`` that classifier-free guidance combines (Ho & Salimans 2022).
    Draws: ``k_drop, k = jax.random.split(key)``; ``objective`` gets ``k``.
    """

    objective: Callable
    num_classes: int = eqx.field(static=True)
    rate: float = 0.1

    def __check_init__(self):
        if not callable(self.objective):
            raise TypeError(f"objective must be a loss (model, sde, batch, key) -> scalar, got {self.objective!r}")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 1):
            raise ValueError(f"num_classes must be an int ≥ 1, got {self.num_classes!r}")
        if not 0 <= self.rate < 1:
            raise ValueError(f"rate must lie in [0, 1), got {self.rate}")

    def __call__(self, model, sde: AbstractSDE, batch, key: PRNGKeyArray) -> Array:
        x0, labels = _data(batch)
        if labels is None:
            raise ValueError("LabelDropout needs a labelled batch (x0, labels)")
        drop_key, key = jax.random.split(key)
        dropped = jax.random.bernoulli(drop_key, self.rate, labels.shape)
        return self.objective(model, sde, (x0, jnp.where(dropped, self.num_classes, labels)), key)


class NoisyClassification(eqx.Module):
    """Cross-entropy of a noise-conditional classifier ``logits = model(t, x_t)`` (e.g.
    ``sd.Network(sd.MLP(d, out_features=C, ...), sde)``) on noised data ``x_t = α x0 + σ ε``:

        E_t E_{x0, y, ε}[w · (−log softmax(model(t, x_t))_y)],

    minimised by the exact ``log p_t(y | x_t)``, whose gradient is what ``ClassifierGuidance``
    adds to the score. Draws as in ``DenoisingScoreMatching``. The default EDM log-normal noise
    levels train where guidance decides the class: on the 8-class ring, guided samples landed in
    the right class 98.6 % of the time after 1000 steps, against 76 % with uniform t.
    """

    times: AbstractTimeDistribution = LogNormalNoise()

    def __check_init__(self):
        _check_types(self.times)

    def __call__(self, model: Callable, sde: AbstractScheduleSDE, batch, key: PRNGKeyArray) -> Array:
        sde = _schedule(sde, "NoisyClassification")
        x0, labels = _data(batch)
        if labels is None:
            raise ValueError("NoisyClassification needs a labelled batch (x0, labels)")
        time_key, noise_key = jax.random.split(key)
        t, w = self.times.sample(sde, time_key, x0.shape[0])
        eps = jax.random.normal(noise_key, x0.shape, x0.dtype)

        def one(t, x0, eps, label):
            logits = model(t, sde.alpha(t) * x0 + sde.sigma(t) * eps)
            return -jax.nn.log_softmax(logits.astype(jnp.result_type(float)))[label]

        return jnp.mean(w * jax.vmap(one)(t, x0, eps, labels))
