"""Learn the time grid of a fixed-step sampler: put a budget of ``N`` steps where they matter.

For a deterministic grid sampler ``Φ_t`` (DPM-Solver++, UniPC, DEIS, DDIM, ...) on the grid
``t = (t_0 > t_1 > … > t_N)`` with fixed ends ``t_0 = t_start``, ``t_N = t_end``, and accurate
probability-flow endpoints ``y_n = Ψ(x_n)`` of starts ``x_n ~ p_{t_start}`` (an adaptive solve),
minimise the mean squared endpoint error per coordinate

    L(t) = 1/(n d) Σ_n ‖Φ_t(x_n) − y_n‖²

over the ``N − 1`` interior times. They live in the half log-SNR ``λ = ½ log(α²/σ²)``, which
increases from ``λ_0 = λ(t_start)`` to ``λ_N = λ(t_end)``:

    λ_i = λ_0 + (λ_N − λ_0) Σ_{j ≤ i} softmax(θ)_j,      t_i = t(λ_i) = sde.t_from_log_snr(2 λ_i),

so every ``θ ∈ R^N`` gives a strictly decreasing grid with exact ends, and ``θ = 0`` is the uniform
log-SNR grid. ``θ`` starts at the log λ-increments of the candidate initial grid with the lowest
training loss (by default uniform log-SNR, Karras ρ = 7 and DDPM's uniform VP times): the loss is
not convex in ``θ``, and at d = 64 on the exact-mixture benchmark the start decides as much as the
descent (UniPC-3, 10 NFE, 1024 training starts: 0.058 from log-SNR, 0.039 from VP times). ``σ(t_end) = 0``
(``λ_N = ∞``) is rejected: the samplers' jump to clean data has NaN derivatives (``log σ`` of the
last grid point), so optimise to a small ``t_end`` with ``σ(t_end) > 0``.

``L`` is minimised by Adam with a cosine-decaying learning rate, keeping the iterate of lowest
training loss. The gradient is taken in forward mode (``jax.jacfwd``: one batched tangent per
parameter, cheap because ``N`` is small, and free of the sampler's memory for reverse mode). The
error ``√L`` on held-out starts, for the initial and the optimised grid, shows whether the grid
generalises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray
from tqdm import tqdm

from .grids import AbstractTimeGrid, GivenTimes, KarrasSigma, UniformLogSNR, UniformTimeOf
from .parametrization import AbstractPrediction, as_prediction
from .sample import AbstractGridSampler, AbstractSamplingMethod, ProbabilityFlow, sample, time_span
from .schedule import VP, AbstractScheduleSDE


class GridOptimization(eqx.Module):
    """What ``optimize_grid`` found.

    - ``method``: the sampler on the optimised grid, for ``sd.sample(..., method=result.method,
      t_start=..., t_end=...)`` with the same ``t_start``/``t_end``.
    - ``grid`` = ``GivenTimes(times)``; ``initial_grid`` = ``GivenTimes(initial_times)``, the
      candidate (``initial_candidate``) with the lowest training loss.
    - ``train_loss[k]``: training MSE before update ``k``; ``best_iteration``: the kept iterate.
    - ``validation_error_initial`` / ``validation_error``: RMS endpoint error per coordinate on the
      held-out starts, initial vs optimised grid.
    """

    method: AbstractGridSampler
    grid: GivenTimes
    times: Array
    initial_grid: GivenTimes
    initial_times: Array
    initial_candidate: AbstractTimeGrid
    train_loss: Array
    best_iteration: int = eqx.field(static=True)
    validation_error_initial: float = eqx.field(static=True)
    validation_error: float = eqx.field(static=True)


def _check_method(method: AbstractSamplingMethod) -> None:
    kinds = "an AbstractGridSampler such as sd.DPMSolverPP, sd.UniPC, sd.DEIS, sd.DDIM"
    if not isinstance(method, AbstractGridSampler):
        raise TypeError(f"optimize_grid needs a fixed-grid sampler ({kinds}), got {type(method).__name__}")
    if method.num_steps < 2:
        raise ValueError(f"need num_steps ≥ 2 (one step has no interior time to move), got {method.num_steps}")


def _check_deterministic(sde, model, method, x, t_start, t_end) -> None:
    """The objective compares with PF-ODE endpoints: the sampler must not depend on its key."""
    a, b = (
        sample(sde, model, jax.random.key(seed), x_start=x, method=method, t_start=t_start, t_end=t_end)[0]
        for seed in (0, 1)
    )
    if not bool(jnp.all(a == b)):
        raise ValueError(
            f"{type(method).__name__} adds noise (its output depends on the key); optimize_grid matches "
            "PF-ODE endpoints and needs a deterministic sampler (eta=0, churn=0)"
        )


def optimize_grid(
    sde: AbstractScheduleSDE,
    model: AbstractPrediction | Callable[[Array, Array], Array],
    method: AbstractGridSampler,
    key: PRNGKeyArray,
    *,
    x_start_sampler: Callable[[PRNGKeyArray, int], Array],
    t_start: float | None = None,
    t_end: float | None = None,
    num_train: int = 256,
    num_val: int = 256,
    iterations: int = 200,
    learning_rate: float = 0.03,
    initial_grid: AbstractTimeGrid | Sequence[AbstractTimeGrid] = (UniformLogSNR(), KarrasSigma(), UniformTimeOf(VP())),
    reference_method: AbstractSamplingMethod | None = None,
    progress: bool = True,
) -> GridOptimization:
    """Optimise the ``method.num_steps + 1`` times of a deterministic grid sampler; the objective
    and the parametrisation are in the module docstring.

    **Arguments:**

    - ``sde``: a ``ScheduleSDE``; ``model``: a prediction (``sd.Denoiser``, ...) or a score function.
    - ``method``: a fixed-grid sampler, e.g. ``sd.DPMSolverPP(num_steps=5, order=2)``, whose
      ``num_steps ≥ 2`` is the budget; its ``grid`` is replaced by ``sd.GivenTimes``.
    - ``key``: draws the training and validation starts (and is passed to the sampler).
    - ``x_start_sampler(key, n)``: ``n`` draws of ``p_{t_start}``, shape ``(n, ...)``.
    - ``t_start``, ``t_end``: default ``sde.t1`` and ``sde.t0``; ``σ(t_end) > 0`` is required.
    - ``num_train`` / ``num_val``: training starts and held-out validation starts.
    - ``iterations``, ``learning_rate``: Adam, cosine decay from ``learning_rate`` to 1% of it.
    - ``initial_grid``: the starting grid, or candidates of which the one with the lowest training
      loss is used; the start is the baseline of ``validation_error_initial``.
    - ``reference_method``: the accurate PF-ODE solve, run through ``sd.sample``; default
      ``ProbabilityFlow(Dopri8(), grid=UniformLogSNR(), rtol=atol=1e-9)`` (1e-6 in float32).
      Enable float64 (``jax.config.update("jax_enable_x64", True)``): in float32 the references
      and the loss are good to ~1e-6 only.
    - ``progress``: show a tqdm bar with the training loss.
    """
    if not isinstance(sde, AbstractScheduleSDE):
        raise TypeError(f"optimize_grid needs a ScheduleSDE (a noise level σ/α), got {type(sde).__name__}")
    _check_method(method)
    t_start, t_end = time_span(sde, t_start, t_end)
    if not float(sde.sigma(t_end)) > 0:
        raise ValueError(
            f"σ(t_end) = 0 at t_end={t_end}: the final jump to clean data has no usable derivative; "
            "pass a t_end with σ(t_end) > 0 (e.g. t_end=1e-3 for sd.VP, sd.EDM's default t0=0.002)"
        )
    for name, value in [("num_train", num_train), ("num_val", num_val), ("iterations", iterations)]:
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if not callable(x_start_sampler):
        raise TypeError("x_start_sampler must be a callable (key, n) -> array of shape (n, ...)")
    model = as_prediction(model)
    dtype = jnp.result_type(float)
    if reference_method is None:
        tol = 1e-9 if dtype == jnp.float64 else 1e-6
        reference_method = ProbabilityFlow(diffrax.Dopri8(), grid=UniformLogSNR(), rtol=tol, atol=tol)

    candidates = (initial_grid,) if isinstance(initial_grid, AbstractTimeGrid) else tuple(initial_grid)
    if not candidates or not all(isinstance(g, AbstractTimeGrid) for g in candidates):
        raise TypeError(f"initial_grid must be a time grid or a non-empty sequence of them, got {initial_grid!r}")
    candidate_times = [jnp.asarray(g.times(sde, t_start, t_end, method.num_steps), dtype) for g in candidates]
    candidate_increments = [jnp.diff(0.5 * jax.vmap(sde.log_snr)(ts)) for ts in candidate_times]
    for ts, increments in zip(candidate_times, candidate_increments):
        if not bool(jnp.all(increments > 0)):
            raise ValueError(f"initial_grid must give strictly decreasing times, got {ts}")
    lam0, lam_end = (0.5 * sde.log_snr(jnp.asarray(t, dtype)) for t in (t_start, t_end))
    span = lam_end - lam0

    def times(theta: Array) -> Array:
        inner = lam0 + span * jnp.cumsum(jax.nn.softmax(theta))[:-1]
        ends = jnp.full((1,), t_start, dtype), jnp.full((1,), t_end, dtype)
        return jnp.concatenate([ends[0], jax.vmap(sde.t_from_log_snr)(2 * inner), ends[1]])

    def with_times(ts: Array) -> AbstractGridSampler:
        return eqx.tree_at(lambda m: m.grid, method, GivenTimes(ts))

    # -- starts and reference endpoints ------------------------------------------------------------
    key_train, key_val, key_ref, key_method = jax.random.split(key, 4)
    starts = []
    for k, n, name in [(key_train, num_train, "training"), (key_val, num_val, "validation")]:
        x = jnp.asarray(x_start_sampler(k, n), dtype)
        if x.ndim < 1 or x.shape[0] != n:
            raise ValueError(f"x_start_sampler(key, {n}) must return shape ({n}, ...), got {x.shape}")
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"x_start_sampler returned non-finite {name} starts")
        starts.append(x)
    x_train, x_val = starts
    _check_deterministic(sde, model, with_times(candidate_times[0]), x_train[:4], t_start, t_end)
    y_train, y_val = (
        sample(sde, model, key_ref, x_start=x, method=reference_method, t_start=t_start, t_end=t_end)[0]
        for x in starts
    )

    # -- start: θ, the softmax logits of the λ increments of the best candidate ---------------------
    def mse(ts: Array, x: Array, y: Array) -> Array:
        out, _ = with_times(ts)(sde, model, key_method, x, t_start, t_end)
        return jnp.mean((out - y) ** 2)

    evaluate = eqx.filter_jit(mse)
    losses = [float(evaluate(ts, x_train, y_train)) for ts in candidate_times]
    chosen = min(range(len(candidates)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
    ts_init = candidate_times[chosen]
    theta = jnp.log(candidate_increments[chosen] / span)

    # -- optimisation --------------------------------------------------------------------------
    def loss(theta: Array, x: Array, y: Array) -> tuple[Array, Array]:
        value = mse(times(theta), x, y)
        return value, value

    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, iterations, alpha=0.01))

    @eqx.filter_jit
    def step(theta, opt_state, x, y):
        grad, value = jax.jacfwd(loss, has_aux=True)(theta, x, y)
        updates, opt_state = optimizer.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, value, jnp.all(jnp.isfinite(grad))

    opt_state = optimizer.init(theta)
    history, best_theta, best_loss, best_iteration = [], theta, float("inf"), 0
    bar = tqdm(range(iterations), disable=not progress, desc="optimize_grid")
    for k in bar:
        new_theta, opt_state, value, finite = step(theta, opt_state, x_train, y_train)
        value = float(value)
        if not (bool(finite) and math.isfinite(value)):
            raise FloatingPointError(f"non-finite training loss or gradient at iteration {k} (loss {value})")
        history.append(value)
        if value < best_loss:
            best_theta, best_loss, best_iteration = theta, value, k
        theta = new_theta
        bar.set_postfix(loss=f"{value:.3e}", best=f"{best_loss:.3e}", refresh=False)

    grid = GivenTimes(times(best_theta))
    return GridOptimization(
        method=with_times(grid.ts),
        grid=grid,
        times=grid.ts,
        initial_grid=GivenTimes(ts_init),
        initial_times=ts_init,
        initial_candidate=candidates[chosen],
        train_loss=jnp.asarray(history),
        best_iteration=best_iteration,
        validation_error_initial=float(jnp.sqrt(evaluate(ts_init, x_val, y_val))),
        validation_error=float(jnp.sqrt(evaluate(grid.ts, x_val, y_val))),
    )
