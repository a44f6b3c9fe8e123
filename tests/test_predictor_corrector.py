from functools import partial

import jax
import numpy as np
import pytest

import sde_diffusion as sd
from solver_problems import counting


@pytest.mark.parametrize("sde", [sd.VP(), pytest.param(sd.VE(), marks=pytest.mark.slow)], ids=["VP", "VE"])
def test_converges_in_distribution(x64, sde):
    data = sd.GaussianMixture.ring(jax.random.key(0))
    score = partial(data.marginal_score, sde)
    n = 4000
    keys = jax.random.split(jax.random.key(6), 5)
    start = data.marginal_sample(sde, sde.t1, keys[0], n)
    fresh = data.sample(keys[1], n)
    floor = [float(sd.sliced_wasserstein(data.sample(k, n), fresh, keys[4])) for k in jax.random.split(keys[2], 6)]
    errors = []
    for steps in (5, 150):
        x, _ = sd.sample(sde, score, keys[3], method=sd.PredictorCorrector(steps), x_start=start)
        errors.append(float(sd.sliced_wasserstein(x, fresh, keys[4])))
    assert errors[0] > np.mean(floor) + 5 * np.std(floor) > errors[1], (errors, floor)


def test_generic_sde_and_nfe():
    """Any SDE (here state-dependent GBM-like noise); nfe = steps · (1 + corrector steps)."""
    sde = sd.SDE(lambda t, x: -x, lambda t, x: 0.5 + 0.1 * x**2, prior=sd.Normal(0.0, 1.0))
    calls = []
    method = sd.PredictorCorrector(7, corrector_steps=2)
    x, info = sd.sample(sde, counting(lambda t, x: -x, calls), jax.random.key(0), (8, 3), method=method)
    jax.effects_barrier()
    # the divergence term costs no score evaluation; every score call is counted
    assert info.nfe == len(calls) == 7 * 3
    assert np.all(np.isfinite(np.asarray(x)))


def test_invalid():
    with pytest.raises(ValueError):
        sd.PredictorCorrector(0)
    with pytest.raises(ValueError):
        sd.PredictorCorrector(5, snr=0.0)
