"""benchmarks/training.py in a small quick mode, run in-process."""

import csv
import math

import pytest
from benchmark_scripts import load_benchmark


@pytest.mark.slow
def test_quick_overhead_and_quality(tmp_path):
    bench = load_benchmark("training")
    args = ["--quick", "--sections", "overhead", "quality", "--overhead-steps", "60", "--quality-steps", "150", "400"]
    summary = bench.main([*args, "--samples", "500", "--out", str(tmp_path)])
    (row,) = summary["overhead"]
    # the trainer does at least the hand-written step's work, and the timing is sane
    assert row["ratio"] > 0.7 and math.isfinite(row["ratio"]) and row["steps_per_s"] > 0
    initial, *trained = summary["quality"]
    assert [r["steps"] for r in trained] == [150, 400]
    # training lowers the error against the exact mixture score well below the untrained one
    assert trained[-1]["score_error"] < 0.5 * initial["score_error"]
    assert all(math.isfinite(r["sw2"]) for r in trained)
    with open(tmp_path / "quality.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (tmp_path / "training.png").stat().st_size > 10_000
