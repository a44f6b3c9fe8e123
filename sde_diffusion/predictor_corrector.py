"""Predictor–corrector sampling (Song et al. 2021) for any SDE and score."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .grids import AbstractTimeGrid, UniformTime
from .reverse import ReverseSDE
from .sample import AbstractSamplingMethod, SampleInfo, sampling_noise


class PredictorCorrector(AbstractSamplingMethod):
    """At each grid time ``t_i``: ``corrector_steps`` Langevin steps targeting ``p_{t_i}``,

        ε = 2 (snr · mean‖z‖ / mean‖s_θ(t_i, x)‖)²,   x ← x + ε s_θ(t_i, x) + √(2ε) z,

    (the signal-to-noise rule, norms averaged over the batch as in Song et al.: per-sample norms
    explode in low dimension where ``s_θ`` vanishes near modes), then one Euler–Maruyama step of
    the reverse SDE to ``t_{i+1}``. Works for any SDE; ``nfe = num_steps (1 + corrector_steps)``.
    """

    num_steps: int = eqx.field(static=True)
    snr: float = 0.16
    corrector_steps: int = eqx.field(default=1, static=True)
    grid: AbstractTimeGrid = UniformTime()

    def __check_init__(self):
        if self.num_steps < 1 or self.corrector_steps < 0 or not self.snr > 0:
            raise ValueError("need num_steps ≥ 1, corrector_steps ≥ 0 and snr > 0")

    def __call__(self, sde, model, key, x_start, t_start, t_end):
        ts = self.grid.times(sde, t_start, t_end, self.num_steps).astype(x_start.dtype)
        reverse = ReverseSDE(sde, lambda t, x: model.score(sde, t, x))
        noise = sde.noise(x_start[0])
        noise_shape = noise.shape(x_start.shape[1:], jax.eval_shape(sde.diffusion, sde.t0, x_start[0]).shape)
        score = jax.vmap(model.score, in_axes=(None, None, 0))
        n = x_start.shape[0]

        def norm(v):
            return jnp.mean(jnp.linalg.norm(v.reshape(n, -1), axis=-1))

        def langevin(t, x, key):
            grad = score(sde, t, x)
            z = sampling_noise(key, x.shape, x.dtype)
            eps = 2 * (self.snr * norm(z) / norm(grad)) ** 2
            return x + eps * grad + jnp.sqrt(2 * eps) * z

        def predictor(t, t_next, x, key):
            ds, s = t - t_next, sde.t1 - t

            def one(x, key):
                dw = jnp.sqrt(ds) * sampling_noise(key, noise_shape, x.dtype)
                return x + reverse.drift(s, x) * ds + noise.apply(reverse.diffusion(s, x), dw)

            return jax.vmap(one)(x, jax.random.split(key, n))

        def step(x, i):
            keys = jax.random.split(jax.random.fold_in(key, i), self.corrector_steps + 1)
            for k in keys[1:]:
                x = langevin(ts[i], x, k)
            return predictor(ts[i], ts[i + 1], x, keys[0]), None

        x = jax.lax.scan(step, x_start, jnp.arange(self.num_steps))[0]
        steps = self.num_steps
        return x, SampleInfo(steps * (1 + self.corrector_steps), steps, steps, 0)
