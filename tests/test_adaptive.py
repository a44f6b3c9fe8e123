from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd
from solver_problems import counting
from test_multistep import problem  # noqa: F401  (shared float64 smooth problem)


def test_error_follows_tolerance_and_nfe_is_counted(problem):  # noqa: F811
    sde, model, kwargs, reference = problem
    calls = []
    counted = sd.Denoiser(counting(model.fn, calls))
    errors, nfes = [], []
    for tol in (1e-3, 1e-5, 1e-7):
        calls.clear()
        x, info = sd.sample(sde, counted, jax.random.key(0), method=sd.AdaptiveDPMSolverPP(rtol=tol, atol=tol), **kwargs)
        jax.effects_barrier()
        assert info.nfe == len(calls)  # rejected steps cost nothing: no evaluation is hidden
        assert info.num_steps == info.num_accepted_steps + info.num_rejected_steps
        errors.append(float(jnp.sqrt(jnp.mean((x - reference) ** 2))))
        nfes.append(info.nfe)
    assert errors[0] > errors[1] > errors[2] and nfes[0] < nfes[1] < nfes[2], (errors, nfes)
    assert errors[2] < 1e-5


def test_bad_configurations():
    with pytest.raises(ValueError):
        sd.AdaptiveDPMSolverPP(rtol=0.0)
    sde = sd.EDM(t0=0.0)
    data = sd.GaussianMixture.ring(jax.random.key(0))
    with pytest.raises(ValueError, match="σ\\(t_end\\) > 0"):
        sd.sample(sde, sd.Denoiser(partial(data.denoiser, sde)), jax.random.key(0), (4, 2), method=sd.AdaptiveDPMSolverPP())
    generic = sd.SDE(lambda t, x: -x, lambda t, x: 1.0, prior=sd.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="ScheduleSDE"):
        sd.sample(generic, lambda t, x: -x, jax.random.key(0), (4, 1), method=sd.AdaptiveDPMSolverPP())
    with pytest.raises(RuntimeError, match="max_steps"):
        sd.sample(sd.EDM(), sd.Denoiser(partial(data.denoiser, sd.EDM())), jax.random.key(0), (4, 2),
                  method=sd.AdaptiveDPMSolverPP(rtol=1e-9, atol=1e-9, max_steps=5))


def test_loose_tolerance_still_reaches_the_end(x64):
    """Long steps can overflow the error estimate: they are rejected and shortened, not looped on."""
    sde = sd.EDM()
    data = sd.GaussianMixture.random(jax.random.key(0), dim=8)
    model = sd.Denoiser(partial(data.denoiser, sde))
    x1 = data.marginal_sample(sde, sde.t1, jax.random.key(1), 256)
    for tol in (1e-2, 3e-2):
        x, info = sd.sample(sde, model, jax.random.key(2), x_start=x1, method=sd.AdaptiveDPMSolverPP(rtol=tol, atol=tol))
        assert np.all(np.isfinite(np.asarray(x))) and info.nfe < 40
