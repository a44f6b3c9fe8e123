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
import statistics
from collections.abc import Sequence
from pathlib import Path

import jax
from solvers import PEER_FLOOR, SlicedW2, benchmark_mixture  # benchmarks/ is the script's directory
from tqdm.auto import tqdm

import sde_diffusion as sd

ESTIMATORS = ("i.i.d. vs i.i.d.", "i.i.d. vs stratified", "stratified vs stratified", "i.i.d. vs the law")


def floors(law: sd.GaussianMixture, data_std: float, n: int, repeats: int, reference_factor: int,
           key: jax.Array) -> dict[str, list[float]]:  # fmt: skip
    """SW2 / data std of each estimator on ``repeats`` fresh draws (512 directions each)."""
    values = {name: [] for name in ESTIMATORS}
    for k in tqdm(jax.random.split(key, repeats), desc=f"d={law.dim}", leave=False):
        k_a, k_b, k_ref, k_dir = jax.random.split(k, 4)
        b, sb, large = law.sample(k_b, n), law.sample(k_b, n, True), law.sample(k_ref, reference_factor * n, True)
        sw2 = SlicedW2(b, k_dir, extra_targets=[sb, large])
        iid, iid_stratified, iid_law = sw2.each(law.sample(k_a, n))
        stratified = sw2.each(law.sample(k_a, n, True))[1]
        for name, v in zip(ESTIMATORS, (iid, iid_stratified, stratified, iid_law)):
            values[name].append(v / data_std)
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
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dim in args.dims:
        for seed in args.seeds:
            with jax.enable_x64(True):  # the precision the caller had is kept outside
                law, data_std = benchmark_mixture(dim, seed)
                values = floors(law, data_std, args.n, args.repeats, args.reference_factor, jax.random.key(1000 + seed))
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
