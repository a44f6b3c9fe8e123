"""Sample paths of any ``AbstractSDE`` with any diffrax SDE solver."""

from __future__ import annotations

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._checks import check_finite
from .noise import ElementwiseNoise
from .sde import AbstractSDE

_LEVY_AREAS = (diffrax.BrownianIncrement, diffrax.SpaceTimeLevyArea, diffrax.SpaceTimeTimeLevyArea)


def levy_area_for(solver: diffrax.AbstractSolver) -> type:
    """The cheapest Brownian increment type that ``solver`` accepts."""
    minimal = getattr(solver, "minimal_levy_area", diffrax.AbstractBrownianIncrement)
    return next(area for area in _LEVY_AREAS if issubclass(area, minimal))


def step_grid(ts: ArrayLike, dt0: float) -> np.ndarray:
    """Steps of at most ``dt0`` that land on every ``ts`` (so saved states are never interpolated)."""
    ts = np.asarray(ts, dtype=float)
    pieces = [
        np.linspace(a, b, max(1, math.ceil((b - a) / dt0 - 1e-9)) + 1)[:-1]
        for a, b in zip(ts[:-1], ts[1:])
    ]
    return np.concatenate(pieces + [ts[-1:]])


def solve_paths(
    sde: AbstractSDE,
    x0: Array,
    key: PRNGKeyArray,
    ts: Array,
    solver: diffrax.AbstractSolver,
    steps: Array | diffrax.AbstractAdaptiveStepSizeController,
    dt0: float,
    max_steps: int,
    noise_dtype=None,
) -> tuple[Array, dict]:
    """Integrate a batch ``x0`` of shape ``(n, ...)`` one independent path per row.

    ``steps`` is a fixed grid (containing ``ts``), integrated with i.i.d. Brownian increments
    (``UnsafeBrownianPath``), or an adaptive controller started at ``dt0``, which needs a
    ``VirtualBrownianTree`` (repeated queries must agree). Returns states ``(len(ts), n, ...)``
    and diffrax's step statistics of the longest row. ``noise_dtype`` (default: the state's) is the
    dtype of the Brownian increments (samplers draw them in float32, see ``sampling_noise``).
    """
    x0 = check_finite(x0, "x0")
    noise = sde.noise(x0[0])
    noise_shape = noise.shape(x0.shape[1:], jax.eval_shape(sde.diffusion, sde.t0, x0[0]).shape)
    levy_area = levy_area_for(solver)
    noise_struct = jax.ShapeDtypeStruct(noise_shape, noise_dtype or x0.dtype)
    adaptive = isinstance(steps, diffrax.AbstractAdaptiveStepSizeController)

    def coefficient(t, x, args):
        diffusion = sde.diffusion(t, x)
        if isinstance(noise, ElementwiseNoise):
            return lx.DiagonalLinearOperator(jnp.broadcast_to(diffusion, x.shape))
        return diffusion

    def one_path(x, k):
        if adaptive:
            path = diffrax.VirtualBrownianTree(
                ts[0], ts[-1], tol=dt0 / 16, shape=noise_struct, key=k, levy_area=levy_area
            )
        else:
            path = diffrax.UnsafeBrownianPath(shape=noise_struct, key=k, levy_area=levy_area)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, args: sde.drift(t, y)), diffrax.ControlTerm(coefficient, path)
        )
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            t0=ts[0],
            t1=ts[-1],
            dt0=dt0 if adaptive else None,
            y0=x,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=steps if adaptive else diffrax.StepTo(steps),
            max_steps=max_steps,
            # i.i.d. increments cannot be replayed, so no reverse-mode checkpointing
            adjoint=diffrax.RecursiveCheckpointAdjoint() if adaptive else diffrax.ForwardMode(),
        )
        return sol.ys, sol.stats

    ys, stats = jax.vmap(one_path)(x0, jax.random.split(key, x0.shape[0]))
    # vmapped solves run in lockstep until the longest finishes: report that one
    return jnp.swapaxes(ys, 0, 1), jax.tree.map(jnp.max, stats)


def simulate(
    sde: AbstractSDE,
    x0: ArrayLike,
    key: PRNGKeyArray,
    ts: ArrayLike,
    *,
    solver: diffrax.AbstractSolver = diffrax.Euler(),
    dt0: float | None = None,
    stepsize_controller: diffrax.AbstractAdaptiveStepSizeController | None = None,
    max_steps: int = 100_000,
) -> Array:
    """Forward sample paths: ``x0`` of shape ``(n, ...)`` started at ``ts[0]``, states at ``ts``.

    ``ts`` must increase within ``[t0, t1]``. Steps are at most ``dt0`` (default: 1/1000 of the
    span) and land on every ``ts``; pass ``stepsize_controller`` for adaptive steps.
    Returns an array of shape ``(len(ts), n, ...)``.
    """
    ts_np = np.asarray(ts, dtype=float)
    if ts_np.ndim != 1 or ts_np.size < 2 or not np.all(np.diff(ts_np) > 0):
        raise ValueError("ts must be a 1-D increasing array with at least two times")
    if ts_np[0] < sde.t0 or ts_np[-1] > sde.t1:
        raise ValueError(f"ts must lie in [t0, t1] = [{sde.t0}, {sde.t1}], got [{ts_np[0]}, {ts_np[-1]}]")
    x0 = jnp.asarray(x0, dtype=jnp.result_type(float))
    if x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a batch of shape (n, ...), got {x0.shape}")
    dt0 = (ts_np[-1] - ts_np[0]) / 1000 if dt0 is None else float(dt0)
    if not dt0 > 0:
        raise ValueError("dt0 must be > 0")
    steps = stepsize_controller or jnp.asarray(step_grid(ts_np, dt0), dtype=x0.dtype)
    ys, _ = _solve_paths(sde, x0, key, jnp.asarray(ts_np, x0.dtype), solver, steps, dt0, max_steps)
    return ys


_solve_paths = eqx.filter_jit(solve_paths)
