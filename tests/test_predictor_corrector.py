from functools import partial

import diffrax
import jax
import numpy as np
import pytest

import sde_diffusion as sd
from solver_problems import counting


PREDICTORS = {  # Song et al.'s three: reverse diffusion (the default), ancestral sampling, probability flow
    "reverse diffusion": sd.ReverseDiffusion(1),
    "ancestral": sd.DDIM(1, eta=1.0, grid=sd.UniformTime()),  # one step: any grid that reaches σ = 0
    "probability flow": sd.ProbabilityFlow(diffrax.Euler(), num_steps=1),
}


@pytest.mark.parametrize(
    "sde, predictor",
    [(sd.VP(), PREDICTORS["reverse diffusion"])]
    + [pytest.param(sd.VP(), PREDICTORS[name], marks=pytest.mark.slow) for name in ("ancestral", "probability flow")]
    + [pytest.param(sd.VE(), PREDICTORS["reverse diffusion"], marks=pytest.mark.slow)],
    ids=["VP-reverse diffusion", "VP-ancestral", "VP-probability flow", "VE-reverse diffusion"],
)  # fmt: skip
def test_converges_in_distribution(x64, sde, predictor):
    data = sd.GaussianMixture.ring(jax.random.key(0))
    score = partial(data.marginal_score, sde)
    n = 4000
    keys = jax.random.split(jax.random.key(6), 5)
    start = data.marginal_sample(sde, sde.t1, keys[0], n)
    fresh = data.sample(keys[1], n)
    floor = [float(sd.sliced_wasserstein(data.sample(k, n), fresh, keys[4])) for k in jax.random.split(keys[2], 6)]
    errors = []
    for steps in (5, 150):
        x, _ = sd.sample(sde, score, keys[3], method=sd.PredictorCorrector(steps, predictor=predictor), x_start=start)
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


@pytest.mark.parametrize(
    "predictor, plain, t_end",
    [
        (sd.DDIM(1, grid=sd.UniformTime()), partial(sd.DDIM, grid=sd.UniformTime()), None),  # last step to σ = 0
        (sd.ProbabilityFlow(diffrax.Euler(), num_steps=1), partial(sd.ProbabilityFlow, diffrax.Euler()), 0.01),
    ],
    ids=["DDIM", "PF-Euler"],
)  # fmt: skip
def test_without_corrector_a_one_step_predictor_is_that_sampler_on_the_grid(x64, predictor, plain, t_end):
    """``corrector_steps=0``: one step of the predictor per interval of a uniform-t grid is that
    deterministic sampler with ``num_steps`` on the same grid (its last step included)."""
    sde = sd.VP()
    data = sd.GaussianMixture.ring(jax.random.key(0))
    model = sd.Denoiser(partial(data.denoiser, sde))
    start = sde.prior.sample(jax.random.key(1), (64, 2))
    pc = sd.PredictorCorrector(9, corrector_steps=0, predictor=predictor)
    x, info = sd.sample(sde, model, jax.random.key(2), x_start=start, t_end=t_end, method=pc)
    expected, expected_info = sd.sample(sde, model, jax.random.key(3), x_start=start, t_end=t_end, method=plain(num_steps=9))
    np.testing.assert_allclose(x, expected, rtol=1e-10, atol=1e-12)
    assert info.nfe == expected_info.nfe and info.num_steps == 9


def test_nfe_counts_the_predictors_evaluations():
    """A two-stage predictor (Heun: 2 calls per step, 2 steps per interval) and 3 corrector steps."""
    sde = sd.VP()
    data = sd.GaussianMixture.ring(jax.random.key(0))
    calls = []
    pc = sd.PredictorCorrector(5, corrector_steps=3, predictor=sd.ProbabilityFlow(diffrax.Heun(), num_steps=2))
    _, info = sd.sample(sde, counting(partial(data.marginal_score, sde), calls), jax.random.key(1), (16, 2), method=pc)
    jax.effects_barrier()
    assert info.nfe == len(calls) == 5 * (3 + 2 * 2)
    assert info.num_steps == 5 * 2


def test_invalid():
    with pytest.raises(ValueError, match="num_steps"):
        sd.PredictorCorrector(0)
    with pytest.raises(ValueError, match="snr"):
        sd.PredictorCorrector(5, snr=0.0)
    with pytest.raises(ValueError, match="corrector_steps"):
        sd.PredictorCorrector(5, corrector_steps=-1)
    with pytest.raises(ValueError, match="num_steps"):
        sd.PredictorCorrector(sd.ReverseDiffusion(1))  # the predictor is a keyword
    with pytest.raises(TypeError, match="predictor must be a sampling method"):
        sd.PredictorCorrector(5, predictor="euler")
