"""On an accelerator (marker ``gpu``, run with ``pytest -m gpu``): samplers, their NFE counts,
training and the quick benchmark run there and agree with the CPU, which the rest of the suite
checks against exact answers. Skipped where JAX sees no accelerator."""

from functools import partial

import diffrax
import jax
import numpy as np
import pytest
from flax import nnx

import sde_diffusion as sd
from _training_worker import CONFIG, dsm, gmm_data, make_model, params_of
from benchmark_scripts import load_benchmark
from solver_problems import counting

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def accelerator() -> jax.Device:
    devices = [d for d in jax.devices() if d.platform != "cpu"]
    if not devices:
        pytest.skip("JAX sees no accelerator")
    return devices[0]


def _ring():
    sde = sd.EDM()
    data = sd.GaussianMixture.ring(jax.random.key(0))
    return sde, sd.Denoiser(partial(data.denoiser, sde))


METHODS = [
    sd.DPMSolverPP(10, order=3),
    sd.UniPC(10, order=3),
    sd.DDIM(10),
    sd.DEIS(10, order=2),
    sd.DPMSolverPP2S(5),
    sd.EDMHeun(5),
    sd.ProbabilityFlow(diffrax.Tsit5(), num_steps=3),
    sd.ProbabilityFlow(diffrax.Tsit5(), rtol=1e-4, atol=1e-4),
    sd.AdaptiveDPMSolverPP(rtol=1e-3, atol=1e-3),
    sd.DPMSolverPP2MSDE(10),
    sd.ReverseDiffusion(50),
    sd.PredictorCorrector(20, snr=0.1),
    sd.PredictorCorrector(10, predictor=sd.DDIM(1, eta=1.0, grid=sd.UniformTime())),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_sampler_on_the_accelerator_agrees_with_the_cpu(accelerator, method):
    """Same key, same float32 computation: JAX's random bits do not depend on the platform, so the
    samples agree up to rounding (float32 matmuls may use TF32 on the accelerator), and so does NFE."""
    sde, model = _ring()
    runs = []
    for device in (jax.devices("cpu")[0], accelerator):
        with jax.default_device(device):
            x, info = sd.sample(sde, model, jax.random.key(1), (4096, 2), method=method)
        assert x.devices() == {device}
        runs.append((np.asarray(x), int(info.nfe)))
    (x_cpu, nfe_cpu), (x_acc, nfe_acc) = runs
    assert np.all(np.isfinite(x_acc)) and nfe_acc == nfe_cpu
    # rounding may send a rare point near a decision boundary elsewhere: bound the 99th percentile
    distance = np.linalg.norm(x_acc - x_cpu, axis=-1)
    assert np.quantile(distance, 0.99) < 2e-2, np.quantile(distance, [0.5, 0.99, 1.0])


@pytest.mark.parametrize("method", [sd.UniPC(8, order=3), sd.ProbabilityFlow(diffrax.Dopri5(), rtol=1e-4, atol=1e-4)],
                         ids=lambda m: type(m).__name__)  # fmt: skip
def test_counted_model_calls_equal_nfe_on_the_accelerator(accelerator, method):
    sde, model = _ring()
    calls = []
    with jax.default_device(accelerator):
        _, info = sd.sample(sde, sd.Denoiser(counting(model.fn, calls)), jax.random.key(1), (256, 2), method=method)
    assert len(calls) == info.nfe


def test_training_on_the_accelerator_agrees_with_the_cpu(accelerator):
    config = sd.TrainConfig(**{**CONFIG, "steps": 50, "log_every": 10})  # no checkpoint_dir: none written
    runs = [
        sd.train(make_model(), dsm, sd.VP(), gmm_data(), config, devices=[device], progress=False)
        for device in (jax.devices("cpu")[0], accelerator)
    ]
    cpu, acc = runs
    assert all(p.devices() == {accelerator} for p in jax.tree.leaves(nnx.filter_state(acc.model.fn.state, nnx.Param)))
    losses = [np.array([h["loss"] for h in r.history]) for r in runs]
    assert np.all(np.isfinite(losses[1])) and losses[1][-1] < losses[1][0]
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)
    for a, b in zip(params_of(acc.model), params_of(cpu.model), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2 * max(1.0, float(np.max(np.abs(b)))))


def test_quick_benchmark_runs_on_the_accelerator(accelerator, tmp_path):
    bench = load_benchmark("solvers")
    with jax.default_device(accelerator):
        summary = bench.main(["--quick", "--dims", "64", "--overhead", "--repeats", "3", "--out", str(tmp_path)])
    assert summary["failures"] == [] and summary["overhead"]
    assert all(np.isfinite(r["overhead"]) and r["overhead_per_nfe"] > 0.5 for r in summary["overhead"])
