"""Shared exact problems for sampler tests (a smooth two-component mixture under VP)."""

from functools import partial

import jax
import jax.numpy as jnp

import sde_diffusion as sd


def smooth_problem(n=200):
    """Wide components: D is smooth in t, so convergence orders show cleanly in float64."""
    sde = sd.VP()
    data = sd.GaussianMixture(
        jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [1.0, -0.5]]), jnp.array([[0.3, 0.5], [0.4, 0.2]])
    )
    model = sd.Denoiser(partial(data.denoiser, sde))
    x_start = data.marginal_sample(sde, sde.t1, jax.random.key(1), n)
    kwargs = dict(x_start=x_start, t_end=0.05)
    reference_method = sd.ProbabilityFlow(sd_solver(), grid=sd.UniformLogSNR(), rtol=1e-12, atol=1e-12)
    reference, _ = sd.sample(sde, model, jax.random.key(2), method=reference_method, **kwargs)
    return sde, model, kwargs, reference


def sd_solver():
    import diffrax

    return diffrax.Dopri8()


def counting(fn, calls):
    """``fn`` with a runtime counter: one entry per evaluation on the batch."""

    def counted(t, x):
        jax.debug.callback(lambda: calls.append(1))
        return fn(t, x)

    return counted
