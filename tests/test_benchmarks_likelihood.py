"""The likelihood benchmark (benchmarks/likelihood.py) in its quick mode, run in-process (slow: pytest -m slow)."""


import csv
import math

import jax
import pytest

from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.slow


bench = load_benchmark("likelihood")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    previous = jax.config.jax_enable_x64
    summary = bench.main(["--quick", "--out", str(out)])
    assert jax.config.jax_enable_x64 == previous  # the benchmark restores the precision it found
    return out, summary


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_its_outputs(quick):
    out, summary = quick
    assert (out / "likelihood.png").stat().st_size > 10_000
    text = (out / "likelihood.md").read_text()
    assert all(f"### {k}." in text for k in (1, 2, 3))
    assert len(_csv(out / "likelihood_accuracy.csv")) == len(summary["accuracy"]) == len(bench.QUICK_TOLS)
    assert len(_csv(out / "likelihood_cost.csv")) == len(summary["cost"]) == len(bench.TRACES)  # d = 16 only
    assert [r["model"] for r in _csv(out / "likelihood_trained.csv")] == [r["model"] for r in summary["trained"]]


def test_accuracy_sweep_error_and_nfe_move_with_the_tolerance(quick):
    _, summary = quick
    rows = summary["accuracy"]  # Tsit5, tolerances from loose to tight
    assert [r["tol"] for r in rows] == list(bench.QUICK_TOLS)
    assert all(r["nfe_rule_ok"] for r in rows)  # nfe = 1 + 6 × attempted steps, per example
    errors, nfes = [r["error_mean"] for r in rows], [r["nfe_mean"] for r in rows]
    assert all(a > b for a, b in zip(errors, errors[1:])) and all(a < b for a, b in zip(nfes, nfes[1:]))
    assert rows[-1]["error_max"] / 2 < 1e-6  # rtol 1e-8: the exact log-density within 1e-6 nats per dimension
    bias = summary["bias"]  # the default call against log p_0: small, and the sum of its parts bounds it
    assert bias["t_start"] == 1e-5 and bias["prior"] < 1e-3 and bias["t_start_bias"] < 1e-3
    assert bias["total"] < bias["prior"] + bias["t_start_bias"] + 1e-3


def test_cost_rows_count_jvps_and_hutchinson_is_unbiased(quick):
    _, summary = quick
    rows = {r["trace"]: r for r in summary["cost"]}
    assert {name: (r["dim"], r["jvps"]) for name, r in rows.items()} == {
        "exact": (16, 16), "hutchinson-1": (16, 1), "hutchinson-8": (16, 8)
    }
    for r in rows.values():
        assert r["model_evaluations"] == pytest.approx(r["nfe_mean"] * (1 + r["jvps"]))
        assert r["seconds_per_example"] > 0
    # the exact trace against the oracle: the prior's bias (16 dims) and the ODE error only
    assert abs(rows["exact"]["exact_minus_truth"]) < 1e-2
    for name in ("hutchinson-1", "hutchinson-8"):
        assert abs(rows[name]["bias"]) < 4 * rows[name]["stderr"] + 1e-3, name
    assert rows["hutchinson-8"]["spread"] < rows["hutchinson-1"]["spread"]
    assert rows["exact"]["model_evaluations"] > 5 * rows["hutchinson-1"]["model_evaluations"]


def test_trained_model_log_likelihood_is_reported_honestly(quick):
    _, summary = quick
    rows = {r["model"]: r for r in summary["trained"]}
    data_law, model = rows["data law (exact)"], rows["trained, exact trace"]
    assert data_law["gap_to_data_law"] == 0 and math.isfinite(model["mean_log_p"]) and model["nfe_mean"] > 0
    # the gap estimates KL(p_data‖p_model) ≥ 0 (up to its Monte Carlo error)
    assert model["gap_to_data_law"] > -4 * model["gap_stderr"]
    assert model["bits_per_dim"] == pytest.approx(-model["mean_log_p"] / (2 * math.log(2)), rel=1e-5)
