"""The exact-GMM sampler benchmark (benchmarks/solvers.py) in its quick mode, run in-process."""

import csv
import math

import jax
import pytest

import sde_diffusion as sd

from benchmark_scripts import load_benchmark


bench = load_benchmark("solvers")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    previous = jax.config.jax_enable_x64
    summary = bench.main(["--quick", "--out", str(out)])
    assert jax.config.jax_enable_x64 == previous  # it runs in float64 and keeps the caller's precision
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, summary, rows


def _find(rows, method, grid, dim, budget, tol=None):
    hits = [
        r for r in rows
        if r["method"] == method and r["grid"] == grid and int(r["dim"]) == dim and r["budget"] == str(budget)
        and (tol is None or float(r["tol"]) == tol)
    ]  # fmt: skip
    assert len(hits) == 1, f"expected one row for {method} / {grid} d={dim} budget {budget} tol {tol}, got {hits}"
    return hits[0]


def _traj(rows, *key, **kw):
    return float(_find(rows, *key, **kw)["traj"])


def _present(name):
    return [e for e in bench.FIXED if e.name == name and hasattr(sd, e.cls)]


def test_steps_for_budget_follows_the_nfe_rules():
    tsit5 = next(e for e in bench.FIXED if e.name == "PF-Tsit5")  # FSAL: 6 per step + 1
    assert bench.steps_for_budget(tsit5, 5) is None
    assert [bench.steps_for_budget(tsit5, b) for b in (7, 20, 100)] == [1, 3, 16]
    heun = next(e for e in bench.FIXED if e.name == "PF-Heun")
    assert [bench.steps_for_budget(heun, b) for b in (5, 10)] == [2, 5]
    edm_heun = next(e for e in bench.FIXED if e.name == "EDMHeun")
    assert [bench.steps_for_budget(edm_heun, b) for b in (1, 5, 20)] == [None, 2, 10]
    ddim = next(e for e in bench.FIXED if e.name == "DDIM")
    assert bench.steps_for_budget(ddim, 5) == 5


def test_sliced_w2_helper_equals_the_library_metric(x64):
    keys = jax.random.split(jax.random.key(0), 3)
    x, y = jax.random.normal(keys[0], (300, 5)), 1.5 * jax.random.normal(keys[1], (300, 5))
    expected = float(sd.sliced_wasserstein(x, y, keys[2], num_projections=64))
    assert bench.SlicedW2(y, keys[2], num_projections=64)(x) == pytest.approx(expected, rel=1e-12)


def test_sliced_w2_reads_a_larger_target_at_the_mid_quantiles(x64):
    keys = jax.random.split(jax.random.key(0), 3)
    x, y = jax.random.normal(keys[0], (200, 3)), jax.random.normal(keys[1], (200, 3))
    # each point of x three times: its n mid-quantiles are x's own order statistics, at distance 0
    sw2 = bench.SlicedW2(y, keys[2], num_projections=32, extra_targets=[jax.numpy.repeat(x, 3, axis=0)])
    assert sw2.each(x)[1] == 0.0 and sw2.each(x)[0] > 0.1
    with pytest.raises(ValueError, match="multiple of 200"):
        bench.SlicedW2(y, keys[2], extra_targets=[x[:150]])


def test_quick_run_writes_outputs_without_failures(quick):
    out, summary, rows = quick
    assert summary["failures"] == []
    assert (out / "solvers.png").stat().st_size > 10_000
    tables = (out / "tables.md").read_text()
    assert "best peer (PEERS.md)" in tables and "noise floor" in tables


def test_quick_run_has_the_expected_rows_with_honest_nfe(quick):
    _, summary, rows = quick
    expected = {(e.name, g) for e, g in summary["fixed_rows"] if g != bench.OPTIMIZED}  # optimised: not in quick mode
    assert expected >= {("PF-Euler", "UniformLogSNR"), ("EulerMaruyama", "KarrasSigma")}
    assert expected >= ({("DDIM", "KarrasSigma")} if _present("DDIM") else set())
    assert expected >= ({("DPMSolverPP-2", "UniformLogSNR")} if _present("DPMSolverPP-2") else set())
    for dim in (2, 64):
        for method, grid in expected:
            for budget in (5, 10):
                row = _find(rows, method, grid, dim, budget)
                assert int(row["nfe"]) <= budget
                assert int(row["nfe"]) == int(row["nfe_expected"])  # the NFE rule of its registry entry
        for tol in bench.QUICK_TOLS:
            _find(rows, "PF-Tsit5-PID", "UniformLogSNR", dim, "adaptive", tol)
    for r in rows:
        assert int(r["nfe"]) > 0 and math.isfinite(float(r["sw2"])) and float(r["sw2"]) > 0
        assert math.isfinite(float(r["sw2_stratified"])) and float(r["sw2_stratified"]) > 0
        stochastic = r["method"] in {e.name for e in bench.FIXED if e.stochastic}
        if stochastic:
            assert math.isnan(float(r["traj"]))
        else:  # the root mean square over points is at most the largest point's error
            assert math.isfinite(float(r["traj"])) and float(r["traj"]) <= float(r["traj_worst"]) * (1 + 1e-12)


def test_quick_run_errors_behave(quick):
    _, summary, rows = quick
    for dim in (2, 64):
        # the adaptive PF ODE at rtol 1e-8 is close to the Dopri8 reference, and cheaper tolerances are worse
        tight = _find(rows, "PF-Tsit5-PID", "UniformLogSNR", dim, "adaptive", 1e-8)
        loose = _find(rows, "PF-Tsit5-PID", "UniformLogSNR", dim, "adaptive", 1e-4)
        assert float(tight["traj"]) < 1e-3
        assert float(loose["traj"]) > float(tight["traj"]) and int(loose["nfe"]) < int(tight["nfe"])
        # ... and its law is the target's: SW2 within the noise floor of two exact sets
        floor_mean = summary["floors"][dim][0]
        assert float(tight["sw2"]) < 1.5 * floor_mean
        # ... and paired with the exact PF ODE of the same starts: |ΔSW2| ≤ per-coordinate RMS distance
        draw = summary["problems"][dim].reference_sw2
        assert abs(float(tight["sw2"]) - draw) <= 3 * float(tight["traj"]) + 1e-12, (tight, draw)
        # exact component counts in one set, then in both, take the counts' noise out of the floor ...
        problem = summary["problems"][dim]
        assert problem.floor_stratified[0] < problem.floor_against_stratified[0] < problem.floor[0]
        # ... and against the stratified target the tight solve pairs with the exact PF ODE as above
        draw = problem.reference_sw2_against_stratified
        assert abs(float(tight["sw2_stratified"]) - draw) <= 3 * float(tight["traj"]) + 1e-12, (tight, draw)
        # Euler–Maruyama with 5 steps is far from the target
        assert float(_find(rows, "EulerMaruyama", "KarrasSigma", dim, 5)["sw2"]) > 3 * floor_mean
        # first-order deterministic methods: more NFE, smaller trajectory error
        first_order = [("PF-Euler", "UniformLogSNR")] + [("DDIM", "KarrasSigma")] * bool(_present("DDIM"))
        for method, grid in first_order:
            assert _traj(rows, method, grid, dim, 10) < _traj(rows, method, grid, dim, 5), (method, grid, dim)


def test_quick_run_skips_overhead_and_measures_it_on_request(quick, x64):
    out, summary, _ = quick
    assert summary["overhead"] == [] and not (out / "overhead.csv").exists()
    euler = [(e, g) for e, g in summary["fixed_rows"] if e.name == "PF-Euler"]
    bare_seconds, rows = bench.measure_overhead(summary["problems"][64], euler, repeats=5)
    assert bare_seconds > 0 and [(r["method"], r["grid"]) for r in rows] == [("PF-Euler", "UniformLogSNR")]
    for r in rows:
        assert r["dim"] == 64 and r["nfe"] == bench.OVERHEAD_NFE
        # a sampler making NFE model calls cannot be much faster than NFE bare calls
        assert math.isfinite(r["overhead"]) and r["overhead_per_nfe"] > 0.5 and r["overhead_of_minima"] > 0.5
    assert "ratio of minima" in bench.overhead_table(bare_seconds, rows)


def test_quick_run_rescores_each_budgets_best_row_on_fresh_draws(quick):
    out, summary, rows = quick
    fresh = summary["fresh"]
    with open(out / "fresh_draws.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(fresh)
    for dim in (2, 64):
        mine = [r for r in fresh if r["dim"] == dim]
        for budget in (5, 10):
            here = [r for r in mine if r["budget"] == budget]
            assert [r["draw"] for r in here] == [0, 1]
            # the row re-scored is the one with the lowest SW2 on the main draw
            best = min((r for r in rows if int(r["dim"]) == dim and r["budget"] == str(budget)), key=lambda r: float(r["sw2"]))
            assert {r["method"] for r in here} == {f"{best['method']} / {best['grid']}"}
            assert all(r["nfe"] <= budget for r in here)
        # one exact PF ODE per draw, shared by every budget; fresh draws differ from each other
        exact = {r["draw"]: r["exact_sw2"] for r in mine}
        assert all(r["exact_sw2"] == exact[r["draw"]] for r in mine) and exact[0] != exact[1]


def test_fresh_draws_pair_each_sampler_with_the_exact_pf_ode_of_its_own_starts(quick, x64):
    _, summary, _ = quick
    # the reference solve itself, re-scored: its SW2 equals the exact one's draw by draw, no error left
    fresh = bench.fresh_draws(summary["problems"][2], {0: ("reference", bench.reference_method())}, draws=2)
    assert all(r["sw2"] == r["exact_sw2"] for r in fresh)
    assert bench.floor_removed(fresh) == (0.0, 0.0)


def test_floor_removed_is_the_root_of_the_mean_paired_excess():
    rows = [dict(sw2=math.sqrt(f**2 + e2), exact_sw2=f) for f, e2 in [(0.02, 1e-4), (0.03, 3e-4), (0.01, 2e-4)]]
    estimate, bound = bench.floor_removed(rows)
    sem = 1e-4 / math.sqrt(3)  # stdev of (1, 3, 2)·1e-4 is 1e-4
    assert estimate == pytest.approx(math.sqrt(2e-4), rel=1e-9)
    assert bound == pytest.approx(math.sqrt(2e-4 + 2 * sem), rel=1e-9)
    # a sampler scoring under the exact draws has no measurable error: the estimate is clipped at 0
    assert bench.floor_removed([dict(sw2=0.01, exact_sw2=0.02), dict(sw2=0.015, exact_sw2=0.02)])[0] == 0.0


def test_csv_rows_are_on_disk_after_each_add(tmp_path):
    """What an interrupted run leaves: the header and every row added so far, extra keys dropped."""
    path = tmp_path / "rows.csv"
    out = bench.CsvRows(path, ["a", "b"])
    assert path.read_text().splitlines() == ["a,b"]
    for i in range(3):
        out.add([dict(a=i, b=2 * i, extra="x")])
        with open(path, newline="") as f:
            assert list(csv.DictReader(f))[-1] == {"a": str(i), "b": str(2 * i)}
    assert out.add([dict(a=9)]) == [dict(a=9)] and path.read_text().splitlines()[-1] == "9,"
