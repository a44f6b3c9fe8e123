"""Sampling by integrating the reverse SDE or the probability-flow ODE from ``t_start`` to ``t_end``.

``sample`` is the one entry point; a method is a module that maps starting points to samples and
honest statistics (``nfe`` = score evaluations actually made, each on the whole batch).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._checks import check_finite, is_concrete
from .grids import AbstractTimeGrid, UniformTime
from .parametrization import AbstractPrediction, Score, as_prediction
from .reverse import ProbabilityFlowODE, ReverseSDE
from .runge_kutta import explicit_runge_kutta
from .schedule import AbstractScheduleSDE
from .sde import AbstractSDE
from .simulate import solve_paths


def sampling_noise(key: PRNGKeyArray, shape: tuple[int, ...], dtype) -> Array:
    """Standard normal draws for samplers, made in at most float32 and cast to ``dtype``.

    In float64 runs this is 5× cheaper on CPU than float64 draws (whose inverse-erf transform
    costs more than a model call on a 20000 × 64 batch); a sampler's accuracy does not depend on
    the 53-bit precision of its noise. (``simulate`` keeps full-precision increments.)
    """
    draw_dtype = jnp.float32 if jnp.dtype(dtype).itemsize > 4 else dtype
    return jax.random.normal(key, shape, draw_dtype).astype(dtype)


def ends_at_zero_noise(sde: AbstractSDE, t_end: ArrayLike) -> bool:
    """Whether ``σ(t_end) = 0`` (decided while tracing). A traced ``t_end`` (an interior time, as in
    ``sd.Resampling``'s segments) counts as ``σ > 0``."""
    if not (isinstance(sde, AbstractScheduleSDE) and is_concrete(t_end)):
        return False
    with jax.ensure_compile_time_eval():
        return bool(sde.sigma(t_end) == 0)


class SampleInfo(eqx.Module):
    """What a sampler did: ``nfe`` score evaluations (on the batch), steps taken and rejected."""

    nfe: int | Array
    num_steps: int | Array
    num_accepted_steps: int | Array
    num_rejected_steps: int | Array


def no_info() -> SampleInfo:
    """A ``SampleInfo`` of int32 zeros: the start of a sum of ``add_info``."""
    return SampleInfo(*(jnp.zeros((), jnp.int32) for _ in range(4)))


def add_info(total: SampleInfo, info: SampleInfo) -> SampleInfo:
    """Field-wise sum of two ``SampleInfo``, as int32 arrays."""
    return jax.tree.map(lambda a, b: jnp.asarray(a, jnp.int32) + jnp.asarray(b, jnp.int32), total, info)


def over_intervals(
    run: Callable[[Array, Array, Array, Array], tuple[Array, SampleInfo]], ts: Array, x: Array, t_end: float
) -> tuple[Array, SampleInfo]:
    """``x`` through ``run(i, x, t_i, t_{i+1}) -> (x, info)`` on each interval of ``ts`` (``t_0 > … > t_N``),
    the infos summed. The intervals before the last run in one ``lax.scan`` (``run`` sees traced
    times there), so compilation does not grow with N; the last ends at the concrete ``t_end``, where
    a method may end at σ = 0."""

    def step(carry, i):
        x, total = carry
        x, info = run(i, x, ts[i], ts[i + 1])
        return (x, add_info(total, info)), None

    last = ts.shape[0] - 2
    (x, total), _ = jax.lax.scan(step, (x, no_info()), jnp.arange(last))
    x, info = run(last, x, ts[last], t_end)
    return x, add_info(total, info)


def evaluations_per_step(solver: diffrax.AbstractSolver) -> tuple[int, int]:
    """``(per_step, extra)``: a solve of ``N`` step attempts (rejected included) makes
    ``extra + per_step · N`` evaluations of the drift (the model).

    Euler, Euler–Heun, Milstein: ``(1, 0)``. Explicit Runge–Kutta with ``s`` stages: ``(s, 0)``, or
    ``(s − 1, 1)`` when first-same-as-last. Stochastic Runge–Kutta: the stages that evaluate the
    drift. With ``dt0=None`` (initial-step selection) diffrax 0.7 makes exactly this many too:
    the tests check each case against a runtime counter.
    """
    if isinstance(solver, (diffrax.Euler, diffrax.EulerHeun, diffrax.ItoMilstein, diffrax.StratonovichMilstein)):
        return 1, 0
    if isinstance(solver, diffrax.AbstractERK):
        stages = solver.tableau.num_stages
        return (stages - 1, 1) if solver.tableau.fsal else (stages, 0)
    if isinstance(solver, diffrax.AbstractSRK):
        ignored = solver.tableau.ignore_stage_f
        stages = len(solver.tableau.b_sol)
        return (stages if ignored is None else int(stages - sum(bool(i) for i in ignored))), 0
    raise ValueError(
        f"cannot count evaluations of {type(solver).__name__}: use diffrax.Euler, an explicit "
        "Runge–Kutta solver (Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, Dopri8), Milstein, "
        "Euler–Heun or a stochastic Runge–Kutta solver (ShARK, SEA, SRA1, ...)"
    )


def _info(stats: dict, solver: diffrax.AbstractSolver) -> SampleInfo:
    per_step, extra = evaluations_per_step(solver)
    return SampleInfo(
        nfe=extra + per_step * stats["num_steps"],
        num_steps=stats["num_steps"],
        num_accepted_steps=stats["num_accepted_steps"],
        num_rejected_steps=stats["num_rejected_steps"],
    )
class AbstractSamplingMethod(eqx.Module):
    """Maps ``x_start`` at forward time ``t_start`` to samples at ``t_end < t_start``."""

    @abc.abstractmethod
    def __call__(
        self,
        sde: AbstractSDE,
        model: AbstractPrediction,
        key: PRNGKeyArray,
        x_start: Array,
        t_start: float,
        t_end: float,
    ) -> tuple[Array, SampleInfo]:
        ...


def _check_diffrax_settings(num_steps: int | None, rtol: float, atol: float, solver) -> None:
    """Shared by the diffrax-based samplers: a step count or PID tolerances, a countable solver."""
    if num_steps is not None and num_steps < 1:
        raise ValueError("num_steps must be ≥ 1 (or None for adaptive steps)")
    if not (rtol > 0 and atol > 0):
        raise ValueError("rtol and atol must be > 0")
    evaluations_per_step(solver)


class ReverseDiffusion(AbstractSamplingMethod):
    """The reverse SDE with any diffrax SDE solver (default ``Euler``: Euler–Maruyama), one path per
    sample: on ``num_steps`` steps of ``grid`` with i.i.d. Brownian increments, or, with
    ``num_steps=None``, PID step control on ``rtol``/``atol`` (per sample, on a Brownian tree; needs
    a solver with an error estimate, e.g. ``ShARK`` or ``Heun`` for additive noise). Adaptive
    samples run in lockstep, so ``nfe`` counts the batch's longest solve.
    """

    num_steps: int | None = eqx.field(static=True)
    solver: diffrax.AbstractSolver = diffrax.Euler()
    grid: AbstractTimeGrid = UniformTime()
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = eqx.field(default=10_000, static=True)

    def __check_init__(self):
        _check_diffrax_settings(self.num_steps, self.rtol, self.atol, self.solver)

    def __call__(self, sde, model, key, x_start, t_start, t_end):
        reverse = ReverseSDE(sde, lambda t, x: model.score(sde, t, x))
        noise_dtype = jnp.float32 if x_start.dtype == jnp.float64 else None
        span = jnp.asarray([sde.t1 - t_start, sde.t1 - t_end], x_start.dtype)
        if self.num_steps is None:
            steps, max_steps = diffrax.PIDController(rtol=self.rtol, atol=self.atol), self.max_steps
        else:
            steps, max_steps = sde.t1 - self.grid.times(sde, t_start, t_end, self.num_steps), self.num_steps + 1
        dt0 = (t_start - t_end) / 100
        ys, stats = solve_paths(reverse, x_start, key, span, self.solver, steps, dt0, max_steps, noise_dtype)
        return ys[-1], _info(stats, self.solver)


class ProbabilityFlow(AbstractSamplingMethod):
    """The PF ODE with any explicit diffrax ODE solver, the whole batch as one state, integrated
    in the grid's variable ``τ``: ``dx/dτ = (f − ½∇·Σ − ½Σ s_θ)(t(τ), x) · t'(τ)``.

    ``num_steps`` takes equal steps in ``τ`` (the grid's times); ``None`` uses PID step control on
    ``rtol``/``atol`` (one step sequence shared by the batch, RMS norm over it). ``UniformLogSNR``
    or ``KarrasSigma`` keep the field smooth where ``UniformTime`` does not. Fixed steps of an
    explicit Runge–Kutta solver (Heun, Bosh3, Tsit5, Dopri5, ...) run its tableau in
    ``explicit_runge_kutta`` (the same steps as ``diffeqsolve``, with less work between model calls);
    everything else runs in ``diffeqsolve``.
    """

    solver: diffrax.AbstractSolver = diffrax.Tsit5()
    num_steps: int | None = eqx.field(default=None, static=True)
    grid: AbstractTimeGrid = UniformTime()
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = eqx.field(default=10_000, static=True)

    def __check_init__(self):
        _check_diffrax_settings(self.num_steps, self.rtol, self.atol, self.solver)

    def __call__(self, sde, model, key, x_start, t_start, t_end):
        if isinstance(sde, AbstractScheduleSDE) and not isinstance(model, Score):
            if ends_at_zero_noise(sde, t_end):
                raise ValueError(
                    "the PF-ODE field (α D − x)/σ² is 0/0 at σ = 0: end at t_end > t0, or use an "
                    "exponential integrator (DPMSolverPP, UniPC, ...) whose last step to σ = 0 is exact"
                )
        flow = ProbabilityFlowODE(sde, lambda t, x: model.score(sde, t, x))
        velocity = jax.vmap(flow.velocity, in_axes=(None, 0))

        def field(tau, x, args):
            t, dt_dtau = jax.jvp(lambda u: self.grid.time(sde, t_start, t_end, u), (tau,), (jnp.ones_like(tau),))
            return velocity(t, x) * dt_dtau

        if self.num_steps is None:
            controller = diffrax.PIDController(rtol=self.rtol, atol=self.atol)
        else:
            taus = jnp.linspace(0.0, 1.0, self.num_steps + 1, dtype=x_start.dtype)
            if isinstance(self.solver, diffrax.AbstractERK):
                x = explicit_runge_kutta(lambda tau, x: field(tau, x, None), self.solver.tableau, taus, x_start)
                n = self.num_steps
                return x, _info(dict(num_steps=n, num_accepted_steps=n, num_rejected_steps=0), self.solver)
            controller = diffrax.StepTo(taus)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            self.solver,
            t0=0.0,
            t1=1.0,
            dt0=None,
            y0=x_start,
            stepsize_controller=controller,
            max_steps=self.max_steps,
        )
        return sol.ys[-1], _info(sol.stats, self.solver)


class GridCoordinates(eqx.Module):
    """A grid ``t_0 > … > t_N`` of ``sde`` with ``α_i``, ``σ_i`` and the half log-SNR ``λ_i = log(α_i/σ_i)``
    (``+∞`` where ``σ = 0``), in the ``float`` dtype."""

    sde: AbstractScheduleSDE
    ts: Array
    alpha: Array
    sigma: Array
    lam: Array

    def __init__(self, sde: AbstractScheduleSDE, ts: Array):
        self.sde, self.ts = sde, ts
        self.alpha = jax.vmap(sde.alpha)(ts)
        self.sigma = jax.vmap(sde.sigma)(ts)
        self.lam = jnp.log(self.alpha) - jnp.log(self.sigma)

    def at(self, index: Array, offset: int) -> tuple[Array, Array, Array]:
        """``(α, σ, λ)`` at ``index + offset``. Before the start (warm-up steps, whose weights are
        unused) ``λ`` is extrapolated linearly so that every ratio stays finite: no ``0/0`` that
        reverse-mode differentiation through the sampler would turn into NaN."""
        j = index + offset
        k = jnp.clip(j, 0, self.ts.shape[0] - 1)
        lam = jnp.where(j < 0, self.lam[0] + j * (self.lam[1] - self.lam[0]), self.lam[k])
        return self.alpha[k], self.sigma[k], lam

    def time_at(self, index: Array) -> Array:
        """``t_index``, extrapolated linearly before the start (as ``at``)."""
        k = jnp.clip(index, 0, self.ts.shape[0] - 1)
        return jnp.where(index < 0, self.ts[0] + index * (self.ts[1] - self.ts[0]), self.ts[k])


class AbstractGridSampler(AbstractSamplingMethod):
    """A fixed-step sampler on ``num_steps`` steps of ``grid`` for a ``ScheduleSDE``, written as
    ``integrate(denoise, coords, x, key, ends_at_zero_noise)`` with ``denoise(t, x) = D(x, t)`` on
    the batch and ``ends_at_zero_noise`` whether ``σ(t_N) = 0``."""

    num_steps: eqx.AbstractVar[int]
    grid: eqx.AbstractVar[AbstractTimeGrid]

    @abc.abstractmethod
    def integrate(
        self, denoise, coords: GridCoordinates, x: Array, key: PRNGKeyArray, ends_at_zero_noise: bool
    ) -> Array:
        """Samples at ``t_N`` from ``x`` at ``t_0``."""

    @abc.abstractmethod
    def evaluations(self, ends_at_zero_noise: bool) -> int:
        """Model evaluations made (``ends_at_zero_noise``: ``σ(t_N) = 0``)."""

    def __call__(self, sde, model, key, x_start, t_start, t_end):
        if not isinstance(sde, AbstractScheduleSDE):
            raise TypeError(f"{type(self).__name__} needs a ScheduleSDE, got {type(sde).__name__}")
        if self.num_steps < 1:
            raise ValueError("num_steps must be ≥ 1")
        coords = GridCoordinates(sde, self.grid.times(sde, t_start, t_end, self.num_steps).astype(x_start.dtype))
        batched = jax.vmap(model.denoiser, in_axes=(None, None, 0))

        def denoise(t, x):
            return batched(sde, t, x)

        to_zero = ends_at_zero_noise(sde, t_end)
        x = self.integrate(denoise, coords, x_start, key, to_zero)
        n = self.num_steps
        return x, SampleInfo(self.evaluations(to_zero), n, n, 0)


@eqx.filter_jit
def _run(method, sde, model, key, x_start, t_start, t_end):
    return method(sde, model, key, x_start, t_start, t_end)


def time_span(sde: AbstractSDE, t_start: float | None, t_end: float | None) -> tuple[float, float]:
    """``(t_start, t_end)`` defaulting to ``(t1, t0)``, checked: ``t0 ≤ t_end < t_start ≤ t1``."""
    t_start = sde.t1 if t_start is None else float(t_start)
    t_end = sde.t0 if t_end is None else float(t_end)
    if not sde.t0 <= t_end < t_start <= sde.t1:
        raise ValueError(
            f"need t0 ≤ t_end < t_start ≤ t1 with [t0, t1] = [{sde.t0}, {sde.t1}], "
            f"got t_start={t_start}, t_end={t_end}"
        )
    return t_start, t_end


def sample(
    sde: AbstractSDE,
    model: AbstractPrediction | Callable[[Array, Array], Array],
    key: PRNGKeyArray,
    shape: tuple[int, ...] | None = None,
    *,
    method: AbstractSamplingMethod,
    x_start: ArrayLike | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
) -> tuple[Array, SampleInfo]:
    """Samples of ``p_{t_end}`` from ``x_start ~ p_{t_start}`` (default: ``sde.prior`` at ``t1``).

    ``model`` is a prediction (``sd.Score``, ``sd.Denoiser``, ``sd.Noise``, ``sd.Velocity``) or a
    plain score function ``(t, x) -> ∇ log p_t(x)`` of one example. ``shape = (n, *event_shape)``
    when ``x_start`` is not given. ``t_end`` defaults to ``t0``. Returns ``(samples, SampleInfo)``.
    """
    t_start, t_end = time_span(sde, t_start, t_end)
    key_start, key_run = jax.random.split(key)
    if x_start is None:
        if shape is None:
            raise ValueError("give shape=(n, ...) or x_start")
        x_start = sde.prior.sample(key_start, tuple(shape))
    x_start = check_finite(jnp.asarray(x_start, dtype=jnp.result_type(float)), "x_start")
    if shape is not None and tuple(shape) != x_start.shape:
        raise ValueError(f"x_start has shape {x_start.shape} but shape={tuple(shape)}")
    if x_start.ndim < 1:
        raise ValueError("x_start must be a batch of shape (n, ...)")
    samples, info = _run(method, sde, as_prediction(model), key_run, x_start, t_start, t_end)
    return samples, jax.tree.map(lambda v: int(v) if is_concrete(v) else v, info)
