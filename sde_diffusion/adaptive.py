"""Adaptive multistep DPM-Solver++ on the PF ODE of a schedule SDE.

Steps ``h`` in the half log-SNR ``λ = log(α/σ)`` are chosen by the usual controller on the local
error estimate ``‖x^{(k)} − x^{(k−1)}‖`` between the order-``k`` and order-``k−1`` multistep
updates. Both come from the same past evaluations, so a rejected step costs no model evaluation
and an accepted one costs exactly one (none for the last step, which lands on ``t_end``):
``nfe = 1 + accepted steps − 1``. Orders rise from 1 to 3 as the history fills.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .multistep import dpm_solver_pp_weights
from .sample import AbstractSamplingMethod, SampleInfo, ends_at_zero_noise
from .schedule import AbstractScheduleSDE


class AdaptiveDPMSolverPP(AbstractSamplingMethod):
    """Variable-step DPM-Solver++(3M) with embedded 2M error estimate (the batch shares steps;
    error in the RMS norm of ``(x^{(3)} − x^{(2)}) / (atol + rtol · max(|x|, |x^{(3)}|))``)."""

    rtol: float = 1e-3
    atol: float = 1e-3
    initial_step: float = 0.1  # first step in λ (first order, not error-controlled)
    safety: float = 0.9
    max_steps: int = eqx.field(default=1000, static=True)

    def __check_init__(self):
        if not (self.rtol > 0 and self.atol > 0 and self.initial_step > 0 and 0 < self.safety <= 1):
            raise ValueError("need rtol, atol, initial_step > 0 and 0 < safety ≤ 1")

    def __call__(self, sde, model, key, x_start, t_start, t_end):
        if not isinstance(sde, AbstractScheduleSDE):
            raise TypeError(f"AdaptiveDPMSolverPP needs a ScheduleSDE, got {type(sde).__name__}")
        if ends_at_zero_noise(sde, t_end):
            raise ValueError("AdaptiveDPMSolverPP needs σ(t_end) > 0 (finite log-SNR)")
        dtype = x_start.dtype
        lam_start = (0.5 * sde.log_snr(t_start)).astype(dtype)
        lam_end = (0.5 * sde.log_snr(t_end)).astype(dtype)
        batched = jax.vmap(model.denoiser, in_axes=(None, None, 0))

        def time(lam):
            t = jnp.clip(sde.t_from_log_snr(2 * lam), t_end, t_start)
            return jnp.where(lam >= lam_end, t_end, jnp.where(lam <= lam_start, t_start, t))

        def update(k, lam, lam_next, x, history, lams):
            t, t_next = time(lam), time(lam_next)
            weights = jnp.stack([dpm_solver_pp_weights(j, lam_next, lams) for j in (1, 2, 3)])[k - 1]
            return sde.sigma(t_next) / sde.sigma(t) * x + sde.alpha(t_next) * jnp.tensordot(weights, history, axes=1)

        def body(state):
            lam, x, history, lams, filled, h, accepted, rejected = state
            h = jnp.minimum(h, lam_end - lam)
            lam_next = jnp.where(h >= lam_end - lam, lam_end, lam + h)
            k = jnp.minimum(filled, 3)
            x_high = update(k, lam, lam_next, x, history, lams)
            x_low = update(jnp.maximum(k - 1, 1), lam, lam_next, x, history, lams)
            scale = self.atol + self.rtol * jnp.maximum(jnp.abs(x), jnp.abs(x_high))
            error = jnp.sqrt(jnp.mean(((x_high - x_low) / scale) ** 2))
            finite = jnp.isfinite(error)  # a step far too long can overflow: reject and shrink
            accept = ((error <= 1) & finite) | (k == 1)

            def advance(_):
                d_next = jax.lax.cond(
                    lam_next < lam_end, lambda: batched(sde, time(lam_next), x_high), lambda: jnp.zeros_like(x)
                )
                return (
                    lam_next,
                    x_high,
                    jnp.concatenate([d_next[None], history[:-1]]),
                    jnp.concatenate([lam_next[None], lams[:-1]]),
                    jnp.minimum(filled + 1, 3),
                )

            lam, x, history, lams, filled = jax.lax.cond(
                accept, advance, lambda _: (lam, x, history, lams, filled), None
            )
            factor = jnp.where(k == 1, 1.0, self.safety * jnp.maximum(error, 1e-10) ** (-1.0 / k))
            factor = jnp.where(finite, factor, 0.2)
            h = h * jnp.clip(factor, 0.2, 5.0)
            return lam, x, history, lams, filled, h, accepted + accept, rejected + (1 - accept)

        def cond(state):
            lam, *_, accepted, rejected = state
            return (lam < lam_end) & (accepted + rejected < self.max_steps)

        history = jnp.zeros((3,) + x_start.shape, dtype).at[0].set(batched(sde, time(lam_start), x_start))
        lams = jnp.full((3,), lam_start)
        h0 = jnp.asarray(self.initial_step, dtype)
        zero = jnp.zeros((), jnp.int32)
        state = (lam_start, x_start, history, lams, jnp.ones((), jnp.int32), h0, zero, zero)
        lam, x, *_, accepted, rejected = jax.lax.while_loop(cond, body, state)
        x = eqx.error_if(x, lam < lam_end, "AdaptiveDPMSolverPP: max_steps reached before t_end")
        return x, SampleInfo(accepted, accepted + rejected, accepted, rejected)
