"""Resampling (RePaint, Lugmayr et al. 2022) around any sampling method."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .grids import AbstractTimeGrid, UniformTime
from .sample import AbstractSamplingMethod, add_info, no_info, over_intervals, sampling_noise
from .schedule import AbstractScheduleSDE


class Resampling(AbstractSamplingMethod):
    """Split ``[t_end, t_start]`` at ``num_segments + 1`` times ``t_0 > … > t_N`` of ``grid``; on
    each segment run ``method`` from ``t_i`` to ``t_{i+1}``, then ``num_resamples − 1`` times
    noise the result back to ``t_i`` by the exact forward kernel and run it again:

        x_{t_i} = (α_i/α_{i+1}) x_{t_{i+1}} + √(σ_i² − (α_i/α_{i+1})² σ_{i+1}²) ε.

    For a conditional model (``sd.Inpainting``) the denoise–renoise cycles let the free entries
    adjust to the observed ones at each noise level; for an exact model each cycle leaves ``p_t``
    invariant. ``nfe`` is the inner methods' total (``num_resamples`` runs per segment). The
    segments before the last run in one ``lax.scan`` (``method`` sees traced times there), so
    compilation does not grow with ``num_segments``.
    """

    method: AbstractSamplingMethod
    num_segments: int = eqx.field(static=True)
    num_resamples: int = eqx.field(static=True)
    grid: AbstractTimeGrid = UniformTime()

    def __check_init__(self):
        if not isinstance(self.method, AbstractSamplingMethod):
            raise TypeError(f"method must be a sampling method, got {self.method!r}")
        for name in ("num_segments", "num_resamples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")

    def __call__(self, sde, model, key, x, t_start, t_end):
        if not isinstance(sde, AbstractScheduleSDE):
            raise TypeError(f"Resampling needs a ScheduleSDE (its forward kernel), got {type(sde).__name__}")
        ts = self.grid.times(sde, t_start, t_end, self.num_segments).astype(x.dtype)

        def segment(i, x, t_hi, t_lo):
            return self._segment(sde, model, jax.random.fold_in(key, i), x, t_hi, t_lo)

        return over_intervals(segment, ts, x, t_end)

    def _segment(self, sde, model, key, x, t_hi, t_lo):
        """``num_resamples`` runs of ``method`` from ``t_hi`` to ``t_lo``, renoised in between."""
        ratio = sde.alpha(t_hi) / sde.alpha(t_lo)
        renoise_std = jnp.sqrt(jnp.maximum(sde.sigma2(t_hi) - ratio**2 * sde.sigma2(t_lo), 0.0))

        def cycle(r, carry):
            run_key, noise_key = jax.random.split(jax.random.fold_in(key, r))
            x, total = carry
            renoised = ratio * x + renoise_std * sampling_noise(noise_key, x.shape, x.dtype)
            x, info = self.method(sde, model, run_key, renoised, t_hi, t_lo)
            return x, add_info(total, info)

        x, info = self.method(sde, model, jax.random.fold_in(key, 0), x, t_hi, t_lo)
        return jax.lax.fori_loop(1, self.num_resamples, cycle, (x, add_info(no_info(), info)))
