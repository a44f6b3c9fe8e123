"""The noise floor of SW2 between exact samples, under the estimators a benchmark might use.

PEERS.md gives a floor ("exact vs exact") for its GMM problem but not how the exact sets were
drawn. At n = 20000 most of the floor of two i.i.d. sets is the multinomial noise in how many
points each mixture component gets, so the estimator decides the floor. This script measures it,
over ``--repeats`` fresh draws, for the problems of ``benchmarks/solvers.py``:

- i.i.d. vs i.i.d.: two independent sets of n exact samples;
- i.i.d. vs stratified: one set with exact component counts (``stratified=True``);
- stratified vs stratified;
- i.i.d. vs the law: against ``--reference-factor`` × n stratified points, read at the n
  mid-quantiles (i + ½)/n of each projection: the i.i.d. set's own distance to p.

Usage: ``python benchmarks/sw2_floor.py`` (d = 2 and 64, 20 repeats, a few minutes on 2 CPU cores);
prints a table next to PEERS' floors, writes ``sw2_floor.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import sde_diffusion as sd

PEER_FLOOR = {2: (0.0197, 0.0056), 64: (0.0143, 0.0007)}  # shared/reference/PEERS.md, n = 20000
ESTIMATORS = ("i.i.d. vs i.i.d.", "i.i.d. vs stratified", "stratified vs stratified", "i.i.d. vs the law")


def mixture(dim: int, seed: int) -> sd.GaussianMixture:
    """The data law of benchmarks/solvers.py: the ring at d = 2, a random mixture otherwise."""
    key = jax.random.key(seed)
    return sd.GaussianMixture.ring(key) if dim == 2 else sd.GaussianMixture.random(key, dim=dim)


def sorted_projections(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    return np.sort(theta.T @ x.T, axis=-1)  # (projections, n)


def floors(law: sd.GaussianMixture, n: int, repeats: int, reference_factor: int, key: jax.Array) -> dict[str, list[float]]:
    """SW2 / data std of each estimator on ``repeats`` fresh draws (512 directions each)."""
    data_std = math.sqrt(float(jnp.trace(law.covariance())) / law.means.shape[-1])
    values = {name: [] for name in ESTIMATORS}
    for k in tqdm(jax.random.split(key, repeats), desc=f"d={law.means.shape[-1]}", leave=False):
        k_a, k_b, k_ref, k_dir = jax.random.split(k, 4)
        theta = np.asarray(jax.random.normal(k_dir, (law.means.shape[-1], 512)))
        theta = theta / np.linalg.norm(theta, axis=0)
        a, b, sa, sb = (sorted_projections(np.asarray(law.sample(kk, n, s)), theta)
                        for kk, s in ((k_a, False), (k_b, False), (k_a, True), (k_b, True)))  # fmt: skip
        m = reference_factor * n
        law_quantiles = sorted_projections(np.asarray(law.sample(k_ref, m, True)), theta)[:, (np.arange(n) * m + m // 2) // n]
        for name, (x, y) in zip(ESTIMATORS, ((a, b), (a, sb), (sa, sb), (a, law_quantiles))):
            values[name].append(float(np.sqrt(np.mean((x - y) ** 2))) / data_std)
    return values


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="mixture draws (solvers.py uses seed 0)")
    p.add_argument("--n", type=int, default=20000, help="points per set (PEERS: 20000)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--reference-factor", type=int, default=10, help="size of the 'law' set / n")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.repeats < 2 or args.reference_factor < 2:
        p.error("--repeats and --reference-factor must be ≥ 2")
    jax.config.update("jax_enable_x64", True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dim in args.dims:
        for seed in args.seeds:
            values = floors(mixture(dim, seed), args.n, args.repeats, args.reference_factor, jax.random.key(1000 + seed))
            for name, v in values.items():
                rows.append(dict(dim=dim, seed=seed, estimator=name, mean=statistics.mean(v), std=statistics.stdev(v),
                                 min=min(v), max=max(v), repeats=len(v), n=args.n))  # fmt: skip
    lines = [f"SW2 / data std between exact sets of {args.n} points, mean ± std over {args.repeats} draws", "",
             "| d | mixture seed | " + " | ".join(ESTIMATORS) + " | PEERS.md (n = 20000) |", "|---" * (len(ESTIMATORS) + 3) + "|"]  # fmt: skip
    for dim in args.dims:
        for seed in args.seeds:
            cells = [f"{r['mean']:.4f} ± {r['std']:.4f}" for r in rows if (r["dim"], r["seed"]) == (dim, seed)]
            peer = PEER_FLOOR.get(dim)
            lines.append(f"| {dim} | {seed} | " + " | ".join(cells) + f" | {f'{peer[0]} ± {peer[1]}' if peer else '-'} |")
    print("\n".join(lines))
    with open(args.out / "sw2_floor.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'sw2_floor.csv'}")
    return rows


if __name__ == "__main__":
    main()
