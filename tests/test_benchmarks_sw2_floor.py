"""benchmarks/sw2_floor.py at a small size."""

import csv

import jax

from benchmark_scripts import load_benchmark

bench = load_benchmark("sw2_floor")


def test_floor_estimators_order_as_their_count_noise(tmp_path):
    previous = jax.config.jax_enable_x64
    rows = bench.main(["--n", "1000", "--repeats", "3", "--reference-factor", "4", "--out", str(tmp_path)])
    assert jax.config.jax_enable_x64 == previous  # it runs in float64 and keeps the caller's precision
    with open(tmp_path / "sw2_floor.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 2 * len(bench.ESTIMATORS)
    for dim in (2, 64):
        mean = {r["estimator"]: r["mean"] for r in rows if r["dim"] == dim}
        # exact component counts on both sides remove the multinomial noise that dominates the floor
        assert 0 < mean["stratified vs stratified"] < mean["i.i.d. vs stratified"] < mean["i.i.d. vs i.i.d."]
        assert all(r["repeats"] == 3 and r["min"] <= r["mean"] <= r["max"] for r in rows)
