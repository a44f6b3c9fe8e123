"""Predictor–corrector sampling (Song et al. 2021) for any SDE and score."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .grids import AbstractTimeGrid, UniformTime
from .sample import AbstractSamplingMethod, ReverseDiffusion, SampleInfo, add_info, over_intervals, sampling_noise


class PredictorCorrector(AbstractSamplingMethod):
    """On ``num_steps`` intervals ``t_i > t_{i+1}`` of ``grid``: ``corrector_steps`` Langevin steps
    targeting ``p_{t_i}``,

        ε = 2 (snr · mean‖z‖ / mean‖s_θ(t_i, x)‖)²,   x ← x + ε s_θ(t_i, x) + √(2ε) z,

    (the signal-to-noise rule, norms averaged over the batch as in Song et al.: per-sample norms
    explode in low dimension where ``s_θ`` vanishes near modes), then ``predictor`` from ``t_i`` to
    ``t_{i+1}``: any sampling method, run on that interval (its own grid splits it). Song et al.'s
    predictors are ``ReverseDiffusion(1)`` (the default, Euler–Maruyama; any SDE), ancestral sampling
    ``DDIM(1, eta=1.0, grid=UniformTime())`` (one step: a grid that may end at σ = 0) and
    ``ProbabilityFlow(diffrax.Euler(), num_steps=1)``.
    ``nfe = num_steps · corrector_steps +`` the predictor's evaluations; the intervals run in
    ``over_intervals`` (one ``lax.scan``; the predictor sees traced times before the last).
    """

    num_steps: int = eqx.field(static=True)
    snr: float = 0.16
    corrector_steps: int = eqx.field(default=1, static=True)
    grid: AbstractTimeGrid = UniformTime()
    predictor: AbstractSamplingMethod = ReverseDiffusion(1)

    def __check_init__(self):
        if not isinstance(self.predictor, AbstractSamplingMethod):
            raise TypeError(f"predictor must be a sampling method, got {self.predictor!r}")
        for name, minimum in (("num_steps", 1), ("corrector_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")
        if not self.snr > 0:
            raise ValueError(f"snr must be > 0, got {self.snr!r}")

    def __call__(self, sde, model, key, x_start, t_start, t_end):
        ts = self.grid.times(sde, t_start, t_end, self.num_steps).astype(x_start.dtype)
        score = jax.vmap(model.score, in_axes=(None, None, 0))
        n = x_start.shape[0]

        def norm(v):
            return jnp.mean(jnp.linalg.norm(v.reshape(n, -1), axis=-1))

        def langevin(t, x, key):
            grad = score(sde, t, x)
            z = sampling_noise(key, x.shape, x.dtype)
            eps = 2 * (self.snr * norm(z) / norm(grad)) ** 2
            return x + eps * grad + jnp.sqrt(2 * eps) * z

        def interval(i, x, t_hi, t_lo):
            keys = jax.random.split(jax.random.fold_in(key, i), self.corrector_steps + 1)
            for k in keys[1:]:
                x = langevin(t_hi, x, k)
            x, info = self.predictor(sde, model, keys[0], x, t_hi, t_lo)
            return x, add_info(info, SampleInfo(self.corrector_steps, 0, 0, 0))  # + the corrector's calls

        return over_intervals(interval, ts, x_start, t_end)
