"""Likelihood benchmark: ``sd.log_likelihood`` against exact Gaussian-mixture log-densities.

1. **accuracy**: the 8-component 2-D ring under VP with its exact score; NFE against the ODE's own
   error ``|log p_{t1}(z) + Δ − log p_{t_start}(x)|`` (the exact density at ``t1`` in place of the
   SDE's prior, which differs by the signal left at ``t1``) over an ``rtol = atol`` sweep, for several
   diffrax solvers; the prior's and ``t_start``'s bias against ``log p_0`` is printed beside it.
2. **cost**: the exact trace (``d`` JVPs per evaluation) against Hutchinson (1 and 8 Rademacher
   probes) on random 10-component mixtures as the dimension grows: wall time per example, NFE, model
   evaluations (``NFE × (1 + JVPs)``, a JVP counted as one evaluation), and the Hutchinson error
   against the exact trace on the same points (mean ± standard error, and the spread of one estimate).
3. **trained**: a small score model trained by ``sde-diffusion train`` on the same ring
   (``sd.gaussian_mixture``): held-out mean log p (exact trace and Hutchinson) next to the exact
   log-density of the data law; the gap ``E[log p_data − log p_model]`` estimates ``KL(p_data‖p_model)``
   (plus the small biases of part 1). A full-covariance Gaussian fitted to the training points is
   the baseline.

Usage: ``python benchmarks/likelihood.py`` (full, several minutes on CPU) or ``--quick`` (under a
minute). Parts 1–2 run in float64, part 3 in float32 (as trained). Tables go to stdout and
``likelihood.md``, numbers to ``likelihood_accuracy.csv``, ``likelihood_cost.csv`` and
``likelihood_trained.csv``, figures to ``likelihood.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import sde_diffusion as sd
from sde_diffusion import cli
from sde_diffusion.sample import evaluations_per_step

SOLVERS = {"Bosh3": diffrax.Bosh3, "Tsit5": diffrax.Tsit5, "Dopri5": diffrax.Dopri5, "Dopri8": diffrax.Dopri8}
TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
QUICK_TOLS = (1e-2, 1e-4, 1e-6, 1e-8)
TRACES = {"exact": sd.ExactTrace(), "hutchinson-1": sd.Hutchinson(1), "hutchinson-8": sd.Hutchinson(8)}


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (already compiled) over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- 1. accuracy against NFE --------------------------------------------------------------------


def accuracy(solvers: Sequence[str], tols: Sequence[float], n: int, seed: int) -> tuple[list[dict], dict]:
    sde = sd.VP()
    data = sd.GaussianMixture.ring(jax.random.key(seed))
    score = partial(data.marginal_score, sde)
    x = data.sample(jax.random.key(seed + 1), n)

    def exact_at(t, points):
        return np.asarray(jax.vmap(lambda y: data.marginal_log_prob(sde, t, y))(points))

    # the default call (Tsit5, rtol = atol = 1e-5) against log p_0, and the two biases it carries
    log_p, info = sd.log_likelihood(sde, score, x)
    at_t1, at_start, log_p0 = exact_at(sde.t1, info.latent), exact_at(info.t_start, x), exact_at(sde.t0, x)
    bias = dict(
        t_start=info.t_start,
        prior=float(np.mean(np.abs(np.asarray(info.prior_log_prob) - at_t1))),
        t_start_bias=float(np.mean(np.abs(at_start - log_p0))),
        total=float(np.mean(np.abs(np.asarray(log_p) - log_p0))),
    )
    rows = []
    for name in solvers:
        solver = SOLVERS[name]()
        per_step, extra = evaluations_per_step(solver)
        for tol in tols:
            start = time.perf_counter()
            _, info = jax.block_until_ready(sd.log_likelihood(sde, score, x, solver=solver, rtol=tol, atol=tol))
            seconds = time.perf_counter() - start
            error = np.abs(exact_at(sde.t1, info.latent) + np.asarray(info.delta_log_p) - at_start)
            nfe = np.asarray(info.nfe)
            rows.append(dict(
                solver=name, tol=tol, nfe_mean=float(nfe.mean()), nfe_max=int(nfe.max()),
                nfe_rule_ok=bool(np.all(nfe == extra + per_step * np.asarray(info.num_steps))),
                rejected_mean=float(np.mean(info.num_rejected_steps)),
                error_mean=float(error.mean()), error_max=float(error.max()), seconds=seconds,
            ))  # fmt: skip
    return rows, bias


# -- 2. cost of the exact trace and of Hutchinson -------------------------------------------------


def cost(dims: Sequence[int], n: int, repeats: int, seed: int) -> list[dict]:
    sde = sd.VP()
    rows = []
    for dim in dims:
        data = sd.GaussianMixture.random(jax.random.key(seed), dim=dim)
        score = partial(data.marginal_score, sde)
        x = data.sample(jax.random.key(seed + 1), n)
        exact = None
        for name, trace in TRACES.items():
            def call(trace=trace):
                return sd.log_likelihood(sde, score, x, jax.random.key(seed + 2), trace=trace)

            start = time.perf_counter()
            log_p, info = jax.block_until_ready(call())
            first = time.perf_counter() - start
            seconds = _median_seconds(call, repeats)
            nfe = float(np.mean(info.nfe))
            row = dict(
                dim=dim, trace=name, jvps=info.jvps_per_evaluation, nfe_mean=nfe, nfe_max=int(np.max(info.nfe)),
                model_evaluations=nfe * (1 + info.jvps_per_evaluation), seconds_per_example=seconds / n,
                compile_seconds=first - seconds,
            )  # fmt: skip
            if name == "exact":
                exact = np.asarray(log_p)
                truth = np.asarray(jax.vmap(lambda y: data.marginal_log_prob(sde, info.t_start, y))(x))
                row.update(bias=math.nan, stderr=math.nan, spread=math.nan,
                           exact_minus_truth=float(np.mean(exact - truth)))  # fmt: skip
            else:
                diff = np.asarray(log_p) - exact  # the estimator's error on each point
                row.update(bias=float(diff.mean()), stderr=float(diff.std(ddof=1) / math.sqrt(n)),
                           spread=float(diff.std(ddof=1)), exact_minus_truth=math.nan)  # fmt: skip
            rows.append(row)
    return rows


# -- 3. a trained model ------------------------------------------------------------------------


def trained(steps: int, width: int, depth: int, n: int, seed: int, hutchinson: bool) -> list[dict]:
    """Train on the ring mixture (float32) and compare held-out log-likelihoods (exact trace, and
    Hutchinson with one probe when ``hutchinson``)."""
    traces = [("trained, exact trace", sd.ExactTrace())] + [("trained, Hutchinson 1", sd.Hutchinson(1))] * hutchinson
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            command = cli.TrainCommand(
                out=Path(tmp) / "run", data="gaussian_mixture", n_data=20000,
                model=cli.ModelSpec(width=width, depth=depth, seed=seed),
                train=sd.TrainConfig(steps=steps, batch_size=256, learning_rate=2e-3, warmup_steps=min(200, steps // 5),
                                     checkpoint_every=steps),
                resume=False, progress=False,
            )  # fmt: skip
            start = time.perf_counter()
            cli.train_command(command)
            train_seconds = time.perf_counter() - start
            sde, model = cli.load_run(command.out)
        oracle = sd.gaussian_mixture_oracle()
        train_x = sd.gaussian_mixture(20000, seed=seed)
        held_out = jnp.asarray(sd.gaussian_mixture(n, seed=seed + 1000))
        exact = np.asarray(jax.vmap(oracle.log_prob)(held_out))
        gaussian = sd.MultivariateNormal(np.mean(train_x, 0), np.cov(train_x.T))
        rows = []

        def row(name, log_p, nfe=math.nan, seconds=math.nan):
            gap = exact - log_p
            return dict(
                model=name, steps=steps, train_seconds=train_seconds, n=n, mean_log_p=float(np.mean(log_p)),
                stderr=float(np.std(log_p, ddof=1) / math.sqrt(n)),
                bits_per_dim=float(np.mean(sd.bits_per_dim(log_p, 2))),
                gap_to_data_law=float(np.mean(gap)), gap_stderr=float(np.std(gap, ddof=1) / math.sqrt(n)),
                nfe_mean=nfe, seconds=seconds,
            )  # fmt: skip

        rows.append(row("data law (exact)", exact))
        for name, trace in traces:
            start = time.perf_counter()
            log_p, info = sd.log_likelihood(sde, model, held_out, jax.random.key(seed), trace=trace)
            rows.append(row(name, np.asarray(log_p), float(np.mean(info.nfe)), time.perf_counter() - start))
        rows.append(row("Gaussian fit", np.asarray(jax.vmap(gaussian.log_prob)(held_out))))
        return rows
    finally:
        jax.config.update("jax_enable_x64", previous)


# -- output ------------------------------------------------------------------------------------


def _g(v, digits: int = 3) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def render(title: str, rows: list[dict], columns: Sequence[str]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_g(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, accuracy_rows: list[dict], cost_rows: list[dict], trained_rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    ax = axes[0]
    for name in dict.fromkeys(r["solver"] for r in accuracy_rows):
        pts = [(r["nfe_mean"], r["error_mean"]) for r in accuracy_rows if r["solver"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="NFE per example (mean)", ylabel="mean |log p error| (nats)",
           title="accuracy: 2-D ring under VP, exact score (rtol = atol sweep)")  # fmt: skip
    ax.legend()
    for ax, key, label in [(axes[1], "seconds_per_example", "wall time per example (s)"),
                           (axes[2], "model_evaluations", "model evaluations per example")]:  # fmt: skip
        for name in TRACES:
            pts = [(r["dim"], r[key]) for r in cost_rows if r["trace"] == name]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="dimension d", ylabel=label, title=f"cost: {label}")
        ax.legend()
    if trained_rows:
        model = next(r for r in trained_rows if r["model"] == "trained, exact trace")
        axes[0].text(0.02, 0.02, f"trained model, held-out: {model['mean_log_p']:.3f} nats "
                     f"(data law {trained_rows[0]['mean_log_p']:.3f})", transform=axes[0].transAxes, fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Tsit5 only, 4 tolerances, d = 16 only, 200 training steps")
    p.add_argument("--solvers", nargs="+", choices=list(SOLVERS), default=None)
    p.add_argument("--tols", type=float, nargs="+", default=None)
    p.add_argument("--dims", type=int, nargs="+", default=None, help="dimensions of the cost part (default 2 8 32 128)")
    p.add_argument("--n", type=int, default=None, help="examples per call in parts 1-2 (default 256; quick 32)")
    p.add_argument("--train-steps", type=int, default=None, help="part 3 (default 4000; quick 200; 0 skips it)")
    p.add_argument("--held-out", type=int, default=None, help="held-out points of part 3 (default 2000; quick 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per cost row (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    args.solvers = args.solvers or (["Tsit5"] if args.quick else list(SOLVERS))
    args.tols = args.tols or list(QUICK_TOLS if args.quick else TOLS)
    args.dims = args.dims or ([16] if args.quick else [2, 8, 32, 128])
    args.n = args.n or (32 if args.quick else 256)
    args.train_steps = (200 if args.quick else 4000) if args.train_steps is None else args.train_steps
    args.held_out = args.held_out or (128 if args.quick else 2000)
    if args.n < 2 or args.held_out < 2 or args.repeats < 1:
        p.error("need --n ≥ 2, --held-out ≥ 2 and --repeats ≥ 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        accuracy_rows, bias = accuracy(args.solvers, args.tols, args.n, args.seed)
        cost_rows = cost(args.dims, args.n, args.repeats, args.seed)
    finally:
        jax.config.update("jax_enable_x64", previous)
    width, depth = (32, 2) if args.quick else (128, 3)
    trained_rows = trained(args.train_steps, width, depth, args.held_out, args.seed, not args.quick) if args.train_steps else []

    sections = [
        "# Likelihood benchmark",
        f"jax {jax.__version__} on {jax.devices()[0].platform}; seed {args.seed}; {args.n} examples per call "
        "(vmapped per-example solves); NFE = evaluations of the augmented field (each one model evaluation "
        "plus `jvps` Jacobian-vector products).",
        render(
            f"1. accuracy: 2-D ring under VP, exact score, float64, t_start = {bias['t_start']:g}. error = "
            "|log p_t1(z) + Δ − log p_t_start(x)| (the ODE's own error); seconds: one call, the first of a "
            "solver with its compilation",
            accuracy_rows, ["solver", "tol", "nfe_mean", "nfe_max", "rejected_mean", "error_mean", "error_max", "seconds"],
        ),
        f"Beside the ODE error, against log p_0 of the data law (mean |·| over the examples): the SDE's prior "
        f"N(0, σ(t1)²) in place of p_t1 costs {bias['prior']:.2e} nats, starting at t_start instead of t0 "
        f"{bias['t_start_bias']:.2e}; the default call (rtol 1e-5) is off by {bias['total']:.2e} in all.",
        render(
            "2. cost: random 10-component mixtures under VP, float64, rtol = atol = 1e-5. bias/stderr: mean ± "
            "standard error of (Hutchinson − exact) over the examples; spread: the std of one estimate; "
            "exact_minus_truth: mean of (exact trace − log p_t_start), the prior's bias included",
            cost_rows, ["dim", "trace", "jvps", "nfe_mean", "model_evaluations", "seconds_per_example",
                        "compile_seconds", "bias", "stderr", "spread", "exact_minus_truth"],
        ),  # fmt: skip
    ]
    if trained_rows:
        sections.append(render(
            f"3. trained model ({args.train_steps} steps, MLP width {width} depth {depth}, VP, EDM preconditioning), "
            f"{args.held_out} held-out points of the ring; gap = mean(log p_data − log p), an estimate of KL(p_data‖p)",
            trained_rows, ["model", "mean_log_p", "stderr", "bits_per_dim", "gap_to_data_law", "gap_stderr",
                           "nfe_mean", "seconds", "train_seconds"],
        ))  # fmt: skip
    sections.append(f"wall time {time.perf_counter() - started:.1f} s")
    text = "\n\n".join(sections)
    print(text, flush=True)
    (args.out / "likelihood.md").write_text(text + "\n")
    write_csv(args.out / "likelihood_accuracy.csv", accuracy_rows)
    write_csv(args.out / "likelihood_cost.csv", cost_rows)
    write_csv(args.out / "likelihood_trained.csv", trained_rows)
    plot(args.out / "likelihood.png", accuracy_rows, cost_rows, trained_rows)
    return dict(accuracy=accuracy_rows, bias=bias, cost=cost_rows, trained=trained_rows, out=args.out)


if __name__ == "__main__":
    main()
