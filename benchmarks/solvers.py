"""Exact-GMM sampler benchmark: the problem and metrics of ``shared/reference/PEERS.md``.

EDM noising (σ = t from 80 down to 0.002), a Gaussian-mixture data law whose denoiser is exact, and
every sampler started from exact samples of p_80. Three metrics, all divided by the data std:

- traj: per-coordinate RMSE between a sampler's endpoints and high-accuracy PF-ODE endpoints of the
  same starts (deterministic samplers only);
- SW2: sliced Wasserstein-2 between a sampler's outputs and exact samples of p_0.002;
- overhead (d = 64, NFE 20): wall time of one sampler call / wall time of 20 bare denoiser calls.

Usage: ``python benchmarks/solvers.py`` (full, about 20 minutes on a 2-core CPU) or ``--quick`` (under a
minute). Tables go to stdout (and ``tables.md``), numbers to ``results.csv`` (row by row, so an
interrupted run keeps what it measured), ``fresh_draws.csv`` and ``overhead.csv``, a
figure to ``solvers.png`` under ``--out``. Methods live in the two registries below: add a line to
benchmark a new sampler; classes missing from ``sde_diffusion`` are skipped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import sde_diffusion as sd
from sde_diffusion.sample import evaluations_per_step

# ------------------------------------------------------------------------------------------------
# Method registry
# ------------------------------------------------------------------------------------------------

# Grids learnt by sd.optimize_grid for the model and the budget (validated on held-out starts, then
# measured here on the benchmark's own starts), for budgets up to OPTIMIZE_MAX_BUDGET.
OPTIMIZED = "optimized"
OPTIMIZE_MAX_BUDGET = 20
OPTIMIZE_SETTINGS = dict(num_train=1024, num_val=1024, iterations=200, progress=False)  # default initial candidates

GRIDS: dict[str, Callable[[], sd.AbstractTimeGrid]] = {
    "UniformLogSNR": sd.UniformLogSNR,
    "KarrasSigma": sd.KarrasSigma,
    "UniformTimeOf(VP)": lambda: sd.UniformTimeOf(sd.VP()),  # DDPM's linspace carried over by log-SNR
    OPTIMIZED: sd.UniformLogSNR,  # placeholder: the optimiser starts from the best of its candidate grids
    "λ-steps": sd.UniformLogSNR,  # unused: the adaptive multistep chooses its own steps in λ
}


@dataclasses.dataclass(frozen=True)
class Fixed:
    """A fixed-step sampler: ``make(num_steps, grid)`` builds it, ``nfe(num_steps)`` is the number
    of model calls it must make (the budget factory picks the largest ``num_steps`` within budget)."""

    name: str
    cls: str  # attribute of sde_diffusion that must exist
    make: Callable[[int, sd.AbstractTimeGrid], sd.AbstractSamplingMethod]
    nfe: Callable[[int], int]
    grids: tuple[str, ...] = ("UniformLogSNR", "KarrasSigma")
    stochastic: bool = False


@dataclasses.dataclass(frozen=True)
class Adaptive:
    """An adaptive sampler ``make(tol, grid)``, swept over ``rtol = atol = tol``."""

    name: str
    make: Callable[[jax.Array, sd.AbstractTimeGrid], sd.AbstractSamplingMethod]
    grid: str = "UniformLogSNR"


def _pid(solver: diffrax.AbstractSolver) -> Callable:
    return lambda tol, grid: sd.ProbabilityFlow(solver, grid=grid, rtol=tol, atol=tol)


def _pf(solver: diffrax.AbstractSolver) -> tuple[Callable, Callable[[int], int]]:
    per_step, extra = evaluations_per_step(solver)
    make = lambda n, grid: sd.ProbabilityFlow(solver, num_steps=n, grid=grid)  # noqa: E731
    return make, lambda n: per_step * n + extra


def _new(cls: str, **kwargs) -> Callable:
    """Builder of ``sd.<cls>(num_steps=n, grid=grid, **kwargs)``, looked up when called."""
    return lambda n, grid: getattr(sd, cls)(num_steps=n, grid=grid, **kwargs)


_one_per_step = lambda n: n  # noqa: E731  multistep methods (warm-up and last step included)
_two_per_step = lambda n: 2 * n  # noqa: E731  singlestep 2nd order ending at σ > 0

FIXED: list[Fixed] = [
    Fixed("PF-Euler", "ProbabilityFlow", *_pf(diffrax.Euler())),
    Fixed("PF-Heun", "ProbabilityFlow", *_pf(diffrax.Heun())),
    Fixed("PF-Tsit5", "ProbabilityFlow", *_pf(diffrax.Tsit5())),
    Fixed("DDIM", "DDIM", _new("DDIM", eta=0.0), _one_per_step),
    Fixed("DPMSolverPP-1", "DPMSolverPP", _new("DPMSolverPP", order=1), _one_per_step),
    *[
        Fixed(f"DPMSolverPP-{k}", "DPMSolverPP", _new("DPMSolverPP", order=k), _one_per_step,
              grids=("UniformLogSNR", "KarrasSigma", "UniformTimeOf(VP)") + ((OPTIMIZED,) if k == 3 else ()))
        for k in (2, 3)
    ],
    *[Fixed(f"DEIS-{k}", "DEIS", _new("DEIS", order=k), _one_per_step) for k in (2, 3)],
    *[
        Fixed(f"UniPC-{k}-{v}", "UniPC", _new("UniPC", order=k, variant=v), _one_per_step,
              grids=("UniformLogSNR", "KarrasSigma", "UniformTimeOf(VP)") + ((OPTIMIZED,) if (k, v) == (3, "bh2") else ()))
        for k in (2, 3)
        for v in ("bh1", "bh2")
    ],
    Fixed("DPMSolverPP2S", "DPMSolverPP2S", _new("DPMSolverPP2S"), _two_per_step),
    Fixed("EDMHeun", "EDMHeun", _new("EDMHeun"), _two_per_step),
    # stochastic: SW2 only
    Fixed("DPMSolverPP2MSDE", "DPMSolverPP2MSDE", _new("DPMSolverPP2MSDE", eta=1.0), _one_per_step, stochastic=True),
    Fixed(
        "EulerMaruyama",
        "ReverseDiffusion",
        lambda n, grid: sd.ReverseDiffusion(n, grid=grid),
        _one_per_step,
        grids=("KarrasSigma",),
        stochastic=True,
    ),
]

ADAPTIVE: list[Adaptive] = [
    Adaptive("PF-Tsit5-PID", _pid(diffrax.Tsit5())),
    Adaptive("PF-Dopri5-PID", _pid(diffrax.Dopri5())),
    # max_steps: at rtol = 1e-8 this second-order method needs more than the default 1000 steps
    Adaptive("AdaptiveDPMSolverPP", lambda tol, grid: sd.AdaptiveDPMSolverPP(rtol=tol, atol=tol, max_steps=4000),
             grid="λ-steps"),  # fmt: skip
]


TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
QUICK_TOLS = (1e-4, 1e-8)
QUICK_METHODS = (  # "--methods" patterns: substrings of "name grid"
    "PF-Euler UniformLogSNR", "EulerMaruyama", "DDIM KarrasSigma", "DPMSolverPP-2 UniformLogSNR", "PF-Tsit5-PID",
)  # fmt: skip
REFERENCE = dict(solver=diffrax.Dopri8(), rtol=1e-10, atol=1e-10)  # grid: UniformLogSNR
OVERHEAD_NFE = 20
OVERHEAD_DIM = 64

# ------------------------------------------------------------------------------------------------
# Peer figures (shared/reference/PEERS.md)
# ------------------------------------------------------------------------------------------------

PEER_DATA_STD = {2: 0.715, 64: 0.766}
PEER_FLOOR = {2: (0.0197, 0.0056), 64: (0.0143, 0.0007)}
PEER_TRAJ = {
    64: {5: (0.254, "UniPC-3 (VP grid)"), 10: (0.138, "UniPC-3 (VP grid)"), 20: (0.0331, "DPM++ 3M (EDM)"),
         50: (0.00222, "DPM++ 3M (EDM)"), 100: (3.7e-4, "LMS")},
    2: {5: (0.218, "LMS (Karras grid)"), 10: (0.0804, "LMS"), 20: (0.0253, "LMS"), 50: (0.00451, "DPM++ 3M"),
        100: (2.6e-4, "Dopri5, uniform log-σ, 97 NFE")},
}  # fmt: skip
PEER_TRAJ_ADAPTIVE = {
    64: [(72, 4.9e-4, "k-diffusion dpm_adaptive"), (120, 6.0e-5, "k-diffusion dpm_adaptive"),
         (97, 3.1e-4, "diffrax Dopri5 + PID")],
}  # fmt: skip
PEER_SW2 = {
    64: {5: (0.127, "UniPC-3 (VP)"), 10: (0.0686, "LMS"), 20: (0.0167, "DEIS-2 (VP)"),
         50: (0.0143, "at the noise floor"), 100: (0.0143, "at the noise floor")},
}  # fmt: skip
PEER_SW2_STOCHASTIC = {
    64: {5: (0.155, "best stochastic"), 10: (0.0795, "best stochastic"), 20: (0.0233, "best stochastic"),
         100: (0.0255, "Euler–Maruyama")},
}  # fmt: skip
PEER_OVERHEAD = (
    "PEERS.md overhead (NFE 20, d = 64, batch 20000): diffrax Euler 1.0–1.4, k-diffusion DPM++ 2M 1.8, "
    "diffusionjax EDM Heun 2.0, diffusers ODE schedulers 1.9–3.7 (UniPC-3 6.6), diffrax Heun 3.0–3.7, "
    "Tsit5/Dopri5 4.0–4.7; SDE samplers with a Brownian tree 217–262 (i.i.d. noise 5.6–6.4)."
)

# ------------------------------------------------------------------------------------------------
# Problem
# ------------------------------------------------------------------------------------------------


class SlicedW2:
    """``sd.sliced_wasserstein(x, target, key, num_projections)`` against a fixed ``target`` (and any
    ``extra_targets``, on the same directions), drawn from ``key`` exactly as the library does but
    sorted by numpy, the targets' projections sorted once and ``x``'s once for all targets. Same
    number (tests/test_benchmarks.py checks it); on CPU, XLA's sort of a (20000, 512) array takes
    seconds where numpy's takes tens of milliseconds. An extra target of m = k·n points (n that of
    ``target``) is read at its n mid-quantiles, sorted index ``(i m + m // 2) // n``: the distance
    to a law known through a larger sample."""

    def __init__(self, target: jax.Array, key: jax.Array, num_projections: int = 512, extra_targets=()):
        target = jnp.asarray(target).reshape(target.shape[0], -1)
        theta = jax.random.normal(key, (target.shape[1], num_projections), dtype=target.dtype)
        self.theta = np.asarray(theta / jnp.linalg.norm(theta, axis=0))
        n = target.shape[0]

        def at_n_quantiles(t) -> np.ndarray:
            projected = self._sorted(t)
            m = projected.shape[1]
            if m % n:
                raise ValueError(f"a target of {m} points cannot be read at {n} quantiles: need a multiple of {n}")
            return projected[:, (np.arange(n) * m + m // 2) // n]  # the identity when m = n

        self.sorted_targets = [at_n_quantiles(t) for t in (target, *extra_targets)]

    def _sorted(self, x) -> np.ndarray:
        x = np.asarray(x).reshape(x.shape[0], -1)
        return np.sort(self.theta.T @ x.T, axis=-1)  # (projections, n): sort along the contiguous axis

    def each(self, x) -> list[float]:
        """SW2 of ``x`` against ``target``, then each of ``extra_targets``."""
        n = self.sorted_targets[0].shape[1]
        if x.shape[0] != n:
            raise ValueError(f"need {n} samples, got {x.shape[0]}")
        projected = self._sorted(x)
        return [float(np.sqrt(np.mean((projected - t) ** 2))) for t in self.sorted_targets]

    def __call__(self, x) -> float:
        return self.each(x)[0]


@dataclasses.dataclass
class Problem:
    """One dimension's fixed objects: built once so that compiled samplers are reused."""

    dim: int
    sde: sd.EDM
    mixture: sd.GaussianMixture
    model: sd.Denoiser
    data_std: float
    starts: jax.Array  # (batch, d) exact samples of p_80
    target: jax.Array  # (batch, d) exact samples of p_0.002
    reference: jax.Array  # (batch, d) PF-ODE endpoints of starts: exact samples of p_0.002 paired with them
    reference_nfe: int
    sample_key: jax.Array
    sw2: SlicedW2  # against target, then the stratified target
    floor: tuple[float, float, float, float, int]  # SW2 / data std of two exact sets: mean, std, min, max, repeats
    reference_sw2: float  # SW2 / data std of reference against target: the floor of this very draw
    # with component-stratified sets (exact counts, `stratified=True`): the floor of an i.i.d. set
    # against a stratified one and of two stratified ones, the reference against a stratified target
    floor_against_stratified: tuple[float, float, float, float, int]
    floor_stratified: tuple[float, float, float, float, int]
    reference_sw2_against_stratified: float


def reference_method() -> sd.ProbabilityFlow:
    """The high-accuracy PF-ODE solve whose endpoints are the exact answer (traj's ``x_ref``)."""
    return sd.ProbabilityFlow(grid=sd.UniformLogSNR(), **REFERENCE)


def benchmark_mixture(dim: int, seed: int) -> tuple[sd.GaussianMixture, float]:
    """The data law (the ring at d = 2, a random mixture otherwise) and its std √(trace Cov / d)."""
    key = jax.random.key(seed)
    mixture = sd.GaussianMixture.ring(key) if dim == 2 else sd.GaussianMixture.random(key, dim=dim)
    return mixture, math.sqrt(float(jnp.trace(mixture.covariance())) / dim)


def build_problem(dim: int, seed: int, batch: int, floor_repeats: int = 10) -> Problem:
    sde = sd.EDM()
    key = jax.random.key(seed)
    mixture, data_std = benchmark_mixture(dim, seed)
    model = sd.Denoiser(functools.partial(mixture.denoiser, sde))
    k_start, k_target, k_sample, k_proj, k_floor = jax.random.split(jax.random.fold_in(key, 1), 5)
    starts = mixture.marginal_sample(sde, sde.t1, k_start, batch)
    target = mixture.marginal_sample(sde, sde.t0, k_target, batch)
    reference, info = sd.sample(sde, model, k_sample, x_start=starts, method=reference_method())

    def floor(key: jax.Array, stratified: tuple[bool, bool]) -> tuple[float, float, float, float, int]:
        values = []
        for k in jax.random.split(key, floor_repeats):
            k1, k2, k3 = jax.random.split(k, 3)
            a, b = (mixture.marginal_sample(sde, sde.t0, kk, batch, s) for kk, s in zip((k1, k2), stratified))
            values.append(SlicedW2(a, k3)(b) / data_std)
        return statistics.mean(values), statistics.stdev(values), min(values), max(values), floor_repeats

    stratified_target = mixture.marginal_sample(sde, sde.t0, k_target, batch, stratified=True)
    sw2 = SlicedW2(target, k_proj, extra_targets=[stratified_target])
    reference_sw2, reference_sw2_against_stratified = (v / data_std for v in sw2.each(reference))
    return Problem(
        dim, sde, mixture, model, data_std, starts, target, reference, info.nfe, k_sample, sw2,
        floor(k_floor, (False, False)), reference_sw2,
        floor(jax.random.fold_in(k_floor, 1), (False, True)), floor(jax.random.fold_in(k_floor, 2), (True, True)),
        reference_sw2_against_stratified,
    )  # fmt: skip


def optimized(problem: Problem, method: sd.AbstractSamplingMethod, key: jax.Array) -> sd.GridOptimization:
    """``sd.optimize_grid`` for this problem's model, on its own training and held-out starts."""
    draw = lambda k, n: problem.mixture.marginal_sample(problem.sde, problem.sde.t1, k, n)  # noqa: E731
    return sd.optimize_grid(problem.sde, problem.model, method, key, x_start_sampler=draw, **OPTIMIZE_SETTINGS)


def steps_for_budget(entry: Fixed, budget: int) -> int | None:
    """The largest ``num_steps`` whose NFE fits in ``budget``, or None."""
    feasible = [n for n in range(1, budget + 1) if entry.nfe(n) <= budget]
    return max(feasible) if feasible else None


def run_one(problem: Problem, method: sd.AbstractSamplingMethod, stochastic: bool, traj_points: int) -> dict:
    t = time.perf_counter()
    x, info = sd.sample(problem.sde, problem.model, problem.sample_key, x_start=problem.starts, method=method)
    x.block_until_ready()
    seconds = time.perf_counter() - t
    traj = traj_worst = math.nan
    if not stochastic:
        err = np.asarray(x[:traj_points] - problem.reference[:traj_points])
        per_point = np.sqrt(np.mean(err**2, axis=-1)) / problem.data_std  # per-coordinate RMSE of each point
        traj, traj_worst = float(np.sqrt(np.mean(per_point**2))), float(np.max(per_point))
    sw2, sw2_stratified = (v / problem.data_std for v in problem.sw2.each(x))
    return dict(nfe=info.nfe, traj=traj, traj_worst=traj_worst, sw2=sw2, sw2_stratified=sw2_stratified, seconds=seconds)


def fresh_draws(problem: Problem, methods: dict[int, tuple[str, sd.AbstractSamplingMethod]], draws: int) -> list[dict]:
    """Each ``budget: (label, method)`` re-scored on ``draws`` fresh sets of starts, target and
    directions, each paired with the exact PF ODE of its own starts.

    SW2 between finite sets has a floor f (two exact sets); a sampler with error e scores about
    √(f² + e²). So e ≈ √(SW2² − SW2_exact²) with SW2_exact the score of the exact endpoints of the
    same starts against the same target: the floor removed draw by draw, comparable across problems
    with different floors. Fresh draws also undo the winner's curse of picking the best row on one draw.
    """
    sde, mixture, batch = problem.sde, problem.mixture, problem.starts.shape[0]
    rows = []
    fresh_key = jax.random.fold_in(problem.sample_key, 0)  # optimized() folds in num_steps ≥ 1
    for i, key in enumerate(jax.random.split(fresh_key, draws)):
        k_start, k_target, k_proj, k_sample = jax.random.split(key, 4)
        starts = mixture.marginal_sample(sde, sde.t1, k_start, batch)
        sw2 = SlicedW2(mixture.marginal_sample(sde, sde.t0, k_target, batch), k_proj)
        exact, _ = sd.sample(sde, problem.model, k_sample, x_start=starts, method=reference_method())
        exact_sw2 = sw2(exact) / problem.data_std
        for budget, (label, method) in methods.items():
            x, info = sd.sample(sde, problem.model, k_sample, x_start=starts, method=method)
            rows.append(dict(dim=problem.dim, budget=budget, method=label, draw=i, nfe=info.nfe,
                             sw2=sw2(x) / problem.data_std, exact_sw2=exact_sw2))  # fmt: skip
    return rows


def floor_removed(rows: list[dict]) -> tuple[float, float]:
    """``√max(mean(SW2² − SW2_exact²), 0)`` over paired draws, and the same with the mean raised by
    two standard errors: an upper bound on the sampler's own SW2 error."""
    d = [r["sw2"] ** 2 - r["exact_sw2"] ** 2 for r in rows]
    mean = statistics.mean(d)
    sem = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return math.sqrt(max(mean, 0.0)), math.sqrt(max(mean + 2 * sem, 0.0))


def _timer(fn: Callable[[], object], min_seconds: float = 0.05) -> Callable[[], float]:
    """A function returning one timed sample (seconds per call) of ``fn`` (already compiled); a
    fast call is repeated within a sample so that it lasts ≥ ``min_seconds`` (timer noise)."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    calls = max(1, math.ceil(min_seconds / max(time.perf_counter() - t, 1e-9)))

    def sample() -> float:
        t = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(fn())
        return (time.perf_counter() - t) / calls

    return sample


def _paired_times(fn: Callable[[], object], baseline: Callable[[], float], repeats: int) -> tuple[float, ...]:
    """Medians and minima ``(fn, baseline, fn_min, baseline_min)`` of ``repeats`` samples of each
    taken alternately, so that load and clock drift on a shared machine hit both sides of the
    ratio alike (the minima: the least disturbed runs of a deterministic workload)."""
    sample = _timer(fn)
    pairs = [(sample(), baseline()) for _ in range(repeats)]
    ours, bare = zip(*pairs)
    return statistics.median(ours), statistics.median(bare), min(ours), min(bare)


def measure_overhead(problem: Problem, entries: list[tuple[Fixed, str]], repeats: int) -> tuple[float, list[dict]]:
    """Wall time of one sampler call at NFE ≤ 20 over that of 20 bare (vmapped, jitted) denoiser
    calls, timed alternately with it."""
    sde, fn = problem.sde, problem.model.fn
    denoise = jax.vmap(fn, in_axes=(None, 0))

    @jax.jit
    def bare(x):
        def body(i, x):  # output fed back and t varying: nothing to hoist or deduplicate
            return denoise(sde.t1 * (sde.t0 / sde.t1) ** (i / (OVERHEAD_NFE - 1)), x)

        return jax.lax.fori_loop(0, OVERHEAD_NFE, body, x)

    bare_sample = _timer(lambda: bare(problem.starts))
    rows, bare_all = [], []
    for entry, grid in tqdm(entries, desc=f"overhead d={problem.dim}", leave=False):
        n = steps_for_budget(entry, OVERHEAD_NFE)
        if n is None or grid == OPTIMIZED:  # same per-step work as on any other grid
            continue
        method = entry.make(n, GRIDS[grid]())

        def call():
            return sd.sample(sde, problem.model, problem.sample_key, x_start=problem.starts, method=method)[0]

        nfe = sd.sample(sde, problem.model, problem.sample_key, x_start=problem.starts, method=method)[1].nfe
        seconds, bare_seconds, seconds_min, bare_min = _paired_times(call, bare_sample, repeats)
        bare_all.append(bare_seconds)
        rows.append(
            dict(method=entry.name, grid=grid, dim=problem.dim, nfe=nfe, sampler_seconds=seconds,
                 bare_seconds=bare_seconds, overhead=seconds / bare_seconds,
                 overhead_per_nfe=seconds / (bare_seconds * nfe / OVERHEAD_NFE), overhead_of_minima=seconds_min / bare_min)
        )  # fmt: skip
    return (statistics.median(bare_all) if bare_all else bare_sample()), rows


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def best_rows(results: list[dict], dim: int, column: str) -> dict:
    """Per budget, the fixed-step row of ``dim`` with the lowest finite ``column``."""
    best = {}
    for r in results:
        if r["dim"] == dim and r["budget"] != "adaptive" and math.isfinite(r[column]):
            if r["budget"] not in best or r[column] < best[r["budget"]][column]:
                best[r["budget"]] = r
    return best


def _g(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.{digits}g}"


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def metric_table(metric: str, dim: int, results: list[dict], fixed_rows: list[tuple[Fixed, str]],
                 adaptive: list[Adaptive], budgets: Sequence[int], problem: Problem, fresh: Sequence[dict] = ()) -> str:
    """One markdown table: rows method × grid, columns budgets + adaptive; '*' marks our best."""
    by_key = {(r["method"], r["grid"], r["budget"]): r for r in results if r["dim"] == dim and r["budget"] != "adaptive"}
    stochastic = {e.name for e, _ in fixed_rows if e.stochastic}

    def best_of(column: str) -> dict:
        """Per budget, the lowest finite ``column`` over the fixed-step rows (None if none)."""
        rows = best_rows(results, dim, column)
        return {b: rows[b][column] if b in rows else None for b in budgets}

    best = best_of(metric)
    header = ["method", "grid", *[f"NFE {b}" for b in budgets], "adaptive (NFE→error)"]
    rows = []
    for entry, grid in fixed_rows:
        cells = []
        for b in budgets:
            r = by_key.get((entry.name, grid, b))
            if r is None:
                cells.append("-")
            elif metric == "traj" and entry.name in stochastic:
                cells.append("-")
            else:
                mark = "*" if best[b] is not None and r[metric] == best[b] else ""
                cells.append(f"{_g(r[metric])}{mark} ({r['nfe']})")
        rows.append([entry.name, grid, *cells, ""])
    for entry in adaptive:
        runs = sorted(
            (r for r in results if r["dim"] == dim and r["method"] == entry.name and r["budget"] == "adaptive"),
            key=lambda r: r["nfe"],
        )
        if runs:
            pairs = ", ".join(f"{r['nfe']}→{r[metric]:.2g}" for r in runs)
            rows.append([entry.name, entry.grid, *["" for _ in budgets], pairs])
    peers = {"traj": PEER_TRAJ, "sw2": PEER_SW2}[metric].get(dim, {})
    peer_row = [peers[b][0] if b in peers else None for b in budgets]
    adaptive_peer = ""
    if metric == "traj" and dim in PEER_TRAJ_ADAPTIVE:
        adaptive_peer = ", ".join(f"{n}→{e:.2g} ({lab})" for n, e, lab in PEER_TRAJ_ADAPTIVE[dim])
    rows.append(["best peer (PEERS.md)", "", *[_g(v) for v in peer_row], adaptive_peer])
    if metric == "sw2" and dim in PEER_SW2_STOCHASTIC:
        sto = PEER_SW2_STOCHASTIC[dim]
        rows.append(["best stochastic peer", "", *[_g(sto[b][0]) if b in sto else "-" for b in budgets], ""])
    ratios = [
        f"{best[b] / p:.2f}×" if (p is not None and best[b] is not None) else "-" for b, p in zip(budgets, peer_row)
    ]
    rows.append(["best ours / best peer", "", *ratios, ""])
    if metric == "sw2":
        # Deterministic samplers map the shared starts to (nearly) the reference endpoints, which are
        # exact samples: their SW2 converges to this draw's value, not to the floor's mean.
        draw = problem.reference_sw2
        rows.append(["exact PF ODE, same starts", "", *[_g(draw) for _ in budgets], ""])
        rows += _floor_removed_rows([r for r in fresh if r["dim"] == dim], budgets, peer_row, PEER_FLOOR.get(dim))
        stratified = best_of("sw2_stratified")
        rows.append(["best ours, stratified target", "", *[_g(stratified[b]) for b in budgets], ""])
        rows.append(["exact PF ODE, stratified target", "", *[_g(problem.reference_sw2_against_stratified) for _ in budgets], ""])
    title = {"traj": "traj: RMSE to the exact PF-ODE endpoint / data std", "sw2": "SW2 to exact samples / data std"}
    out = [f"### {title[metric]}, d = {dim}", "", "cells: error (actual NFE); * = our best in the column", ""]
    out.append(render(header, rows))
    if peers:
        out.append("peer methods: " + "; ".join(f"NFE {b}: {peers[b][1]}" for b in budgets if b in peers))
    if metric == "sw2":
        floor, peer_floor = problem.floor, PEER_FLOOR.get(dim)
        line = (
            f"noise floor (two exact sets of the same size, {floor[4]} repeats): {floor[0]:.4f} ± {floor[1]:.4f} "
            f"(range {floor[2]:.4f}–{floor[3]:.4f}); all rows share one start set and one target set, so rows at the "
            f"floor show one draw from this range: the exact PF ODE of the same starts, {problem.reference_sw2:.4f}"
        )
        if peer_floor:
            line += f" (PEERS.md at batch 20000: {peer_floor[0]} ± {peer_floor[1]})"
        out.append(line)
        mixed, both = problem.floor_against_stratified, problem.floor_stratified
        out.append(
            f"\nPart of that floor is the multinomial noise in the component counts of the two sets: with "
            f"exact counts (`stratified=True`) in one set it is {mixed[0]:.4f} ± {mixed[1]:.4f}, in both "
            f"{both[0]:.4f} ± {both[1]:.4f}; the exact PF ODE of the same starts against a stratified target: "
            f"{problem.reference_sw2_against_stratified:.4f}. The rows above score against the i.i.d. target; the "
            f"'stratified target' rows against one with exact counts (whether PEERS' figures used one is not known)."
        )
        out.append(
            "\nFloor removed: a sampler with error e scores about √(f² + e²) against a floor f, so "
            "e ≈ √(SW2² − f²) compares samplers on problems with different floors. Ours: each budget's best row "
            "re-scored on fresh start/target sets, f = the exact PF ODE of the same starts, draw by draw (bound: "
            "the mean of SW2² − exact² plus two standard errors); the peer: f = PEERS' floor."
        )
    return "\n".join(out)


def _floor_removed_rows(fresh: list[dict], budgets: Sequence[int], peer_row: list, peer_floor) -> list[list[str]]:
    """SW2 table rows from ``fresh_draws``: means over the draws, the floor-removed error of ours
    (with its bound) and of the best peer, √(0.0167² − 0.0143²) for PEERS' 20 NFE."""
    if not fresh:
        return []
    draws = len({r["draw"] for r in fresh})
    by_budget = {b: [r for r in fresh if r["budget"] == b] for b in budgets}
    mean = lambda key: [_g(statistics.mean(r[key] for r in by_budget[b])) if by_budget[b] else "-" for b in budgets]  # noqa: E731
    removed = {b: floor_removed(rs) for b, rs in by_budget.items() if rs}
    rows = [
        [f"best ours on {draws} fresh draws, mean", "", *mean("sw2"), ""],
        ["exact PF ODE of those starts, mean", "", *mean("exact_sw2"), ""],
        ["√(SW2² − exact²): best ours (bound)", "", *[f"{_g(removed[b][0])} (≤{_g(removed[b][1])})" if b in removed else "-" for b in budgets], ""],
    ]  # fmt: skip
    if peer_floor:
        peer = [math.sqrt(max(p**2 - peer_floor[0] ** 2, 0.0)) if p is not None else None for p in peer_row]
        rows.append([f"√(SW2² − {peer_floor[0]}²): best peer", "", *[_g(v) for v in peer], ""])
        ratio = [f"{removed[b][1] / v:.2f}×" if (b in removed and v) else "-" for b, v in zip(budgets, peer)]
        rows.append(["floor removed: bound ours / peer", "", *ratio, ""])
    return rows


def overhead_table(bare_seconds: float, rows: list[dict]) -> str:
    header = ["method", "grid", "NFE", "sampler s", "overhead (/ 20 calls)", "overhead per NFE", "ratio of minima"]
    body = [
        [r["method"], r["grid"], str(r["nfe"]), f"{r['sampler_seconds']:.3f}", f"{r['overhead']:.2f}",
         f"{r['overhead_per_nfe']:.2f}", f"{r['overhead_of_minima']:.2f}"]
        for r in rows
    ]  # fmt: skip
    return "\n".join([
        f"### overhead, d = {OVERHEAD_DIM}, NFE ≤ {OVERHEAD_NFE}",
        "",
        f"20 bare denoiser calls (jitted fori_loop, vmapped): {bare_seconds:.3f} s "
        f"({1e3 * bare_seconds / OVERHEAD_NFE:.1f} ms per call, median over rows); each row times the sampler "
        "and the bare calls alternately after compilation and divides their medians (last column: their "
        "minima, the least disturbed runs)",
        "",
        render(header, body),
        PEER_OVERHEAD,
    ])  # fmt: skip


def plot(path: Path, results: list[dict], problems: dict[int, Problem], fixed_rows, adaptive, budgets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted(problems)
    fig, axes = plt.subplots(2, len(dims), figsize=(6.5 * len(dims), 9), squeeze=False)
    names = [e.name for e, _ in fixed_rows] + [a.name for a in adaptive]
    names = list(dict.fromkeys(names))
    cmap = plt.get_cmap("tab20")  # dark shades first, then light ones: neighbours stay distinguishable
    colors = {n: cmap((2 * i) % 20 + (2 * i // 20) % 2) for i, n in enumerate(names)}
    styles = {"UniformLogSNR": "-", "KarrasSigma": "--", "UniformTimeOf(VP)": ":"}
    for col, dim in enumerate(dims):
        for row, metric in enumerate(("traj", "sw2")):
            ax = axes[row, col]
            for entry, grid in fixed_rows:
                if metric == "traj" and entry.stochastic:
                    continue
                pts = sorted(
                    (r["nfe"], r[metric]) for r in results
                    if r["dim"] == dim and r["method"] == entry.name and r["grid"] == grid
                    and r["budget"] != "adaptive" and math.isfinite(r[metric])
                )  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), styles.get(grid, ":"), marker=".", color=colors[entry.name],
                            label=f"{entry.name} / {grid}")  # fmt: skip
            for entry in adaptive:
                pts = sorted(
                    (r["nfe"], r[metric]) for r in results
                    if r["dim"] == dim and r["method"] == entry.name and r["budget"] == "adaptive"
                    and math.isfinite(r[metric])
                )  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), ":", marker="o", color=colors[entry.name], label=f"{entry.name} / {entry.grid}")
            peers = {"traj": PEER_TRAJ, "sw2": PEER_SW2}[metric].get(dim, {})
            pb = [(b, peers[b][0]) for b in budgets if b in peers]
            if pb:
                ax.plot(*zip(*pb), "ks", markersize=7, label="best peer (PEERS.md)")
            if metric == "traj" and dim in PEER_TRAJ_ADAPTIVE:
                ax.plot([p[0] for p in PEER_TRAJ_ADAPTIVE[dim]], [p[1] for p in PEER_TRAJ_ADAPTIVE[dim]], "k^",
                        markersize=7, label="adaptive peers (PEERS.md)")  # fmt: skip
            if metric == "sw2":
                sto = PEER_SW2_STOCHASTIC.get(dim, {})
                ps = [(b, sto[b][0]) for b in budgets if b in sto]
                if ps:
                    ax.plot(*zip(*ps), "kx", markersize=8, label="best stochastic peer (PEERS.md)")
                floor = problems[dim].floor[0]
                ax.axhline(floor, color="grey", linestyle="-.", linewidth=1, label="noise floor (exact vs exact)")
                ax.axhline(problems[dim].reference_sw2, color="black", linestyle=":", linewidth=1,
                           label="exact PF ODE of the same starts")  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(top=min(ax.get_ylim()[1], 10.0))  # errors above 10 × data std are off the chart
            ax.set_xlabel("NFE (model calls actually made)")
            ax.set_ylabel({"traj": "traj RMSE / data std", "sw2": "SW2 / data std"}[metric])
            ax.set_title(f"{'trajectory error' if metric == 'traj' else 'sliced W2'}, d = {dim} (clipped at 10)")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Exact-GMM sampler benchmark (EDM, σ 80 → 0.002, float64)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


RESULT_COLUMNS = ["method", "grid", "dim", "budget", "tol", "num_steps", "nfe", "nfe_expected", "traj", "traj_worst",
                  "sw2", "sw2_stratified", "seconds"]  # fmt: skip


class CsvRows:
    """A CSV file written row by row: the header now, each ``add`` appended and closed at once."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path, self.columns = path, list(columns)
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writeheader()

    def add(self, rows: list[dict]) -> list[dict]:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerows(rows)
        return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    p.add_argument("--batch", type=int, default=None, help="samples per run for SW2 (default 20000; quick 512)")
    p.add_argument("--traj-points", type=int, default=None, help="starts used for traj (default 2000; quick 256)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="NFE budgets (default 5 10 20 50 100; quick 5 10)")
    p.add_argument("--tols", type=float, nargs="+", default=None, help="rtol = atol of the adaptive rows")
    p.add_argument("--methods", nargs="+", default=None, help="keep methods whose name contains one of these")
    p.add_argument("--quick", action="store_true", help="batch 512, traj 256, budgets 5 10, a few methods")
    p.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=None,
                   help="time NFE-20 samplers against bare denoiser calls (d = 64; default on, off in --quick)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=7, help="timed runs per overhead measurement (median and minimum)")
    p.add_argument("--draws", type=int, default=None,
                   help="fresh start/target sets re-scoring each budget's best SW2 row (default 5; quick 2)")
    p.add_argument("--floor-repeats", type=int, default=10,
                   help="pairs of exact sets per noise-floor estimate (each sorts 2 × batch × 512 projections)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    args.batch = args.batch or (512 if args.quick else 20000)
    args.traj_points = args.traj_points or (256 if args.quick else 2000)
    args.budgets = sorted(set(args.budgets or ([5, 10] if args.quick else [5, 10, 20, 50, 100])))
    args.draws = args.draws or (2 if args.quick else 5)
    args.tols = args.tols or list(QUICK_TOLS if args.quick else TOLS)
    args.methods = args.methods or (list(QUICK_METHODS) if args.quick else None)
    args.overhead = (not args.quick) if args.overhead is None else args.overhead
    if args.traj_points > args.batch:
        p.error("--traj-points must not exceed --batch")
    if args.draws < 2 or args.floor_repeats < 2:
        p.error("--draws and --floor-repeats must be ≥ 2")
    if args.repeats < 3:
        p.error("--repeats must be ≥ 3")
    return args


def _selected(name: str, grid: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(p.lower() in f"{name} {grid}".lower() for p in patterns)


def available_methods(patterns: list[str] | None) -> tuple[list[tuple[Fixed, str]], list[Adaptive], list[str]]:
    """Registry entries that exist in sde_diffusion, build, and pass the --methods filter."""
    fixed, skipped = [], []
    for entry in FIXED:
        for grid in entry.grids:
            if not _selected(entry.name, grid, patterns):
                continue
            if not hasattr(sd, entry.cls):
                skipped.append(f"{entry.name}: sd.{entry.cls} does not exist (yet)")
                break
            try:
                entry.make(2, GRIDS[grid]())
            except Exception as err:  # a signature the registry does not match: report, skip
                skipped.append(f"{entry.name} / {grid}: cannot build ({type(err).__name__}: {err})")
                continue
            fixed.append((entry, grid))
    adaptive = [a for a in ADAPTIVE if _selected(a.name, a.grid, patterns)]
    return fixed, adaptive, sorted(set(skipped))


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` and ``run`` in float64 (the precision the caller had is kept outside)."""
    args = parse_args(argv)
    with jax.enable_x64(True):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    fixed_rows, adaptive, skipped = available_methods(args.methods)
    started = time.perf_counter()

    intro = [
        "# Exact-GMM sampler benchmark (problem of shared/reference/PEERS.md)",
        "",
        f"float64; EDM (σ = t), every sampler from exact samples of p_80 down to t = 0.002; exact denoiser "
        f"model; batch {args.batch}, seed {args.seed}, jax {jax.__version__} on {jax.devices()[0].platform}.",
        f"traj = sqrt(mean over the first {args.traj_points} starts and all coordinates of (x − x_ref)²) / data std "
        "(per-coordinate RMSE; x_ref = PF ODE from the same start, Dopri8 in uniform log-SNR, rtol = atol = 1e-10). "
        "Taken from the same run as SW2: with fixed steps each endpoint depends on its own start only; adaptive "
        "rows share one step sequence over the whole batch.",
        "SW2 = sliced Wasserstein-2 (512 directions) between the batch of outputs and as many exact samples of "
        "p_0.002, / data std. NFE = model calls actually made (info.nfe), not the nominal budget.",
    ]
    if skipped:
        intro.append("skipped: " + "; ".join(skipped))
    print("\n".join(intro), flush=True)

    results, failures, problems, report = [], [], {}, list(intro)
    overhead_rows, bare_seconds, fresh = [], None, []
    # rows reach the CSVs as they are measured: an interrupted run keeps what it has done
    results_csv = CsvRows(args.out / "results.csv", RESULT_COLUMNS)
    fresh_csv = CsvRows(args.out / "fresh_draws.csv", ["dim", "budget", "method", "draw", "nfe", "sw2", "exact_sw2"])
    for dim in args.dims:
        t0 = time.perf_counter()
        problem = build_problem(dim, args.seed, args.batch, args.floor_repeats)
        problems[dim] = problem
        line = (
            f"\nd = {dim}: data std {problem.data_std:.4f} (PEERS.md: {PEER_DATA_STD.get(dim, '-')}; our mixture is "
            f"drawn from jax.random.key({args.seed}), so its parameters differ from PEERS' draw), reference NFE "
            f"{problem.reference_nfe}, SW2 noise floor {problem.floor[0]:.4f} ± {problem.floor[1]:.4f}, SW2 of the "
            f"exact PF ODE of the starts {problem.reference_sw2:.4f} "
            f"(setup {time.perf_counter() - t0:.1f} s)"
        )
        print(line, flush=True)
        report.append(line)
        jobs = []
        for entry, grid in fixed_rows:
            for budget in args.budgets:
                n = steps_for_budget(entry, budget)
                if n is not None and (grid != OPTIMIZED or (budget <= OPTIMIZE_MAX_BUDGET and not args.quick)):
                    jobs.append((entry, grid, budget, n))
        jobs += [(entry, entry.grid, "adaptive", tol) for entry in adaptive for tol in args.tols]
        done, built, group = {}, {}, None
        for entry, grid, budget, n in tqdm(jobs, desc=f"d={dim}", leave=False):
            if group != (entry.name, grid):
                # Each compiled sampler keeps its own memory mappings: hundreds of them exceed the
                # kernel's vm.max_map_count (65530), and LLVM fails with "Cannot allocate memory".
                group = (entry.name, grid)
                jax.clear_caches()
            row = dict(method=entry.name, grid=grid, dim=dim, budget=budget)
            try:
                if budget == "adaptive":
                    tol = jnp.asarray(n)  # an array: one compilation for the whole sweep
                    method = entry.make(tol, GRIDS[grid]())
                    row.update(tol=n, num_steps="", nfe_expected="")
                    row.update(run_one(problem, method, False, args.traj_points))
                else:
                    if (entry.name, grid, n) not in done:
                        method = entry.make(n, GRIDS[grid]())
                        if grid == OPTIMIZED:
                            method = optimized(problem, method, jax.random.fold_in(problem.sample_key, n)).method
                        done[entry.name, grid, n] = run_one(problem, method, entry.stochastic, args.traj_points)
                        built[entry.name, grid, n] = method
                    row.update(tol="", num_steps=n, nfe_expected=entry.nfe(n), **done[entry.name, grid, n])
                    if row["nfe"] > budget:
                        failures.append(f"{entry.name} / {grid} d={dim}: NFE {row['nfe']} over budget {budget}")
            except Exception as err:
                failures.append(f"{entry.name} / {grid} d={dim} budget {budget}: {type(err).__name__}: {err}")
                tqdm.write(traceback.format_exc(), file=sys.stderr)
                continue
            results.append(row)
            results_csv.add([row])
        best = best_rows(results, dim, "sw2")  # re-scored on fresh draws: no winner's curse
        methods = {b: (f"{r['method']} / {r['grid']}", built[r["method"], r["grid"], r["num_steps"]]) for b, r in best.items()}
        fresh += fresh_csv.add(fresh_draws(problem, dict(sorted(methods.items())), args.draws))
        if args.overhead and dim == OVERHEAD_DIM:
            bare_seconds, overhead_rows = measure_overhead(problem, [fr for fr in fixed_rows], args.repeats)

    tables = []
    for metric in ("traj", "sw2"):
        for dim in args.dims:
            tables.append(
                metric_table(metric, dim, results, fixed_rows, adaptive, args.budgets, problems[dim], fresh)
            )
    if overhead_rows:
        tables.append(overhead_table(bare_seconds, overhead_rows))
    wall = time.perf_counter() - started
    tail = [f"wall time {wall:.1f} s"]
    if failures:
        tail.append("FAILURES:\n" + "\n".join(f"- {f}" for f in failures))
    text = "\n\n".join(tables + tail)
    print("\n" + text, flush=True)
    (args.out / "tables.md").write_text("\n".join(report) + "\n\n" + text + "\n")

    if overhead_rows:
        CsvRows(args.out / "overhead.csv", list(overhead_rows[0])).add(overhead_rows)
    plot(args.out / "solvers.png", results, problems, fixed_rows, adaptive, args.budgets)
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'solvers.png'}, {args.out / 'tables.md'}", flush=True)
    return dict(
        results=results, failures=failures, skipped=skipped, overhead=overhead_rows, bare_seconds=bare_seconds,
        floors={d: p.floor for d, p in problems.items()}, data_std={d: p.data_std for d, p in problems.items()},
        wall_seconds=wall, problems=problems, fixed_rows=fixed_rows, fresh=fresh,
    )  # fmt: skip


if __name__ == "__main__":
    main()
