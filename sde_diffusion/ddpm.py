"""The discrete DDPM forward chain (Ho et al. 2020) and its link to the VP SDE.

``q(x_i | x_{i−1}) = N(√(1−β_i) x_{i−1}, β_i I)`` for ``i = 1..T``, with ``x_0`` the data, so that

    q(x_i | x_0) = N(√ᾱ_i x_0, (1−ᾱ_i) I),      ᾱ_i = Π_{j≤i} (1−β_j),   ᾱ_0 = 1.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._checks import check_finite, require
from .distributions import Normal
from .schedule import VP


class DDPM(eqx.Module):
    """T Gaussian kernels ``q(x_i | x_{i−1}) = N(√(1−β_i) x_{i−1}, β_i I)``, ``β_i ∈ (0, 1)``."""

    betas: Array  # (T,): betas[i − 1] = β_i
    log_alpha_bars: Array  # (T + 1,): log ᾱ_i = Σ_{j≤i} log1p(−β_j), log ᾱ_0 = 0

    def __init__(self, betas: ArrayLike):
        betas = jnp.asarray(betas, dtype=jnp.result_type(float))
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must be 1-D with length T ≥ 1, got shape {betas.shape}")
        # The comparisons are False for NaN and exclude ±inf: they also check finiteness.
        require((betas > 0) & (betas < 1), "betas must be finite and lie in (0, 1)")
        self.betas = betas
        zero = jnp.zeros(1, betas.dtype)
        self.log_alpha_bars = jnp.concatenate([zero, jnp.cumsum(jnp.log1p(-betas))])

    @classmethod
    def linear(cls, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> DDPM:
        """Ho et al. (2020): ``β_i`` linear from ``beta_start`` (i = 1) to ``beta_end`` (i = T)."""
        if T < 1:
            raise ValueError(f"T must be ≥ 1, got {T}")
        return cls(jnp.linspace(beta_start, beta_end, T))

    @classmethod
    def from_vp(cls, vp: VP, T: int) -> DDPM:
        """The chain whose ``T → ∞`` limit is ``vp`` (Song et al. 2021, App. B): with ``Δt = 1/T``,

            β_i = β((i−1)/(T−1)) Δt = β_min/T + (i−1)/(T−1) · (β_max − β_min)/T,

        so ``log ᾱ_i = Σ_{j≤i} log(1−β_j) = −∫₀^{i/T} β(s) ds + O(1/T) = 2 log α(i/T) + O(1/T)``:
        step ``i`` matches the SDE at ``t = i/T`` (see ``time``). Needs ``T > β_max`` (β_T < 1).
        """
        if not T > vp.beta_max:
            raise ValueError(f"from_vp needs T > beta_max = {vp.beta_max} so that β_T < 1, got {T}")
        return cls(jnp.linspace(vp.beta_min, vp.beta_max, T) / T)

    @property
    def num_steps(self) -> int:
        """``T``."""
        return self.betas.shape[0]

    def _index(self, i: ArrayLike, lo: int) -> Array:
        """``i`` as an integer array, failing (also under jit) when it leaves ``[lo, T]``."""
        i = jnp.asarray(i)
        if not jnp.issubdtype(i.dtype, jnp.integer):
            raise TypeError(f"step index must be an integer, got dtype {i.dtype}")
        bad = (i < lo) | (i > self.num_steps)
        message = f"step index must lie in [{lo}, T] = [{lo}, {self.num_steps}]"
        require(~bad, message)  # ValueError for concrete indices
        return eqx.error_if(i, jnp.any(bad), message)  # traced ones fail at run time

    def alpha_bar(self, i: ArrayLike) -> Array:
        """``ᾱ_i = Π_{j≤i} (1−β_j)`` for ``i ∈ [0, T]`` (``ᾱ_0 = 1``)."""
        return jnp.exp(self.log_alpha_bars[self._index(i, 0)])

    def time(self, i: ArrayLike) -> Array:
        """The VP time ``t = i/T`` that step ``i ∈ [0, T]`` corresponds to."""
        return self._index(i, 0) / jnp.asarray(self.num_steps, self.betas.dtype)

    def transition(self, i: ArrayLike) -> tuple[Array, Array]:
        """``(√(1−β_i), β_i)``: the one-step kernel ``q(x_i | x_{i−1})``, ``i ∈ [1, T]``."""
        beta = self.betas[self._index(i, 1) - 1]
        return jnp.sqrt(1 - beta), beta

    def marginal(self, i: ArrayLike, x0: ArrayLike) -> Normal:
        """``q(x_i | x_0) = N(√ᾱ_i x_0, (1−ᾱ_i) I)``, ``i ∈ [0, T]`` (scale 0 at ``i = 0``)."""
        log_ab = self.log_alpha_bars[self._index(i, 0)]
        x0 = jnp.asarray(x0, self.betas.dtype)
        return Normal(jnp.exp(0.5 * log_ab) * x0, jnp.sqrt(-jnp.expm1(log_ab)))

    def posterior(self, i: ArrayLike, x_i: ArrayLike, x0: ArrayLike) -> Normal:
        """``q(x_{i−1} | x_i, x_0) = N(μ̃, β̃_i I)`` for ``i ∈ [1, T]``, where

            μ̃ = √ᾱ_{i−1} β_i/(1−ᾱ_i) x_0 + √(1−β_i) (1−ᾱ_{i−1})/(1−ᾱ_i) x_i,
            β̃_i = (1−ᾱ_{i−1})/(1−ᾱ_i) β_i        (β̃_1 = 0: the point mass at x_0).
        """
        i = self._index(i, 1)
        log_ab_prev, log_ab = self.log_alpha_bars[i - 1], self.log_alpha_bars[i]
        beta = self.betas[i - 1]
        var_prev, var = -jnp.expm1(log_ab_prev), -jnp.expm1(log_ab)  # 1 − ᾱ_{i−1}, 1 − ᾱ_i
        x0, x_i = jnp.asarray(x0, beta.dtype), jnp.asarray(x_i, beta.dtype)
        coef0, coef_i = jnp.exp(0.5 * log_ab_prev) * beta / var, jnp.sqrt(1 - beta) * var_prev / var
        return Normal(coef0 * x0 + coef_i * x_i, jnp.sqrt(var_prev / var * beta))

    def sample_chain(self, key: PRNGKeyArray, x0: ArrayLike, store_every: int = 1) -> Array:
        """Run the chain from ``x0`` (any shape, e.g. a batch ``(n, ...)``) with ``lax.scan``.

        Returns the states ``x_i`` for ``i`` in ``range(0, T + 1, store_every)``, stacked along a
        new leading axis: shape ``(T // store_every + 1, *x0.shape)``.
        """
        T = self.num_steps
        if not 1 <= store_every <= T:
            raise ValueError(f"store_every must lie in [1, T] = [1, {T}], got {store_every}")
        x0 = check_finite(jnp.asarray(x0, self.betas.dtype), "x0")
        blocks, n = T // store_every, (T // store_every) * store_every  # steps actually needed
        keys = jax.random.split(key, T)[:n]
        keys = keys.reshape((blocks, store_every) + keys.shape[1:])
        betas = self.betas[:n].reshape(blocks, store_every)

        def step(x, beta_key):
            beta, k = beta_key
            eps = jax.random.normal(k, x.shape, x.dtype)
            return jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * eps, None

        def block(x, betas_keys):
            x, _ = jax.lax.scan(step, x, betas_keys)
            return x, x

        _, states = jax.lax.scan(block, x0, (betas, keys))
        return jnp.concatenate([x0[None], states])
