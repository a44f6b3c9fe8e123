"""Log-likelihoods through the probability-flow ODE, and bits per dimension.

The PF ODE ``dx/dt = v(t, x) = f − ½∇·Σ − ½Σ s_θ`` (``Σ = LLᵀ``) transports ``p_t`` exactly when
``s_θ = ∇ log p_t``, and along its paths (instantaneous change of variables)

    d/dt log p_t(x(t)) = −∇·v(t, x(t)),

so for data ``x`` at ``t_start``, with ``z = x(t1)`` the solution of the ODE started at ``x``,

    log p_{t_start}(x) = log p_prior(z) + ∫_{t_start}^{t1} ∇·v(t, x(t)) dt.

The ODE is solved augmented with the integral of the divergence. The divergence is a trace
estimator: ``ExactTrace`` (``tr J`` from ``d`` Jacobian-vector products) or ``Hutchinson``
(``tr J = E[εᵀ J ε]`` for probes with ``E[εεᵀ] = I``, the probes drawn once per example and held
fixed along its path, so the log-density estimate is unbiased up to the ODE's error). With a
state-dependent diffusion ``v`` contains ``½∇·Σ`` and its divergence enters too.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._checks import check_finite
from .grids import AbstractTimeGrid, UniformLogSNR, UniformTime
from .parametrization import AbstractPrediction, as_prediction
from .reverse import ProbabilityFlowODE
from .sample import _check_diffrax_settings, evaluations_per_step
from .schedule import AbstractScheduleSDE
from .sde import AbstractSDE

T_START_FRACTION = 1e-5
"""Default ``t_start = t0 + 1e-5 (t1 − t0)`` for schedules with ``σ(t0) = 0`` (Song et al. 2021)."""


# -- trace estimators -------------------------------------------------------------------------


class AbstractProbe(eqx.Module):
    """A law of Hutchinson probes ``ε`` with ``E[ε] = 0`` and ``E[εεᵀ] = I``."""

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, shape: tuple[int, ...], dtype) -> Array:
        """Independent probe entries of ``shape``."""


class RademacherProbe(AbstractProbe):
    """``ε_i = ±1`` with probability ½: the least variance, ``Var[εᵀJε] = ½‖J + Jᵀ‖²_F − 2Σ_i J_ii²``."""

    def sample(self, key, shape, dtype):
        return jax.random.rademacher(key, shape, dtype=dtype)


class GaussianProbe(AbstractProbe):
    """``ε ~ N(0, I)``: ``Var[εᵀJε] = ½‖J + Jᵀ‖²_F``."""

    def sample(self, key, shape, dtype):
        return jax.random.normal(key, shape, dtype=dtype)


class AbstractTraceEstimator(eqx.Module):
    """Estimates ``∇·v = tr J`` (``J = ∂v/∂x``) from products ``J u`` along directions ``u``."""

    @abc.abstractmethod
    def directions(self, key: PRNGKeyArray | None, x: Array) -> Array:
        """The directions ``u_k``, shape ``(K, *x.shape)``, fixed along one example's path."""

    @abc.abstractmethod
    def trace(self, directions: Array, products: Array) -> Array:
        """The estimate of ``tr J`` from the products ``J u_k`` (shaped like ``directions``)."""

    @abc.abstractmethod
    def jvps(self, size: int) -> int:
        """Jacobian-vector products per evaluation of the field, for states of ``size`` elements."""


class ExactTrace(AbstractTraceEstimator):
    """``tr J = Σ_i e_iᵀ J e_i``: ``d`` JVPs per evaluation (``d`` = elements of one example)."""

    def directions(self, key, x):
        return jnp.eye(x.size, dtype=x.dtype).reshape(x.size, *x.shape)

    def trace(self, directions, products):
        return jnp.sum(directions * products)

    def jvps(self, size):
        return size


class Hutchinson(AbstractTraceEstimator):
    """``tr J ≈ (1/K) Σ_k ε_kᵀ J ε_k`` with ``K = num_probes`` independent probes: unbiased, standard
    deviation ∝ ``1/√K``; ``K`` JVPs per evaluation whatever the dimension."""

    num_probes: int = eqx.field(default=1, static=True)
    probe: AbstractProbe = RademacherProbe()

    def __check_init__(self):
        if isinstance(self.num_probes, bool) or not isinstance(self.num_probes, int) or self.num_probes < 1:
            raise ValueError(f"num_probes must be an int ≥ 1, got {self.num_probes!r}")
        if not isinstance(self.probe, AbstractProbe):
            raise TypeError(f"probe must be an AbstractProbe (RademacherProbe(), GaussianProbe()), got {self.probe!r}")

    def directions(self, key, x):
        return self.probe.sample(key, (self.num_probes, *x.shape), x.dtype)

    def trace(self, directions, products):
        return jnp.sum(directions * products) / self.num_probes

    def jvps(self, size):
        return self.num_probes


# -- log-likelihood ---------------------------------------------------------------------------


class LikelihoodInfo(eqx.Module):
    """What ``log_likelihood`` did, per example (arrays of shape ``(n,)`` unless noted).

    ``nfe``: evaluations of the augmented field (rejected steps included); one evaluation costs one
    model evaluation plus ``jvps_per_evaluation`` Jacobian-vector products through it (forward
    mode, about one model evaluation each). The batch is solved in lockstep (vmapped solves), so a
    call costs ``max(nfe)`` evaluations of the batch. ``log_p = prior_log_prob + delta_log_p``,
    with ``prior_log_prob = log p_prior(latent)``, ``delta_log_p = ∫ ∇·v dt`` and ``latent`` the
    PF-ODE image ``x(t1)`` of each example (shape ``x.shape``). ``t_start``: the time of ``x``.
    """

    nfe: Array
    num_steps: Array
    num_accepted_steps: Array
    num_rejected_steps: Array
    prior_log_prob: Array
    delta_log_p: Array
    latent: Array
    jvps_per_evaluation: int = eqx.field(static=True)
    t_start: float = eqx.field(static=True)


def default_t_start(sde: AbstractSDE) -> float:
    """``t0``, or ``t0 + 1e-5 (t1 − t0)`` for a ``ScheduleSDE`` with ``σ(t0) = 0``, where the data law
    has no density to speak of and the PF-ODE field is singular."""
    if isinstance(sde, AbstractScheduleSDE):
        with jax.ensure_compile_time_eval():
            if not bool(sde.sigma(sde.t0) > 0):
                return sde.t0 + T_START_FRACTION * (sde.t1 - sde.t0)
    return sde.t0


def _error_norm(error: tuple[Array, Array]) -> Array:
    """PID error norm: the larger of the state's RMS error and the log-density's own error, so that
    ``delta_log_p`` is controlled however many elements ``x`` has."""
    x_error, delta_error = error
    return jnp.maximum(jnp.sqrt(jnp.mean(x_error**2)), jnp.abs(delta_error))


@eqx.filter_jit
def _solve(sde, model, trace, solver, grid, x, keys, t_start, rtol, atol, dt0, num_steps, max_steps):
    flow = ProbabilityFlowODE(sde, lambda t, y: model.score(sde, t, y))

    def field(u, state, directions):
        # u ∈ [0, 1] runs from t_start (u = 0) to t1 along the grid's variable τ = 1 − u
        t, dt_du = jax.jvp(lambda w: grid.time(sde, sde.t1, t_start, 1 - w), (u,), (jnp.ones_like(u),))

        def along(direction):  # (v, J u): v does not depend on u, so vmap computes it once
            return jax.jvp(lambda y: flow.velocity(t, y), (state[0],), (direction,))

        v, products = jax.vmap(along, out_axes=(None, 0))(directions)
        return v * dt_du, trace.trace(directions, products) * dt_du

    if num_steps is None:
        controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=_error_norm)
    else:
        controller = diffrax.StepTo(jnp.linspace(0.0, 1.0, num_steps + 1, dtype=x.dtype))

    def one(x_i, key):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            t0=0.0,
            t1=1.0,
            dt0=dt0,
            y0=(x_i, jnp.zeros((), x_i.dtype)),
            args=trace.directions(key, x_i),
            stepsize_controller=controller,
            max_steps=max_steps,
        )
        latent, delta = (y[-1] for y in sol.ys)
        return latent, delta, sol.stats

    latent, delta, stats = jax.vmap(one)(x, keys)
    prior = jax.vmap(sde.prior.log_prob)(latent)
    return latent, delta, prior, stats


def log_likelihood(
    sde: AbstractSDE,
    model: AbstractPrediction | Callable[[Array, Array], Array],
    x: ArrayLike,
    key: PRNGKeyArray | None = None,
    *,
    trace: AbstractTraceEstimator = ExactTrace(),
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_start: float | None = None,
    grid: AbstractTimeGrid | None = None,
    num_steps: int | None = None,
    dt0: float | None = None,
    max_steps: int = 10_000,
) -> tuple[Array, LikelihoodInfo]:
    """``log p_{t_start}(x)`` of each example of ``x`` (shape ``(n, *event_shape)``) under the PF ODE
    of ``sde`` and ``model`` (a prediction or a plain score function), with ``sde.prior`` at ``t1``.

    Each example is its own ODE solve (vmapped): its own adaptive steps and probes, so its value
    does not depend on the rest of the batch. ``key`` draws the probes of a ``Hutchinson`` trace
    (one key per example); ``ExactTrace`` needs none. ``solver``: any explicit diffrax ODE solver;
    ``num_steps=None`` is PID step control on ``rtol``/``atol`` (on the state and, separately, on
    the log-density), else equal steps in ``τ``. ``dt0``: the first step in ``τ`` (default: diffrax's
    selection).

    The ODE is integrated in the variable ``τ ∈ [0, 1]`` of ``grid`` (default ``UniformLogSNR`` for a
    ``ScheduleSDE``, where the field is smooth down to small noise, else ``UniformTime``).
    ``t_start`` defaults to ``t0``, or to ``t0 + 1e-5 (t1 − t0)`` when ``σ(t0) = 0``: the result is
    then the density of the slightly noised data ``p_{t_start}``, not of ``p_{t0}``; for a density
    smooth on the scale ``σ(t_start)`` the two differ by ``O(σ(t_start)²)``. The prior is the SDE's
    (for presets ``N(0, σ(t1)²)``, which differs from ``p_{t1}`` by the signal ``α(t1) x0`` left at
    ``t1``); ``info.latent`` gives ``x(t1)`` for any other prior.

    Returns ``(log_p, LikelihoodInfo)``, ``log_p`` of shape ``(n,)`` in nats.
    """
    if not isinstance(trace, AbstractTraceEstimator):
        raise TypeError(f"trace must be ExactTrace() or Hutchinson(...), got {trace!r}")
    _check_diffrax_settings(num_steps, rtol, atol, solver)
    if num_steps is not None and dt0 is not None:
        raise ValueError("dt0 is for adaptive steps: give num_steps or dt0, not both")
    if dt0 is not None and not dt0 > 0:
        raise ValueError(f"dt0 must be > 0, got {dt0}")
    model = as_prediction(model)
    x = check_finite(jnp.asarray(x, dtype=jnp.result_type(float)), "x")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a batch of shape (n, ...) with n ≥ 1, got shape {x.shape}")
    sde.noise(x[0])  # checks that drift (and diffusion) fit one example's shape
    t_start = default_t_start(sde) if t_start is None else float(t_start)
    if not sde.t0 <= t_start < sde.t1:
        raise ValueError(f"need t0 ≤ t_start < t1 with [t0, t1] = [{sde.t0}, {sde.t1}], got t_start={t_start}")
    if isinstance(sde, AbstractScheduleSDE):
        with jax.ensure_compile_time_eval():
            if not bool(sde.sigma(t_start) > 0):
                raise ValueError(
                    f"σ(t_start) = 0 at t_start={t_start}: the data law has no density there and the "
                    f"PF-ODE field is singular; start at t_start > t0 (default {default_t_start(sde)})"
                )
    if grid is None:
        grid = UniformLogSNR() if isinstance(sde, AbstractScheduleSDE) else UniformTime()
    if isinstance(trace, Hutchinson) and key is None:
        raise ValueError("a Hutchinson trace draws probes: pass key=jax.random.key(...)")
    keys = jax.random.split(jax.random.key(0) if key is None else key, x.shape[0])
    dtype = x.dtype
    latent, delta, prior, stats = _solve(
        sde, model, trace, solver, grid, x, keys, jnp.asarray(t_start, dtype),
        jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype), dt0, num_steps, max_steps,
    )  # fmt: skip
    per_step, extra = evaluations_per_step(solver)
    info = LikelihoodInfo(
        nfe=extra + per_step * stats["num_steps"],
        num_steps=stats["num_steps"],
        num_accepted_steps=stats["num_accepted_steps"],
        num_rejected_steps=stats["num_rejected_steps"],
        prior_log_prob=prior,
        delta_log_p=delta,
        latent=latent,
        jvps_per_evaluation=trace.jvps(math.prod(x.shape[1:])),
        t_start=t_start,
    )
    return prior + delta, info


# -- discrete data ----------------------------------------------------------------------------


def _bin_width(num_levels: int, low: float, high: float) -> float:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels must be an int ≥ 2, got {num_levels!r}")
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"need finite low < high, got low={low}, high={high}")
    return (high - low) / (num_levels - 1)


def dequantize(x: ArrayLike, key: PRNGKeyArray, num_levels: int, low: float = -1.0, high: float = 1.0) -> Array:
    """Uniform dequantization of data on the ``num_levels`` levels ``low + kΔ``,
    ``Δ = (high − low)/(num_levels − 1)`` (e.g. ``sd.digits()``: 17 levels ``k/8 − 1``):

        y = x + Δ (u − ½),   u ~ U[0, 1)  elementwise,

    uniform on the bin of width ``Δ`` centred on ``x``. Values off ``[low, high]`` are an error.
    """
    width = _bin_width(num_levels, low, high)
    x = check_finite(jnp.asarray(x, dtype=jnp.result_type(float)), "x")
    tol = 1e-3 * width
    x = eqx.error_if(x, jnp.any((x < low - tol) | (x > high + tol)), f"x must lie in [low, high] = [{low}, {high}]")
    return x + width * (jax.random.uniform(key, x.shape, dtype=x.dtype) - 0.5)


def bits_per_dim(
    log_p: ArrayLike, num_dims: int, num_levels: int | None = None, low: float = -1.0, high: float = 1.0
) -> Array:
    """Bits per dimension of ``num_dims``-dimensional examples from continuous log-densities ``log_p``.

    Continuous data (``num_levels=None``): ``bpd = −log p(x) / (D log 2)``.

    Discrete data on ``num_levels`` levels (see ``dequantize``), ``log_p = log p(y)`` at dequantized
    ``y = x + Δ(u − ½)``: the probability of the discrete ``x`` is the mass of its bin, and by Jensen

        log P(x) = log E_u[Δ^D p(y)] ≥ E_u[log p(y)] + D log Δ,

    so ``bpd = −(log p(y) + D log Δ) / (D log 2)`` averaged over ``u`` is an upper bound on
    ``−log₂ P(x) / D`` (equal when ``p`` is constant on each bin).
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims must be an int ≥ 1, got {num_dims!r}")
    log_width = 0.0 if num_levels is None else math.log(_bin_width(num_levels, low, high))
    log_p = jnp.asarray(log_p, dtype=jnp.result_type(float))
    return -(log_p + num_dims * log_width) / (num_dims * math.log(2))
