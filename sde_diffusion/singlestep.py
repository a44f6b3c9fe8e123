"""Two-evaluation single-step samplers of the PF ODE in the scaled state ``x̂ = x/α``, whose
noise level is ``σ̂ = σ/α = e^{−λ}`` (``λ = log(α/σ)``) and whose ODE is ``dx̂/dσ̂ = (x̂ − D)/σ̂``.

A last step to ``σ = 0`` is first order (one evaluation): ``x = α D``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .grids import AbstractTimeGrid, KarrasSigma, UniformLogSNR
from .sample import AbstractGridSampler, sampling_noise


def _loop(step, last_step, x, num_steps: int, ends_at_zero_noise: bool):
    """``step`` over all steps, except a last step to ``σ = 0`` done by ``last_step``."""
    two_eval_steps = num_steps - 1 if ends_at_zero_noise else num_steps
    x, _ = jax.lax.scan(lambda x, i: (step(x, i), None), x, jnp.arange(two_eval_steps))
    return last_step(x, num_steps - 1) if ends_at_zero_noise else x


def _to_data(denoise, c, i, x):
    """The step to ``σ_{i+1} = 0``: ``x_{i+1} = α_{i+1} D(x_i, t_i)``."""
    return c.alpha[i + 1] * denoise(c.ts[i], x)


class DPMSolverPP2S(AbstractGridSampler):
    """DPM-Solver++(2S) (Lu et al. 2022), midpoint ``λ_s = λ_i + h/2``:

    ``u = (σ_s/σ_i) x_i + α_s(1 − e^{−h/2}) D_i``,  ``x_{i+1} = (σ_{i+1}/σ_i) x_i + α_{i+1}(1 − e^{−h}) D(u, t_s)``.
    """

    num_steps: int = eqx.field(static=True)
    grid: AbstractTimeGrid = UniformLogSNR()

    def evaluations(self, ends_at_zero_noise):
        return 2 * self.num_steps - int(ends_at_zero_noise)

    def integrate(self, denoise, c, x, key, ends_at_zero_noise):
        def step(x, i):
            h = c.lam[i + 1] - c.lam[i]
            t_mid = c.sde.t_from_log_snr(2 * (c.lam[i] + h / 2))
            alpha_mid, sigma_mid = c.sde.alpha(t_mid), c.sde.sigma(t_mid)
            u = sigma_mid / c.sigma[i] * x - alpha_mid * jnp.expm1(-h / 2) * denoise(c.ts[i], x)
            return c.sigma[i + 1] / c.sigma[i] * x - c.alpha[i + 1] * jnp.expm1(-h) * denoise(t_mid, u)

        return _loop(step, lambda x, i: _to_data(denoise, c, i, x), x, self.num_steps, ends_at_zero_noise)


class EDMHeun(AbstractGridSampler):
    """Karras et al. (2022), Algorithm 2 in ``x̂``: churn ``γ_i = min(churn/N, √2 − 1)`` where
    ``σ̂_i ∈ [s_tmin, s_tmax]``, ``σ̂' = σ̂_i(1 + γ_i)``, ``x̂' = x̂_i + √(σ̂'² − σ̂_i²) s_noise z``; then a
    Heun step of ``dx̂/dσ̂ = (x̂ − D)/σ̂`` from ``σ̂'`` to ``σ̂_{i+1}``. ``churn = 0`` is Algorithm 1.
    """

    num_steps: int = eqx.field(static=True)
    grid: AbstractTimeGrid = KarrasSigma()
    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __check_init__(self):
        if not (self.churn >= 0 and self.s_noise >= 0 and self.s_tmin <= self.s_tmax):
            raise ValueError("need churn ≥ 0, s_noise ≥ 0 and s_tmin ≤ s_tmax")

    def evaluations(self, ends_at_zero_noise):
        return 2 * self.num_steps - int(ends_at_zero_noise)

    def _churn(self, c, i, x_hat, key):
        """``(t', σ̂', x̂')`` after adding noise (identity when ``churn = 0``)."""
        sigma_hat = jnp.exp(-c.lam[i])
        if self.churn == 0:
            return c.ts[i], sigma_hat, x_hat
        in_range = (sigma_hat >= self.s_tmin) & (sigma_hat <= self.s_tmax)
        gamma = jnp.where(in_range, min(self.churn / self.num_steps, 2**0.5 - 1), 0.0)
        sigma_max = jnp.exp(-0.5 * c.sde.log_snr(c.sde.t1))
        # relative increase, written so that γ = 0 adds exactly nothing (no σ̂'² − σ̂² round-off)
        gamma = jnp.maximum(jnp.minimum(gamma, sigma_max / sigma_hat - 1), 0.0)
        raised = sigma_hat * (1 + gamma)
        z = sampling_noise(jax.random.fold_in(key, i), x_hat.shape, x_hat.dtype)
        x_hat = x_hat + sigma_hat * jnp.sqrt(gamma * (2 + gamma)) * self.s_noise * z
        t_raised = jnp.clip(c.sde.t_from_log_snr(-2 * jnp.log(raised)), c.sde.t0, c.sde.t1)
        t = jnp.where(gamma > 0, t_raised, c.ts[i])
        return t, raised, x_hat

    def integrate(self, denoise, c, x, key, ends_at_zero_noise):
        # The loop carries x̂ = x/α, and each Heun step is two linear combinations of x̂ and the
        # denoiser outputs (few passes over the batch): with r = σ̂_{i+1}/σ̂ and h = σ̂_{i+1} − σ̂,
        # x̂_E = r x̂ + (1 − r) D₁,  x̂_{i+1} = x̂ + h/2 (d₁ + d₂),  d₁ = (x̂ − D₁)/σ̂,  d₂ = (x̂_E − D₂)/σ̂_{i+1}.
        def step(x_hat, i):
            t, sigma_hat, x_hat = self._churn(c, i, x_hat, key)
            sigma_next = jnp.exp(-c.lam[i + 1])
            ratio = sigma_next / sigma_hat
            denoised = denoise(t, c.sde.alpha(t) * x_hat)
            euler = ratio * x_hat + (1 - ratio) * denoised
            denoised_next = denoise(c.ts[i + 1], c.alpha[i + 1] * euler)
            w1, w2 = 0.5 * (sigma_next - sigma_hat) / sigma_hat, 0.5 * (sigma_next - sigma_hat) / sigma_next
            return (1 + w1) * x_hat - w1 * denoised + w2 * (euler - denoised_next)

        def last(x_hat, i):
            t, sigma_hat, x_hat = self._churn(c, i, x_hat, key)
            return c.alpha[i + 1] * denoise(t, c.sde.alpha(t) * x_hat)

        out = _loop(step, last, x / c.alpha[0], self.num_steps, ends_at_zero_noise)
        return out if ends_at_zero_noise else c.alpha[-1] * out
