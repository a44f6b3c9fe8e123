import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd
from sde_diffusion.runge_kutta import explicit_runge_kutta
from sde_diffusion.sample import evaluations_per_step
from solver_problems import smooth_problem

ERK = [diffrax.Heun, diffrax.Midpoint, diffrax.Ralston, diffrax.Bosh3, diffrax.Tsit5, diffrax.Dopri5, diffrax.Dopri8]


def _linear_field(t, y):
    """``dy/dt = cos(t) A y``: time-dependent, so a wrong stage time shows."""
    a = jnp.array([[-0.5, 1.0, 0.2], [-1.0, -0.3, 0.0], [0.1, 0.4, -0.8]])
    return jnp.cos(t) * (y @ a.T)


def _by_diffeqsolve(field, solver, ts, y0):
    """``y_N`` from ``diffeqsolve`` with the same solver on the steps of ``ts``."""
    term = diffrax.ODETerm(lambda t, y, args: field(t, y))
    return diffrax.diffeqsolve(term, solver(), ts[0], ts[-1], None, y0, stepsize_controller=diffrax.StepTo(ts)).ys[-1]


@pytest.mark.parametrize("solver", ERK, ids=lambda s: s.__name__)
def test_same_steps_and_evaluations_as_diffeqsolve(x64, solver):
    ts = jnp.sort(jax.random.uniform(jax.random.key(0), (6,), minval=0.0, maxval=2.0))  # uneven steps
    y0 = jax.random.normal(jax.random.key(1), (4, 3))
    calls = []

    def counted(t, y):
        jax.debug.callback(lambda: calls.append(1))
        return _linear_field(t, y)

    ours = jax.jit(lambda y: explicit_runge_kutta(counted, solver.tableau, ts, y))(y0)
    jax.effects_barrier()
    reference = _by_diffeqsolve(_linear_field, solver, ts, y0)
    np.testing.assert_allclose(ours, reference, rtol=1e-13, atol=1e-14)
    per_step, extra = evaluations_per_step(solver())
    assert len(calls) == extra + per_step * (ts.shape[0] - 1)


@pytest.mark.parametrize("solver, order", [(diffrax.Heun, 2), (diffrax.Bosh3, 3), (diffrax.Dopri5, 5)], ids=str)
def test_convergence_order_against_the_exact_solution(x64, solver, order):
    a = jnp.array([[-0.5, 1.0], [-1.0, -0.3]])
    y0 = jnp.array([[1.0, -0.5]])
    exact = y0 @ jax.scipy.linalg.expm(2.0 * a).T
    errors = [
        float(jnp.max(jnp.abs(explicit_runge_kutta(lambda t, y: y @ a.T, solver.tableau, jnp.linspace(0, 2, n + 1), y0) - exact)))
        for n in (10, 20)
    ]  # fmt: skip
    slope = np.log2(errors[0] / errors[1])
    assert order - 0.3 < slope < order + 0.5, (slope, errors)


def test_probability_flow_fixed_steps_converge_at_the_solvers_order(x64):
    """``ProbabilityFlow`` on fixed steps runs the tableau: Tsit5 (order 5) on a smooth mixture.
    (Its error falls faster still here, 2^7 per halving from 8 steps on: only ``≥ 5`` is asserted.)"""
    sde, model, kwargs, reference = smooth_problem(n=64)
    errors = []
    for n in (8, 16):
        method = sd.ProbabilityFlow(diffrax.Tsit5(), num_steps=n, grid=sd.UniformLogSNR())
        x, info = sd.sample(sde, model, jax.random.key(3), method=method, **kwargs)
        assert (info.nfe, info.num_steps) == (1 + 6 * n, n)
        errors.append(float(jnp.sqrt(jnp.mean((x - reference) ** 2))))
    slope = np.log2(errors[0] / errors[1])
    assert slope > 4.7, (slope, errors)


@pytest.mark.parametrize("solver", [diffrax.Heun, diffrax.Tsit5], ids=lambda s: s.__name__)
def test_reverse_mode_gradient_matches_diffeqsolve(x64, solver):
    ts = jnp.linspace(0.0, 1.5, 5)
    y0 = jnp.array([[0.3, -1.2, 0.5]])

    def field(t, y):
        return _linear_field(t, y) + 0.1 * y**2  # nonlinear, so the gradient depends on the path

    ours = jax.grad(lambda y: explicit_runge_kutta(field, solver.tableau, ts, y).sum())(y0)
    reference = jax.grad(lambda y: _by_diffeqsolve(field, solver, ts, y).sum())(y0)
    np.testing.assert_allclose(ours, reference, rtol=1e-12)
